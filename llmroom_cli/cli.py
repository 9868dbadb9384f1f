"""The Typer app: declares options, calls the core, and maps errors to exit codes in one place.

No `from __future__ import annotations` here: typer would evaluate every string annotation of every
command through get_type_hints at start-up (about 12 ms of `--help`); the few annotations naming
lazily imported types are quoted instead.

Heavy modules (httpx, rich, psutil, pynvml, the server) are imported inside the commands that need
them, so `llmroom --help` and `llmroom --version` stay fast.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar


def _ensure_std_streams() -> None:
    """`llmroom ... >&-` (or `2>&-`, `<&-`) starts us with a standard fd closed: Python then has no
    sys.stdout, and the next file or socket opened would take fd 1 and receive our output. Point each
    closed one at /dev/null first, before anything else is opened (hence at import time)."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False, encoding="utf-8"))


_ensure_std_streams()

import typer  # noqa: E402

from llmroom_cli import __version__  # noqa: E402
from llmroom_cli.errors import EndpointError, LlmroomError, UsageError  # noqa: E402
from llmroom_cli.identity import default_nickname  # noqa: E402

# Modules that only some commands need (json, threading, traceback, the option parsers) are imported
# inside those commands: `--help` and `--version` pay for typer alone.
DEFAULT_HUB = "http://localhost:3000"

if TYPE_CHECKING:
    import httpx

    from llmroom_cli.client import HubClient
    from llmroom_cli.endpoints import ModelInfo, ServerInfo
    from llmroom_cli.hubapi import Hub

T = TypeVar("T")

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 room not found, 4 invalid password,"
    " 5 hub unreachable, 6 local LLM endpoint problem."
)

app = typer.Typer(
    name="llmroom",
    help="Share your local LLM server in an LLM room, list rooms, or run a hub.\n\n" + EXIT_CODES_HELP,
    epilog="Examples:\n\n"
    "  llmroom serve                        (a hub on this machine)\n\n"
    "  CODE=$(llmroom create 'Hack night')  (a room)\n\n"
    "  llmroom join $CODE                   (share your local LLM in it)\n\n"
    "  llmroom list $CODE                   (who is in it, and its URL)\n\n"
    'Shell completion: llmroom --install-completion, or eval "$(_LLMROOM_COMPLETE=bash_source llmroom)"'
    " (zsh_source, fish_source).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # typer renders help through rich whenever it is installed; only worth it on a terminal.
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

# -- shared options, declared once ----------------------------------------------------------------

HubOpt = Annotated[
    str | None,
    typer.Option(
        "--hub",
        envvar="LLMROOM_HUB",
        # The default goes through typer (show_default): a `[default: ...]` written into the help is
        # taken for rich markup on a terminal and vanishes, leaving "network ." behind.
        help="Hub URL (host:port works too), or 'auto' to find one on the local network.",
        show_default=f"{DEFAULT_HUB}, else one found on the local network",
    ),
]
HubApiOpt = Annotated[
    str | None,
    typer.Option(
        "--hub-api",
        metavar="v0.1|v0.6",
        help="Speak this hub API generation instead of detecting it.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks and HTTP traces (secrets redacted).")
]
CodeArg = Annotated[
    str,
    typer.Argument(
        metavar="CODE",
        help="Room code: 6 characters of A-Z 0-9 _ -, any case. A code starting with '-' goes after"
        " '--', as in: llmroom join -- -YLUHJ",
        show_default=False,
    ),
]


ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="LLMROOM_API_KEY",
        metavar="KEY",
        help="API key of your LLM server, sent as 'Authorization: Bearer KEY' to it only (never to the"
        " hub, never printed).",
        show_default=False,
        show_envvar=True,
    ),
]
HeaderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--header",
        metavar="NAME=VALUE",
        help="A header for your LLM server's requests, repeatable (visible in the process list: prefer"
        " --header-env).",
        show_default=False,
    ),
]
HeaderEnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--header-env",
        metavar="NAME=ENVVAR",
        help="A header for your LLM server's requests, its value read from ENVVAR; repeatable.",
        show_default=False,
    ),
]


def _credentials(
    api_key: str | None, header: list[str] | None, header_env: list[str] | None
) -> dict[str, str]:
    """The local server's credentials from the options (exit 2 for a bad one; values never shown),
    registered as secrets for the --debug trace."""
    from llmroom_cli.options import parse_headers

    found = parse_headers(header or [], header_env or [], api_key)
    for value in found.values():
        _secrets.add(value)
        if value.startswith("Bearer "):
            _secrets.add(value[7:])
    return found


def _colour_ok(stream: Any) -> bool:
    """ANSI colour on this stream: a terminal that can show it, and the user did not ask for none."""
    try:
        tty = bool(stream.isatty())
    except (OSError, ValueError):
        return False
    return tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


# `error:` in bold red and `warning:` in bold yellow, on a terminal only.
_PREFIX_COLOURS = {"error:": "\x1b[1;31m", "warning:": "\x1b[1;33m"}


def _err(text: str) -> None:
    """One line on stderr. A closed, full or hung-up stderr is not an error of ours: the line is
    dropped (and later ones with it), the command's outcome and exit code stay what they were."""
    from llmroom_cli.render import silence_fd, visible

    try:
        # Messages carry foreign text (a hub's error, an mDNS name): shown literally, one line.
        line = visible(text)
        prefix = line.split(" ", 1)[0]
        if prefix in _PREFIX_COLOURS and _colour_ok(sys.stderr):
            line = f"{_PREFIX_COLOURS[prefix]}{prefix}\x1b[0m{line[len(prefix) :]}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        silence_fd(2)


def _debug(text: str) -> None:
    if _state["debug"]:
        _err(f"debug: {text}")


def _fail(exc: LlmroomError) -> NoReturn:
    line = f"error: {exc.message}"
    if exc.hint:
        line += f" ({exc.hint})"
    _err(line)
    raise typer.Exit(exc.exit_code)


def _run(fn: Callable[[], T], debug: bool = False) -> T:
    """Run a command body: the one place where core errors become a message and an exit code."""
    _state["debug"] = debug or _state["debug"]
    if _state["debug"]:
        _enable_http_trace()
    try:
        return fn()
    except LlmroomError as exc:
        if _state["debug"]:
            _print_traceback()
        _fail(exc)
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader of our output went away (`... | head -1`): stop quietly, as SIGPIPE would.
        from llmroom_cli.render import silence_stdout

        silence_stdout()
        raise typer.Exit(141) from None
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EIO):
            _unexpected(exc)
        # stdout is full or gone (`>/dev/full`): the output was not delivered, so say it, as coreutils
        # do (`write error: No space left on device`), in words and without the rest of it.
        from llmroom_cli.render import silence_stdout

        silence_stdout()
        _err(f"error: write failed: {exc.strerror}")
        raise typer.Exit(1) from None
    except Exception as exc:
        _unexpected(exc)
    raise AssertionError("unreachable")  # pragma: no cover


def _unexpected(exc: BaseException) -> NoReturn:
    if _state["debug"]:
        _print_traceback()
    _err(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for a traceback)")
    raise typer.Exit(1) from None


# Secret values of this run (the room password), registered as soon as they are known, so that the
# --debug trace can blank them wherever they would appear.
_secrets: set[str] = set()


def _redact(text: str) -> str:
    """`text` with known secrets, URL credentials and secret-looking query values blanked."""
    import re

    from llmroom_cli.options import redact_url

    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = redact_url(text)
    return re.sub(
        r"(?i)([?&](?:password|passwd|pwd|token|key|api_key|apikey|secret|auth)=)[^&\s\"']*",
        r"\1[redacted]",
        text,
    )


def _enable_http_trace() -> None:
    """--debug: one stderr line per HTTP request/response; bodies are never logged (they may hold a
    password), and every line goes through `_redact` once formatted (where the values are)."""
    import logging

    class _Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = _redact(record.getMessage())
            record.args = None
            return True

    logger = logging.getLogger("httpx")
    if any(getattr(h, "_llmroom", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._llmroom = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("debug: %(name)s: %(message)s"))
    handler.addFilter(_Redact())
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def _print_traceback() -> None:
    import traceback

    traceback.print_exc()


def _hub(hub: str | None) -> str:
    """The hub URL a command talks to: --hub / LLMROOM_HUB, 'auto' (discover), else the default."""
    if hub is None:
        return DEFAULT_HUB
    if hub.strip().lower() == "auto":
        return _discover_hub()
    from llmroom_cli.options import normalize_hub_url

    return normalize_hub_url(hub)


def _pick_by_name(raw: str, labels: list[str]) -> int | None:
    """The label `raw` names: the whole label or its name (what precedes " at " / " ("), in any case;
    else the one label that name starts with. None when it names none, or several."""
    typed = raw.strip().casefold()
    if not typed:
        return None
    names = [label.split(" (", 1)[0].split(" at ", 1)[0].casefold() for label in labels]
    for i, (label, name) in enumerate(zip(labels, names, strict=True)):
        if typed in (label.casefold(), name):
            return i
    starts = [i for i, name in enumerate(names) if name.startswith(typed)]
    return starts[0] if len(starts) == 1 else None


def _pick(title: str, labels: list[str], question: str, none_chosen: LlmroomError) -> int:
    """A numbered pick on a terminal; the number or the name may be typed. Returns the index chosen;
    EOF raises `none_chosen`."""
    _err(title)
    for i, label in enumerate(labels, 1):
        _err(f"  {i}. {label}")
    while True:
        try:
            raw = input(f"{question} [1-{len(labels)}]: ")
        except EOFError:
            raise none_chosen from None
        if raw.strip().isdigit() and 1 <= int(raw) <= len(labels):
            return int(raw) - 1
        named = _pick_by_name(raw, labels)
        if named is not None:
            return named
        _err(f"please type a number from 1 to {len(labels)}, or a name from the list")


def _ask_hub(hubs: list[Any]) -> Any:
    labels = [f"{h.name} at {h.url}" for h in hubs]
    none = UsageError("no hub chosen", "pass one with --hub URL")
    return hubs[_pick("Several hubs answer on the local network:", labels, "Use which one?", none)]


def _discover_hub(timeout_s: float = 1.5) -> str:
    return _discover_hub_named(timeout_s)[0]


def _discover_hub_named(timeout_s: float = 1.5) -> tuple[str, str]:
    """The URL of the hub found on the local network, and how to name it to the user."""
    from llmroom_cli.discovery import discover, pick_hub

    hubs = discover(timeout_s)
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    chosen = pick_hub(hubs, _ask_hub if interactive else None)
    _err(
        f"using hub {chosen.name} at {chosen.url} (found on the local network;"
        f" to skip the search: export LLMROOM_HUB={chosen.url})"
    )
    url: str = chosen.url
    return url, f"{chosen.name} at {url}"


def _http_for_hub(hub: str | None) -> "httpx.Client":
    return _http("https://" if hub and hub.strip().lower().startswith("https://") else "http://")


def _hub_or_discovered(http: "httpx.Client", hub: str | None) -> str:
    """With no --hub and no LLMROOM_HUB, a default hub that does not answer sends us looking for one
    on the local network before giving up."""
    hub_url = _hub(hub)
    if hub is not None:
        return hub_url
    return _fallback_if_down(http, hub_url)


def _fallback_if_down(http: "httpx.Client", hub_url: str) -> str:
    return _fallback_named(http, hub_url)[0]


def _fallback_named(http: "httpx.Client", hub_url: str, forced: str | None = None) -> tuple[str, str | None]:
    """The default hub if it answers (either generation, or the `forced` one), else one found on the
    local network; the second item names that hub (None for the default one): a hub nobody named must
    not be sent a password unasked."""
    from llmroom_cli.errors import HubUnavailable
    from llmroom_cli.hubapi import answers

    if answers(http, hub_url, forced, timeout_s=1.0):
        return hub_url, None
    _err(f"no hub answers at {hub_url}; looking for one on the local network ...")
    try:
        url, name = _discover_hub_named()
        return url, name
    except HubUnavailable as exc:
        raise HubUnavailable(f"no hub answers at {hub_url}, and {exc.message}", exc.hint) from None


def _confirm(question: str) -> bool:
    """A yes/no question on the terminal; anything but y/yes (or EOF) is no."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _password_for_lan_hub(lan_hub: str, secret: str | None, interactive: bool) -> str | None:
    """The implicit fallback found `lan_hub` over mDNS, which anyone on the LAN can announce: the
    room password goes to it only if the user says so on a terminal; otherwise open rooms only."""
    if not secret:
        return None
    question = f"send the room password to hub {lan_hub} (found on the local network)? [y/N] "
    if interactive and _confirm(question):
        return secret
    _err(
        f"not sending the room password to hub {lan_hub}: it was found on the local network, not named"
        " by you (name it with --hub URL, or use --hub auto, to send it)"
    )
    return None


def _hub_api(value: str | None) -> str | None:
    """`--hub-api`, checked before any request: "v0.1", "v0.6" or None (detect)."""
    from llmroom_cli.hubapi import HUB_APIS

    if value is None:
        return None
    if value.strip().lower() not in HUB_APIS:
        raise UsageError(f"--hub-api {value!r}: expected v0.1 or v0.6")
    return value.strip().lower()


_user_config_cache: list[dict[str, str]] = []


def _user_config() -> dict[str, str]:
    """The user's config file (`options.load_user_config`), read once per run; warnings on stderr."""
    if not _user_config_cache:
        from llmroom_cli.options import load_user_config

        _user_config_cache.append(load_user_config(warn=lambda m: _err(f"warning: {m}")))
    return _user_config_cache[0]


def _named_hub(hub: str | None) -> str | None:
    """--hub / LLMROOM_HUB, else the config file's `hub`; None when nothing names one."""
    return hub if hub is not None else _user_config().get("hub")


def _open_hub(hub: str | None, forced: str | None) -> "Hub":
    """The hub a command talks to (the same LAN fallback for every command when nothing names one),
    its generation detected once (or `forced`)."""
    from llmroom_cli.hubapi import open_hub

    hub = _named_hub(hub)
    http = _http_for_hub(hub)
    hub_url = _hub(hub)
    if hub is None:
        hub_url = _fallback_named(http, hub_url, forced)[0]
    found = open_hub(http, hub_url, forced)
    _debug(f"hub {found.base_url} speaks {found.label}")
    return found


def _code(code: str) -> str:
    from llmroom_cli.options import parse_room_code

    return parse_room_code(code)


def _http(*urls: str) -> "httpx.Client":
    from llmroom_cli.http import make_http

    return make_http(*urls)


def _client(hub_url: str) -> "HubClient":
    from llmroom_cli.client import HubClient

    return HubClient(_http(hub_url), hub_url)


def _read_password_stdin() -> str:
    """--password-stdin: asked without echo on a terminal (the prompt on the terminal, not stdout);
    otherwise the first line of stdin, read silently."""
    if sys.stdin.isatty():
        import getpass

        try:
            password = getpass.getpass("room password: ")
        except EOFError:
            password = ""
        if not password:
            raise UsageError("--password-stdin: no password typed")
        return password
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise UsageError("--password-stdin: standard input gave no password (expected it on the first line)")
    return password


def _print_json(data: Any) -> None:
    """Indented for a person on a terminal; compact when piped (an indent makes json use its slow
    pure-Python encoder: 0.4 s more for a room of 10,000 participants)."""
    import json

    if sys.stdout.isatty():
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"llmroom {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Share your local LLM server in an LLM room."""


# -- serve ------------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  llmroom serve                       (this machine only)\n\n"
    "  llmroom serve --host 0.0.0.0 --mdns (the whole network, announced)\n\n"
    "  llmroom serve --port 0 --quiet      (a free port, no request log)"
)
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 for the whole network).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on (0 picks a free one).", min=0, max=65535)
    ] = 3000,
    participant_timeout: Annotated[
        float,
        typer.Option(help="Seconds without a health check before a participant is marked offline.", min=0.1),
    ] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-request log lines.")] = False,
    mdns: Annotated[
        bool,
        typer.Option("--mdns", help="Announce the hub on the local network (as the reference hub does)."),
    ] = False,
    allow_relay_to: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-relay-to",
            metavar="CIDR",
            help="Also relay to HTTP participants' endpoints in this network (repeatable); by default only"
            " to the address each participant joined from.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Run the embedded hub (v0.1 and v0.6 hub APIs) until Ctrl-C."""

    def ready(hub: Any) -> Callable[[], None] | None:
        from llmroom_cli.discovery import hub_url as url_for

        urls = [url_for(a, hub.port) for a in _usable_addresses(host)]
        if urls and urls != [hub.url]:
            _err(f"reachable at {', '.join(urls)}")
        first = urls[0] if urls else hub.url
        _err(f"next: llmroom create NAME --hub {first}, then llmroom join CODE --hub {first}")
        return announce(hub) if mdns else None

    def announce(hub: Any) -> Callable[[], None] | None:
        from llmroom_cli.discovery import Announcement

        try:
            announcement = Announcement(hub.port, host=host).start()
        except LlmroomError as exc:
            _err(f"warning: not announced on the local network: {exc}")
            return None
        _err(f"announced as {announcement.name} on {', '.join(announcement.addresses)} (mDNS)")
        return announcement.close

    def body() -> int:
        import ipaddress
        import math

        if not math.isfinite(participant_timeout):  # `nan` passes typer's min check
            raise UsageError(f"--participant-timeout {participant_timeout}: expected a number of seconds")
        networks = []
        for cidr in allow_relay_to or []:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise UsageError(
                    f"--allow-relay-to {cidr!r}: expected a network such as 10.0.0.0/24"
                ) from None
        from llmroom_cli.hub import Limits
        from llmroom_cli.hub import serve as run_server

        limits = Limits(allow_relay_to=tuple(networks))
        code: int = run_server(host, port, participant_timeout, quiet, on_ready=ready, limits=limits)
        return code

    raise typer.Exit(_run(body, debug))


def _usable_addresses(host: str) -> list[str]:
    """The addresses people can type for a hub bound to `host`: for a wildcard, this machine's LAN
    addresses (and loopback for this machine); otherwise the host itself."""
    if host in ("0.0.0.0", "::", ""):
        from llmroom_cli.discovery import local_ipv4_addresses

        return [*local_ipv4_addresses(), "127.0.0.1"]
    return [host]


# -- create / list / leave ----------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  llmroom create 'Hack night'\n\n"
    "  CODE=$(llmroom create Lab --hub 10.0.0.5)\n\n"
    "  llmroom create Locked --password-stdin\n\n"
    "  llmroom create Tuned -c temperature=0.3 -c max_tokens=512   (v0.6 hubs: room defaults)"
)
def create(
    name: Annotated[str, typer.Argument(help="Room name.", show_default=False)],
    hub: HubOpt = None,
    hub_api: HubApiOpt = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Protect the room with a password: asked without echo on a terminal, else the first"
            " line of stdin.",
        ),
    ] = False,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config", "-c", help="Room default KEY=VALUE for every request, repeatable (v0.6 hubs)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config-file", help="Room defaults from a JSON or TOML file (v0.6).")
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Create a room and print its code (only the code when piped: CODE=$(llmroom create NAME))."""

    def body() -> None:
        forced = _hub_api(hub_api)
        if not name.strip():
            raise UsageError("the room name is empty")
        if len(name) > 256:
            raise UsageError(f"the room name is {len(name)} characters long: at most 256")
        from llmroom_cli.options import parse_config

        defaults = parse_config(config or [], config_file, warn=lambda m: _err(f"warning: {m}"))
        password = _read_password_stdin() if password_stdin else None
        if password:
            _secrets.add(password)
        found = _open_hub(hub, forced)
        data = found.create_room(name, password, defaults)
        if json_out:
            _print_json(data)
            return
        code = data["room"]["code"]
        if sys.stdout.isatty():
            from llmroom_cli.options import curl_example, room_api_url
            from llmroom_cli.render import print_text, visible

            hub_url = found.base_url
            print_text(f"created room {visible(code)} ({name}) on {hub_url}")
            print_text(f"join it with: llmroom join {code} --hub {hub_url}", style="dim")
            url = room_api_url(hub_url, code)
            print_text(f"use the room (OpenAI-compatible): {url}", style="dim", soft_wrap=True)
            print_text(f"  {curl_example(hub_url, code)}", style="dim", soft_wrap=True)
        else:
            sys.stdout.write(code + "\n")

    _run(body, debug)


WideOpt = Annotated[bool, typer.Option("--wide", help="Show whole participant ids on a terminal too.")]


@app.command(
    "list",
    epilog="Examples:\n\n"
    "  llmroom list\n\n"
    "  llmroom list ABC123 --watch\n\n"
    "  llmroom list ABC123 | cut -f1,2   (id and nickname)\n\n"
    "  llmroom list ABC123 --json",
)
def list_(
    code: Annotated[
        str | None, typer.Argument(help="Room code: list its participants.", show_default=False)
    ] = None,
    hub: HubOpt = None,
    hub_api: HubApiOpt = None,
    json_out: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep the view live until Ctrl-C.")] = False,
    wide: WideOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List rooms, or a room's participants (offline ones dimmed).

    Piped output is tab-separated, one line per row and no header, numbers plain and times in ISO-8601
    UTC. Rooms: code, name, participants, created, password (yes/no, '-' where the hub does not say).
    Participants: id, nickname, model, status, GPU, VRAM GB, RAM GB, endpoint, last seen."""

    def body() -> None:
        forced = _hub_api(hub_api)
        room = _code(code) if code is not None else None
        found = _open_hub(hub, forced)
        if watch:
            _watch(found, room, json_out, wide)
            return
        from llmroom_cli import render

        plain = not sys.stdout.isatty()
        if room is None:
            data = found.rooms_body()
            if json_out:
                _print_json(data)
                return
            rows, dim = render.rooms_view(data["rooms"], plain=plain)
            render.print_table(render.ROOM_COLUMNS, rows, dim, empty=f"no rooms on {found.base_url}")
        else:
            data = found.participants_body(room)
            if json_out:
                _print_json(data)
                return
            if not plain:
                from llmroom_cli.options import curl_example, room_api_url

                url = room_api_url(found.base_url, room)
                render.print_text(f"room {room}: {url}", style="bold", soft_wrap=True)
                render.print_text(f"  {curl_example(found.base_url, room)}", style="dim", soft_wrap=True)
            rows, dim = render.participants_view(data["participants"], plain=plain, wide=wide)
            render.print_table(render.PARTICIPANT_COLUMNS, rows, dim, empty=f"no participants in {room}")

    _run(body, debug)


# A v0.6 hub cuts an event stream after ~10 s without an event and a frozen one sends nothing: a stream
# silent this long is dropped and opened again (and the view refreshed, in case events were missed).
WATCH_SILENCE_S = 15.0
WATCH_POLL_S = 2.0


def _watch(hub: "Hub", room: str | None, json_out: bool, wide: bool = False) -> None:
    """Follow the room's event stream where the hub has one, else poll every 2 s, until Ctrl-C."""
    import json
    import threading
    import time

    from llmroom_cli import render
    from llmroom_cli.errors import HubUnavailable

    stop = threading.Event()
    watcher = (
        None
        if json_out
        else render.Watcher(
            render.PARTICIPANT_COLUMNS if room else render.ROOM_COLUMNS,
            f"room {room}" if room else hub.base_url,
        )
    )
    changed = threading.Event()
    plain = not sys.stdout.isatty()

    def follow() -> None:
        assert room is not None
        while not stop.is_set():
            opened = time.monotonic()
            try:
                for _event, _data in hub.events(room, silence_s=WATCH_SILENCE_S):
                    changed.set()
                    if stop.is_set():
                        return
            except LlmroomError:
                pass
            # The stream ended (cut for silence, or the hub went away): open it again, at once if it
            # had lasted, else after a pause (a hub that drops every stream must not be hammered).
            changed.set()
            if stop.wait(0.1 if time.monotonic() - opened > WATCH_POLL_S else WATCH_POLL_S):
                return

    def show() -> None:
        if room is None:
            data = hub.rooms_body()
            rows, dim = render.rooms_view(data["rooms"], plain=plain)
        else:
            data = hub.participants_body(room)
            rows, dim = render.participants_view(data["participants"], plain=plain, wide=wide)
        if json_out:
            sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        elif watcher is not None:
            watcher.show(rows, dim)
            if watcher.broken:  # the terminal is gone (closed window): nothing left to watch for
                stop.set()

    from llmroom_cli.session import capture_signals

    with capture_signals(stop, on_second=lambda: os._exit(130)):
        try:
            show()
            if room is not None:
                threading.Thread(target=follow, name="llmroom-events", daemon=True).start()
            while not stop.is_set():
                # An event wakes us at once; "last seen" ages and sweeps are picked up every 2 s anyway.
                changed.wait(WATCH_POLL_S)
                changed.clear()
                if stop.is_set():
                    break
                try:
                    show()
                except HubUnavailable as exc:
                    # A live table shows the warning under itself until the next good refresh.
                    (watcher.warn if watcher is not None else _err)(f"warning: {exc.message}; still trying")
        finally:
            if watcher is not None:
                watcher.close()


def _own_ids(hub_url: str, room: str, endpoint: str | None) -> dict[str, str]:
    """The stable ids `join` on this machine would have used in `room` ({id: endpoint}): for the given
    endpoint, else for the default one and the usual local ports (how `join` finds a server)."""
    from llmroom_cli.endpoints import LOCAL_CANDIDATES, normalize_endpoint
    from llmroom_cli.identity import stable_participant_id

    if endpoint is not None:
        candidates = [normalize_endpoint(endpoint)]
    else:
        ports = [c.rsplit(":", 1)[1] for c in LOCAL_CANDIDATES]
        raw = [*LOCAL_CANDIDATES, *(f"http://localhost:{p}" for p in ports)]
        candidates = list(dict.fromkeys(normalize_endpoint(c) for c in raw))
    return {stable_participant_id(hub_url, room, ep): ep for ep in candidates}


def _match_participant(parts: list[dict[str, Any]], wanted: str) -> list[dict[str, Any]]:
    """The participants `wanted` names: the exact id; else those of that nickname (exactly, then in any
    case); else those whose id starts with it."""
    exact = [p for p in parts if p.get("id") == wanted]
    if exact:
        return exact
    nicks = [(p, p["nickname"]) for p in parts if isinstance(p.get("nickname"), str)]
    named = [p for p, nick in nicks if nick == wanted] or [
        p for p, nick in nicks if nick.casefold() == wanted.casefold()
    ]
    if named:
        return named
    return [p for p in parts if isinstance(p.get("id"), str) and p["id"].startswith(wanted)]


@app.command(
    epilog="Examples:\n\n"
    "  llmroom leave ABC123                 (this machine's own participant)\n\n"
    "  llmroom leave ABC123 alice@laptop    (by nickname)\n\n"
    "  llmroom leave ABC123 3f9c2a1b        (by id or a unique id prefix, as `list ABC123` shows)"
)
def leave(
    code: CodeArg,
    participant_id: Annotated[
        str | None,
        typer.Argument(
            metavar="[ID|NICKNAME]",
            help="Participant id, a unique id prefix, or a nickname.",
            show_default="this machine's own participant",
        ),
    ] = None,
    hub: HubOpt = None,
    hub_api: HubApiOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            "-e",
            envvar="LLMROOM_ENDPOINT",
            help="Without an ID: the LLM server this machine shared.",
            show_default="the usual local ports",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Remove a participant from a room (to clean up after a crash)."""

    def body() -> None:
        forced = _hub_api(hub_api)
        room = _code(code)
        if participant_id is not None and not participant_id.strip():
            raise UsageError("the participant id is empty")
        if endpoint is not None:
            from llmroom_cli.endpoints import normalize_endpoint

            normalize_endpoint(endpoint)  # a bad URL is exit 2 before any request
        found = _open_hub(hub, forced)
        from llmroom_cli.errors import ParticipantNotFound

        parts = found.participants(room)
        if participant_id is None:
            own = _own_ids(found.base_url, room, endpoint or _user_config().get("endpoint"))
            matches = [p for p in parts if p.get("id") in own]
            if not matches:
                _err(f"nothing to remove: room {room} lists no participant of this machine (give an ID)")
                return
            what = "this machine's participant"
        else:
            matches = _match_participant(parts, participant_id)
            what = ""
        if len(matches) > 1:
            listed = ", ".join(f"{p.get('id')} ({p.get('nickname')})" for p in matches)
            raise UsageError(
                f"{participant_id or 'this machine'} matches {len(matches)} participants of room {room}:"
                f" {listed}",
                "give a whole id",
            )
        target = str(matches[0].get("id")) if matches else str(participant_id)
        try:
            found.leave(room, target)
        except ParticipantNotFound:
            # Cleanup is idempotent: what a script wanted gone is gone.
            _err(f"nothing to remove: room {room} does not list {participant_id}")
            return
        nick = matches[0].get("nickname") if matches else None
        named = f"{target} ({nick})" if isinstance(nick, str) and nick != target else target
        # Always said (on stderr: stdout stays empty for scripts): a running agent re-registers at
        # once, and without this line nothing would show that the leave happened.
        _err(f"removed {what + ' ' if what else ''}{named} from room {room}")

    _run(body, debug)


# -- specs / probe ----------------------------------------------------------------------------------


# `specs` and `join` take the same --share: `specs --share ...` shows what `join --share ...` sends.
ShareOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--share",
        metavar="FIELD,...",
        help="Only these spec fields: gpu, vram, ram, cpu, cpu_cores, gpus, unified_memory, os,"
        " arch, llm (comma-separated or repeated).",
        show_default=False,
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  llmroom specs\n\n"
    "  llmroom specs --share gpu,vram,ram    (what `join --share gpu,vram,ram` would send)\n\n"
    "  llmroom specs --json | jq .gpu"
)
def specs(json_out: JsonOpt = False, share: ShareOpt = None, debug: DebugOpt = False) -> None:
    """Show this machine's specs: what `join` sends to the room (with --share: only those fields)."""

    def body() -> None:
        from llmroom_cli.specs import detect_specs, parse_share

        fields = parse_share(share) if share is not None else None  # exit 2 before any probing
        everything = detect_specs(_debug if _state["debug"] else None)
        found = everything.select(fields)
        if json_out:
            _print_json(found.data)
            return
        from llmroom_cli.render import print_table

        print_table(("WHAT", "VALUE", "SOURCE"), [[r.what, r.value, r.source] for r in found.rows])
        held = [k for k in everything.data if k not in found.data]
        if fields is not None and held:
            _err(f"not shared with --share {','.join(fields)}: {', '.join(held)}")

    _run(body, debug)


@app.command(
    epilog="Examples:\n\n"
    "  llmroom status\n\n"
    "  llmroom status --json | jq '.[] | {room, state, requests_served}'"
)
def status(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the llmroom agents sharing on this machine (room, hub, state, uptime, requests)."""

    def body() -> None:
        from dataclasses import asdict

        from llmroom_cli.agents import list_agents

        found = list_agents()
        if json_out:
            _print_json([asdict(a) | {"uptime_s": round(a.uptime_s(), 1)} for a in found])
            return
        if not found:
            sys.stdout.write("no llmroom agents running on this machine\n")
            return
        from llmroom_cli.render import print_table

        rows = [
            [
                str(a.pid),
                a.room,
                a.hub,
                a.state,
                f"{a.uptime_s():.0f}s",
                str(a.requests_served),
                a.last_error or "",
            ]
            for a in found
        ]
        print_table(("PID", "ROOM", "HUB", "STATE", "UPTIME", "SERVED", "LAST ERROR"), rows)

    _run(body, debug)


@app.command(
    epilog="Examples:\n\n"
    "  llmroom probe                              (search the usual local ports)\n\n"
    "  llmroom probe http://localhost:8080\n\n"
    '  llmroom probe http://localhost:8000 --api-key "$VLLM_KEY" --json'
)
def probe(
    url: Annotated[
        str | None,
        typer.Argument(help="Server URL; without it, the usual local ports are tried.", show_default=False),
    ] = None,
    api_key: ApiKeyOpt = None,
    header: HeaderOpt = None,
    header_env: HeaderEnvOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Identify the local LLM server(s) and list their models."""

    def body() -> int:
        from llmroom_cli import endpoints

        credentials = _credentials(api_key, header, header_env)
        if url is not None:
            base = endpoints.normalize_endpoint(url)
            http = _http(endpoints.probe_url(base))
            servers = [endpoints.probe(http, base, credentials=credentials)]
        else:
            servers = endpoints.find_servers()  # every usual port at once, within a deadline
            if not servers:
                if json_out:
                    _print_json([])
                ports = endpoints.ports_of(endpoints.LOCAL_CANDIDATES)
                raise EndpointError(
                    f"no LLM server answers on the usual local ports ({ports})",
                    "start one, or give its URL: llmroom probe http://HOST:PORT",
                )
        if json_out:
            _print_json(servers[0].to_json() if url is not None else [s.to_json() for s in servers])
            return 0
        from llmroom_cli.render import print_table, print_text

        for info in servers:
            version = f" {info.version}" if info.version else ""
            print_text(f"{info.url}: {info.kind}{version}, {info.status}", style="bold")
            rows = [
                [
                    m.id,
                    {True: "loaded", False: "-", None: "?"}[m.loaded],
                    "embedding" if m.embedding else "chat",
                    str(m.context_length or "-"),
                    m.quantization or "-",
                ]
                for m in info.models
            ]
            print_table(("MODEL", "LOADED", "TYPE", "CONTEXT", "QUANT"), rows, empty="no models")
        if any(s.status == "loading" for s in servers):
            raise EndpointError(
                f"the server at {servers[0].url} is still loading a model", "try again shortly"
            )
        return 0

    raise typer.Exit(_run(body, debug))


# -- join -----------------------------------------------------------------------------------------


def _ask_model(models: "list[ModelInfo]") -> "ModelInfo":
    labels = [f"{m.id}{' (loaded)' if m.loaded else ''}" for m in models]
    none = EndpointError("no model chosen", "pass one with --model NAME")
    return models[_pick("The server offers several chat models:", labels, "Share which one?", none)]


@app.command(
    epilog="Examples:\n\n"
    "  llmroom join ABC123              (shares the server found on this machine)\n\n"
    "  llmroom join ABC123 --hub 10.0.0.5 -e http://localhost:8080 -m llama3.2\n\n"
    "  llmroom join ABC123 --share gpu,vram,ram --bench\n\n"
    "  llmroom join ABC123 --dry-run    (print the request, send nothing)\n\n"
    "  llmroom join ABC123 --password-stdin --json < password.txt"
)
def join(
    code: CodeArg,
    hub: HubOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            "-e",
            envvar="LLMROOM_ENDPOINT",
            help="Your local OpenAI-compatible LLM server.",
            show_default="the config file's endpoint, else search the usual local ports",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            envvar="LLMROOM_MODEL",
            help="Model to share.",
            show_default="the config file's model, else the only one, else ask",
        ),
    ] = None,
    nickname: Annotated[
        str | None,
        typer.Option(
            "--nickname",
            "-n",
            envvar="LLMROOM_NICKNAME",
            help="Name shown in the room.",
            show_default="the config file's nickname, else user@host",
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the room password from the first line of stdin.")
    ] = False,
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            help="Room password (visible to other users in the process list: prefer --password-stdin"
            " or LLMROOM_PASSWORD).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Generation config KEY=VALUE, repeatable (temperature=0.7)."),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config-file", help="Generation config from a JSON or TOML file.")
    ] = None,
    no_specs: Annotated[bool, typer.Option("--no-specs", help="Do not send this machine's specs.")] = False,
    share: ShareOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the request join would send (secrets as ***) and exit; contacts no hub."
        ),
    ] = False,
    bench: Annotated[
        bool,
        typer.Option("--bench", help="Time the model once (first token, tokens/s) and send it in specs.llm."),
    ] = False,
    participant_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="Participant id.", show_default="stable per hub, room and endpoint", metavar="ID"
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between heartbeats (>= 0.01).")
    ] = 10.0,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for a loading server to be ready.")] = False,
    advertise: Annotated[
        str | None,
        typer.Option(
            "--advertise",
            help="Publish this URL to the hub instead (proxy, tunnel, container); still checked to answer.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Publish the endpoint even if the hub's side cannot reach it.")
    ] = False,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct",
            help="v0.1 hubs: publish your server's own address (checked to answer) instead of this"
            " agent's relay; the hub then reaches every route of the server.",
        ),
    ] = False,
    hub_api: Annotated[
        str | None,
        typer.Option(
            "--hub-api",
            envvar="LLMROOM_HUB_API",
            metavar="v0.1|v0.6",
            help="Speak this hub API instead of detecting it.",
            show_default=False,
        ),
    ] = None,
    api_key: ApiKeyOpt = None,
    header: HeaderOpt = None,
    header_env: HeaderEnvOpt = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            "--max-concurrent",
            metavar="N",
            help="Requests served at once, 429 beyond [default: 4: llama-server's default parallel slots"
            " and Ollama's default; more would only queue in the server while a 429 lets the hub pick"
            " another participant].",
            show_default=False,
        ),
    ] = None,
    drain: Annotated[
        float,
        typer.Option("--drain", metavar="SECONDS", help="On leave, how long requests in flight may finish."),
    ] = 10.0,
    pause_when_busy: Annotated[
        bool,
        typer.Option(
            "--pause-when-busy",
            help="Leave the room's rotation while other processes use this machine's GPU (>= 20%"
            " utilisation or >= 1 GiB of its memory) and come back when they have stopped (< 10% and"
            " < 512 MiB, twice in a row).",
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON-lines events on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Join a room and share your local LLM until Ctrl-C (heartbeat every 10 s, rides out hub trouble).

    Password: --password-stdin, else LLMROOM_PASSWORD, else a prompt on a terminal when the room asks."""
    mode = "json" if json_out else "quiet" if quiet else "live" if sys.stdout.isatty() else "plain"

    def body() -> int:
        try:
            room = _code(code)
            user_config = _user_config()  # flags and LLMROOM_* variables take precedence over it
            named_hub = _named_hub(hub)
            hub_url = _hub(named_hub)
            if not 0.01 <= interval <= 3600:
                raise UsageError(f"--interval {interval}: expected seconds from 0.01 to 3600")
            nick_given = nickname if nickname is not None else user_config.get("nickname")
            nick = (nick_given if nick_given is not None else default_nickname()).strip()
            if not nick or len(nick) > 64:
                raise UsageError("--nickname must be 1 to 64 characters")
            if participant_id is not None and not (0 < len(participant_id.strip()) <= 128):
                raise UsageError("--id must be 1 to 128 characters")
            from llmroom_cli.options import parse_config

            # --quiet prints only errors: a config typo is a warning (the key is still sent).
            warn = None if mode == "quiet" else lambda m: _err(f"warning: {m}")
            cfg = parse_config(config or [], config_file, warn=warn)
            if password_stdin and password is not None:
                raise UsageError("give the password once: --password-stdin or --password, not both")
            from llmroom_cli import endpoints
            from llmroom_cli.specs import parse_share

            fields = parse_share(share) if share is not None else None  # exit 2 before any request
            chosen_ep = endpoint if endpoint is not None else user_config.get("endpoint")
            ep = endpoints.normalize_endpoint(chosen_ep) if chosen_ep is not None else None
            if advertise is not None:
                endpoints.normalize_endpoint(advertise)
            from llmroom_cli.share import SharePlan, run_share

            plan = SharePlan(
                room,
                hub_url,
                ep or "",
                nick,
                model=model if model is not None else user_config.get("model"),
                config=cfg,
                no_specs=no_specs,
                participant_id=participant_id,
                interval_s=interval,
                wait=wait,
                mode=mode,
                advertise=advertise,
                force=force,
                implicit_hub=named_hub is None,
                direct=direct,
                hub_api=hub_api,
                credentials=_credentials(api_key, header, header_env),
                drain_s=drain,
                pause_when_busy=pause_when_busy,
                share_fields=fields,
                bench=bench,
                dry_run=dry_run,
            )
            if max_concurrent is not None:
                plan.max_concurrent = max_concurrent
            plan.check()
            if ep is None:
                # Issue 14 item 1: search the usual local ports as `probe` does; the stable id then
                # uses the endpoint found.
                found = _search_server(mode, plan.credentials)
                plan.endpoint, plan.server = endpoints.normalize_endpoint(found.url), found
            plan.password = _resolve_password(password_stdin, password)
            if dry_run:
                from llmroom_cli.share import dry_run as preview_join

                _print_json(preview_join(plan, _CliUI()))
                return 0
            return run_share(plan, _CliUI())
        except LlmroomError as exc:
            if mode == "json":
                _emit_json_error(exc.exit_code, exc.message)
            raise

    raise typer.Exit(_run(body, debug))


def _search_server(mode: str, credentials: dict[str, str]) -> "ServerInfo":
    """The LLM server `join` shares when none is named: the one answering on the usual local ports,
    a numbered pick on a terminal when several do (EndpointError, exit 6, when none or undecided)."""
    from llmroom_cli import endpoints

    interactive = sys.stdin.isatty() and sys.stderr.isatty() and mode != "json"
    info = endpoints.choose_server(endpoints.find_servers(), _ask_server if interactive else None)
    if mode not in ("json", "quiet"):
        _err(f"using the {info.kind} server at {info.url} (found on this machine)")
    return info


def _ask_server(servers: "list[ServerInfo]") -> "ServerInfo":
    from llmroom_cli.endpoints import match_server, server_label

    _err("Several LLM servers answer on this machine:")
    for i, info in enumerate(servers, 1):
        _err(f"  {i}. {server_label(info)}")
    while True:
        try:
            raw = input(f"Share which one? [1-{len(servers)}, or its kind or port]: ")
        except EOFError:
            raise EndpointError("no LLM server chosen", "pass one with --endpoint URL") from None
        chosen = match_server(raw, servers)
        if chosen is not None:
            return chosen
        _err(f"please type a number from 1 to {len(servers)}, a kind or a port")


def _leave_command(code: str, participant_id: str, hub_url: str) -> str:
    room = f"-- {code}" if code.startswith("-") else code
    return f"llmroom leave --hub {hub_url} {room} {participant_id}"


def _emit_json_error(code: int, message: str) -> None:
    import json
    import time

    event = {"event": "error", "ts": int(time.time() * 1000), "code": code, "message": message}
    try:
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):  # the reader or the terminal is gone: the exit code still says it
        from llmroom_cli.render import silence_fd

        silence_fd(1)


def _resolve_password(password_stdin: bool, password: str | None) -> str | None:
    secret = _password_from(password_stdin, password)
    if secret:
        _secrets.add(secret)
    return secret


def _password_from(password_stdin: bool, password: str | None) -> str | None:
    if password_stdin:
        return _read_password_stdin()
    if password is not None:
        _err("warning: --password is visible to other users in the process list; prefer --password-stdin")
        return password or None
    return os.environ.get("LLMROOM_PASSWORD") or None


class _CliUI:
    """The interactive bits of a share run (share.ShareUI): terminal questions and stderr lines."""

    def interactive(self) -> bool:
        return sys.stdin.isatty() and sys.stderr.isatty()

    def message(self, text: str) -> None:
        _err(text)

    def debug(self, text: str) -> None:
        _debug(text)

    def secret(self, value: str) -> None:
        if value:
            _secrets.add(value)

    def choose_model(self, models: "list[ModelInfo]") -> "ModelInfo":
        return _ask_model(models)

    def ask_password(self, prompt: str) -> str:
        import getpass

        return getpass.getpass(prompt)

    def find_hub(self, http: "httpx.Client", hub_url: str) -> tuple[str, str | None]:
        return _fallback_named(http, hub_url)

    def password_for_lan_hub(self, lan_hub: str, secret: str | None, interactive: bool) -> str | None:
        return _password_for_lan_hub(lan_hub, secret, interactive)

    def exit_now(self, leftover: tuple[str, str, str] | None) -> None:
        line = "interrupted again: exiting without waiting for the hub"
        if leftover is not None:
            line += f"; if it still lists you, run: {_leave_command(*leftover)}"
        _err(line)
        os._exit(130)

    def unconfirmed_leave(self, room: str, participant_id: str, hub_url: str) -> None:
        _err(
            f"warning: the hub at {hub_url} did not confirm the leave; if it still lists you, run: "
            + _leave_command(room, participant_id, hub_url)
        )

    def join_may_have_landed(self, room: str, participant_id: str, hub_url: str) -> None:
        _err(
            f"warning: stopped before joining, but a join request may have reached the hub at {hub_url};"
            f" if it lists you, run: {_leave_command(room, participant_id, hub_url)}"
        )


# -- hubs -------------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  llmroom hubs\n\n"
    "  llmroom hubs --timeout 5 --json\n\n"
    "  export LLMROOM_HUB=$(llmroom hubs --json | jq -r '.[0].url')"
)
def hubs(
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to listen for announcements.", min=0.1)
    ] = 1.5,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find hubs on the local network (mDNS: _gambiarra._tcp for v0.1, _gambi._tcp for v0.6), check
    that they answer, and show each one's hub API generation."""

    def body() -> int:
        import math

        if not math.isfinite(timeout):  # `nan` and `inf` pass typer's min check
            raise UsageError(f"--timeout {timeout}: expected a number of seconds")
        from llmroom_cli.discovery import discover
        from llmroom_cli.hubapi import generation_label

        if not json_out and sys.stderr.isatty():
            _err(f"listening for hub announcements for {timeout:g} s ...")
        found = discover(timeout)
        if json_out:
            _print_json([h.to_json() for h in found])
        else:
            from llmroom_cli.render import print_table

            rows = [
                [
                    h.name,
                    h.url,
                    generation_label(h.generation) if h.generation else "-",
                    ", ".join(h.addresses),
                    str(h.txt.get("version", "-")),
                    "yes" if h.healthy else "no",
                    f"{h.rtt_ms:.1f} ms" if h.rtt_ms is not None else "-",
                ]
                for h in found
            ]
            print_table(("NAME", "URL", "HUB API", "ADDRESSES", "VERSION", "ANSWERS", "ROUND TRIP"), rows)
        if not found:
            _err("error: no hub found on the local network (start one with: llmroom serve --mdns)")
            return 5
        return 0

    raise typer.Exit(_run(body, debug))


# -- doctor -----------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  llmroom doctor\n\n"
    "  llmroom doctor --hub 10.0.0.5 --endpoint http://localhost:8080\n\n"
    "  llmroom doctor --json > report.json"
)
def doctor(
    hub: HubOpt = None,
    hub_api: HubApiOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            "-e",
            envvar="LLMROOM_ENDPOINT",
            help="Your LLM server.",
            show_default="search the usual local ports",
        ),
    ] = None,
    advertise: Annotated[
        str | None, typer.Option("--advertise", help="The URL you would publish instead.", show_default=False)
    ] = None,
    api_key: ApiKeyOpt = None,
    header: HeaderOpt = None,
    header_env: HeaderEnvOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One report for bug reports and "why is nobody sending me requests": versions, specs, local
    servers, the hub's generation, reachability, round trip and clock skew, the published address, the
    config file. Exit 0 when all is well, else the exit code of the first problem."""

    def body() -> int:
        forced = _hub_api(hub_api)
        from llmroom_cli import endpoints
        from llmroom_cli.doctor import build_report
        from llmroom_cli.errors import HubUnavailable

        user_config = _user_config()
        named = _named_hub(hub)
        hub_url = _hub(named)
        chosen = endpoint if endpoint is not None else user_config.get("endpoint")
        ep = endpoints.normalize_endpoint(chosen) if chosen else None
        urls = [hub_url, "http://127.0.0.1", *(u for u in (ep, advertise) if u)]
        http = _http(*urls)
        if named is None:
            try:
                # The same LAN fallback as every other command; when none is found, the report says
                # the default hub does not answer.
                hub_url = _fallback_named(http, hub_url, forced)[0]
            except HubUnavailable:
                pass
        credentials = _credentials(api_key, header, header_env)
        report = build_report(
            http,
            hub_url,
            ep,
            advertise=advertise,
            hub_api=forced,
            user_config=user_config,
            credentials=credentials,
        )
        if json_out:
            _print_json(report.data)
        else:
            from llmroom_cli.render import print_table

            rows = [
                [c.name, "ok" if c.ok else f"PROBLEM (exit {c.exit_code})", c.detail] for c in report.checks
            ]
            styles = [None if c.ok else "bold red" for c in report.checks]
            print_table(("CHECK", "STATUS", "DETAIL"), rows, styles=styles)
        return report.exit_code()

    raise typer.Exit(_run(body, debug))


# -- demo -------------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  llmroom demo\n\n"
    "  llmroom demo --duration 60 --port 3000   (the embedded hub on :3000)\n\n"
    "  llmroom demo -e http://localhost:11434   (share your real Ollama instead of the stand-in)"
)
def demo(
    duration: Annotated[float, typer.Option(help="Seconds to stay in the room.", min=1)] = 15.0,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", "-e", help="Share this real local server instead of the stand-in."),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between heartbeats.", min=0.01)
    ] = 1.0,
    port: Annotated[
        int,
        typer.Option(help="Port of the embedded hub on 127.0.0.1 (0 picks a free one).", min=0, max=65535),
    ] = 0,
    debug: DebugOpt = False,
) -> None:
    """The whole product in one command: an embedded hub, a stand-in LLM, a room, a participant with
    real heartbeats, one chat request through the hub, then leave."""

    def body() -> int:
        from llmroom_cli.demo import run_demo

        return run_demo(duration, endpoint, interval, _CliUI(), port=port)

    raise typer.Exit(_run(body, debug))


def main() -> None:
    """Console-script entry point; click's multi-line usage errors become one line, exit 2."""
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.28 vendors click
    except ImportError:  # pragma: no cover - older typer on plain click
        from click import exceptions as click_exc  # type: ignore[no-redef,import-not-found,unused-ignore]

    _click_style_completion()
    try:
        code = app(prog_name="llmroom", standalone_mode=False)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            # Under rich (a terminal) typer has already drawn the help while raising: once is enough.
            if app.rich_markup_mode is None:
                sys.stdout.write(exc.ctx.get_help() + "\n")
            sys.exit(0)
        cmd = exc.ctx.command_path if exc.ctx is not None else "llmroom"
        hint = f"see: {cmd} --help"
        code = next((a for a in sys.argv[1:] if len(a) == 6 and a.startswith("-") and a[1:2] != "-"), None)
        if type(exc).__name__ == "NoSuchOption" and code is not None:
            hint = f"a room code starting with '-' goes after '--', as in: {cmd} -- {code}"
        _err(f"error: {exc.format_message()} ({hint})")
        sys.exit(2)
    except click_exc.ClickException as exc:
        _err(f"error: {exc.format_message()}")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except OSError as exc:
        import errno

        # `--help`/`--version` into a full or vanished stdout: what was asked for is done, as far as
        # it can be; never a traceback (commands' own output goes through `_run`).
        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO):
            raise
        code = 0
    _flush_stdout()
    sys.exit(code if isinstance(code, int) else 0)


def _click_style_completion() -> None:
    """Shell completion: `_LLMROOM_COMPLETE=bash_source llmroom` (click's spelling, which its docs and
    most guides use) means typer's `source_bash`; both print the script for bash, zsh or fish."""
    var = "_LLMROOM_COMPLETE"
    value = os.environ.get(var, "")
    shell, _, instruction = value.partition("_")
    if shell in ("bash", "zsh", "fish") and instruction in ("source", "complete"):
        os.environ[var] = f"{instruction}_{shell}"


def _flush_stdout() -> None:
    """Flush what is still buffered for stdout; a full or vanished stdout (`>/dev/full`) is not a
    crash at interpreter exit: the rest is dropped quietly."""
    try:
        sys.stdout.flush()
    except OSError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
