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
    from llmroom_cli.endpoints import ModelInfo

T = TypeVar("T")

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 room not found, 4 invalid password,"
    " 5 hub unreachable, 6 local LLM endpoint problem."
)

app = typer.Typer(
    name="llmroom",
    help="Share your local LLM server in an LLM room, list rooms, or run a hub.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
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
        help="Hub URL (host:port works too), or 'auto' to find one on the local network"
        f" [default: {DEFAULT_HUB}].",
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


def _err(text: str) -> None:
    """One line on stderr. A closed, full or hung-up stderr is not an error of ours: the line is
    dropped (and later ones with it), the command's outcome and exit code stay what they were."""
    from llmroom_cli.render import silence_fd, visible

    try:
        # Messages carry foreign text (a hub's error, an mDNS name): shown literally, one line.
        sys.stderr.write(visible(text) + "\n")
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


def _pick(title: str, labels: list[str], question: str, none_chosen: LlmroomError) -> int:
    """A numbered pick on a terminal; returns the index chosen. EOF raises `none_chosen`."""
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
        _err(f"please type a number from 1 to {len(labels)}")


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
    _err(f"using hub {chosen.name} at {chosen.url} (found on the local network)")
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


def _fallback_named(http: "httpx.Client", hub_url: str) -> tuple[str, str | None]:
    """The default hub if it answers, else one found on the local network; the second item names
    that hub (None for the default one): a hub nobody named must not be sent a password unasked."""
    from llmroom_cli.client import HubClient
    from llmroom_cli.errors import HubUnavailable

    try:
        HubClient(http, hub_url).health(timeout_s=1.0)
        return hub_url, None
    except HubUnavailable:
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


@app.command()
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
        code: int = run_server(
            host, port, participant_timeout, quiet, on_ready=announce if mdns else None, limits=limits
        )
        return code

    raise typer.Exit(_run(body, debug))


# -- create / list / leave ----------------------------------------------------------------------------


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Room name.", show_default=False)],
    hub: HubOpt = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Protect the room with a password read from stdin.")
    ] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Create a room and print its code (only the code when piped: CODE=$(llmroom create NAME))."""

    def body() -> None:
        if not name.strip():
            raise UsageError("the room name is empty")
        if len(name) > 256:
            raise UsageError(f"the room name is {len(name)} characters long: at most 256")
        hub_url = _hub(hub)
        password = _read_password_stdin() if password_stdin else None
        if password:
            _secrets.add(password)
        data = _client(hub_url).create_room(name, password)
        if json_out:
            _print_json(data)
            return
        code = data["room"]["code"]
        if sys.stdout.isatty():
            from llmroom_cli.render import print_text

            print_text(f"created room {code} ({name}) on {hub_url}")
            print_text(f"join it with: llmroom join {code} --hub {hub_url}", style="dim")
        else:
            sys.stdout.write(code + "\n")

    _run(body, debug)


@app.command("list")
def list_(
    code: Annotated[
        str | None, typer.Argument(help="Room code: list its participants.", show_default=False)
    ] = None,
    hub: HubOpt = None,
    json_out: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep the view live until Ctrl-C.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List rooms, or a room's participants (offline ones dimmed).

    Piped output is tab-separated, one line per row and no header. Rooms: code, name, participants,
    age. Participants: nickname, model, status, GPU, VRAM, RAM, endpoint, last seen."""

    def body() -> None:
        room = _code(code) if code is not None else None
        from llmroom_cli.client import HubClient

        http = _http_for_hub(hub)
        client = HubClient(http, _hub_or_discovered(http, hub))
        if watch:
            _watch(client, room, json_out)
            return
        from llmroom_cli import render

        if room is None:
            data = client.rooms_body()
            if json_out:
                _print_json(data)
                return
            rows, dim = render.rooms_view(data["rooms"])
            render.print_table(render.ROOM_COLUMNS, rows, dim, empty=f"no rooms on {client.base_url}")
        else:
            data = client.participants_body(room)
            if json_out:
                _print_json(data)
                return
            rows, dim = render.participants_view(data["participants"])
            render.print_table(render.PARTICIPANT_COLUMNS, rows, dim, empty=f"no participants in {room}")

    _run(body, debug)


def _watch(client: "HubClient", room: str | None, json_out: bool) -> None:
    """Follow the room's event stream where the hub has one, else poll every 2 s, until Ctrl-C."""
    import json
    import threading

    from llmroom_cli import render
    from llmroom_cli.errors import HubUnavailable

    stop = threading.Event()
    watcher = (
        None
        if json_out
        else render.Watcher(
            render.PARTICIPANT_COLUMNS if room else render.ROOM_COLUMNS,
            f"room {room}" if room else client.base_url,
        )
    )
    changed = threading.Event()

    def follow() -> None:
        assert room is not None
        while not stop.is_set():
            try:
                for _event, _data in client.events(room):
                    changed.set()
                    if stop.is_set():
                        return
            except LlmroomError:
                pass
            if stop.wait(2.0):
                return

    def show() -> None:
        if room is None:
            data = client.rooms_body()
            rows, dim = render.rooms_view(data["rooms"])
        else:
            data = client.participants_body(room)
            rows, dim = render.participants_view(data["participants"])
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
                changed.wait(2.0)
                changed.clear()
                if stop.is_set():
                    break
                try:
                    show()
                except HubUnavailable as exc:
                    _err(f"warning: {exc.message}; still trying")
        finally:
            if watcher is not None:
                watcher.close()


@app.command()
def leave(
    code: CodeArg,
    participant_id: Annotated[str, typer.Argument(metavar="ID", help="Participant id.", show_default=False)],
    hub: HubOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Remove a participant from a room (to clean up after a crash)."""

    def body() -> None:
        room = _code(code)
        if not participant_id.strip():
            raise UsageError("the participant id is empty")
        hub_url = _hub(hub)
        from llmroom_cli.errors import ParticipantNotFound

        try:
            _client(hub_url).leave(room, participant_id)
        except ParticipantNotFound:
            # Cleanup is idempotent: what a script wanted gone is gone.
            _err(f"nothing to remove: room {room} does not list {participant_id}")
            return
        if sys.stdout.isatty():
            _err(f"removed {participant_id} from room {room}")

    _run(body, debug)


# -- specs / probe ----------------------------------------------------------------------------------


@app.command()
def specs(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Show this machine's specs: what `join` sends to the room."""

    def body() -> None:
        from llmroom_cli.specs import detect_specs

        found = detect_specs(_debug if _state["debug"] else None)
        if json_out:
            _print_json(found.data)
            return
        from llmroom_cli.render import print_table

        print_table(("WHAT", "VALUE", "SOURCE"), [[r.what, r.value, r.source] for r in found.rows])

    _run(body, debug)


@app.command()
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


@app.command()
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
            http = _http("http://127.0.0.1")
            servers = endpoints.probe_local(http)
            if not servers:
                if json_out:
                    _print_json([])
                raise EndpointError(
                    "no LLM server answers on the usual local ports (11434, 1234, 8080, 9931, 8000)",
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


@app.command()
def join(
    code: CodeArg,
    hub: HubOpt = None,
    endpoint: Annotated[
        str,
        typer.Option(
            "--endpoint", "-e", envvar="LLMROOM_ENDPOINT", help="Your local OpenAI-compatible LLM server."
        ),
    ] = "http://localhost:11434",
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", envvar="LLMROOM_MODEL", help="Model to share (default: ask or the only one)."
        ),
    ] = None,
    nickname: Annotated[
        str | None,
        typer.Option(
            "--nickname", "-n", envvar="LLMROOM_NICKNAME", help="Name shown in the room [default: user@host]."
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
    participant_id: Annotated[
        str | None, typer.Option("--id", help="Participant id [default: stable per hub, room and endpoint].")
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
            hub_url = _hub(hub)
            if not 0.01 <= interval <= 3600:
                raise UsageError(f"--interval {interval}: expected seconds from 0.01 to 3600")
            nick = (nickname if nickname is not None else default_nickname()).strip()
            if not nick or len(nick) > 64:
                raise UsageError("--nickname must be 1 to 64 characters")
            if participant_id is not None and not (0 < len(participant_id.strip()) <= 128):
                raise UsageError("--id must be 1 to 128 characters")
            from llmroom_cli.options import parse_config

            cfg = parse_config(config or [], config_file)
            if password_stdin and password is not None:
                raise UsageError("give the password once: --password-stdin or --password, not both")
            from llmroom_cli import endpoints

            ep = endpoints.normalize_endpoint(endpoint)
            if advertise is not None:
                endpoints.normalize_endpoint(advertise)
            from llmroom_cli.share import SharePlan, run_share

            plan = SharePlan(
                room,
                hub_url,
                ep,
                nick,
                model=model,
                config=cfg,
                no_specs=no_specs,
                participant_id=participant_id,
                interval_s=interval,
                wait=wait,
                mode=mode,
                advertise=advertise,
                force=force,
                implicit_hub=hub is None,
                direct=direct,
                hub_api=hub_api,
                credentials=_credentials(api_key, header, header_env),
                drain_s=drain,
            )
            if max_concurrent is not None:
                plan.max_concurrent = max_concurrent
            plan.check()
            plan.password = _resolve_password(password_stdin, password)
            return run_share(plan, _CliUI())
        except LlmroomError as exc:
            if mode == "json":
                _emit_json_error(exc.exit_code, exc.message)
            raise

    raise typer.Exit(_run(body, debug))


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


# -- hubs -------------------------------------------------------------------------------------------


@app.command()
def hubs(
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to listen for announcements.", min=0.1)
    ] = 1.5,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Find hubs on the local network (mDNS, _gambiarra._tcp) and check that they answer."""

    def body() -> int:
        import math

        if not math.isfinite(timeout):  # `nan` and `inf` pass typer's min check
            raise UsageError(f"--timeout {timeout}: expected a number of seconds")
        from llmroom_cli.discovery import discover

        found = discover(timeout)
        if json_out:
            _print_json([h.to_json() for h in found])
        else:
            from llmroom_cli.render import print_table

            rows = [
                [
                    h.name,
                    h.url,
                    ", ".join(h.addresses),
                    str(h.txt.get("version", "-")),
                    "yes" if h.healthy else "no",
                    f"{h.rtt_ms:.1f} ms" if h.rtt_ms is not None else "-",
                ]
                for h in found
            ]
            print_table(("NAME", "URL", "ADDRESSES", "VERSION", "ANSWERS", "ROUND TRIP"), rows)
        if not found:
            _err("error: no hub found on the local network (start one with: llmroom serve --mdns)")
            return 5
        return 0

    raise typer.Exit(_run(body, debug))


# -- doctor -----------------------------------------------------------------------------------------


@app.command()
def doctor(
    hub: HubOpt = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            "-e",
            envvar="LLMROOM_ENDPOINT",
            help="Your LLM server (default: search the usual ports).",
        ),
    ] = None,
    advertise: Annotated[
        str | None, typer.Option("--advertise", help="The URL you would publish instead.")
    ] = None,
    api_key: ApiKeyOpt = None,
    header: HeaderOpt = None,
    header_env: HeaderEnvOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One report for bug reports and "why is nobody sending me requests": versions, specs, local
    servers, the hub's reachability, round trip and clock skew, the published address. Exit 0 when all
    is well, else the exit code of the first problem."""

    def body() -> int:
        from llmroom_cli import endpoints
        from llmroom_cli.doctor import build_report

        hub_url = _hub(hub)
        ep = endpoints.normalize_endpoint(endpoint) if endpoint else None
        urls = [hub_url, "http://127.0.0.1", *(u for u in (ep, advertise) if u)]
        credentials = _credentials(api_key, header, header_env)
        report = build_report(_http(*urls), hub_url, ep, advertise=advertise, credentials=credentials)
        if json_out:
            _print_json(report.data)
        else:
            from llmroom_cli.render import print_table

            rows = [
                [c.name, "ok" if c.ok else f"PROBLEM (exit {c.exit_code})", c.detail] for c in report.checks
            ]
            print_table(("CHECK", "STATUS", "DETAIL"), rows, [not c.ok for c in report.checks])
        return report.exit_code()

    raise typer.Exit(_run(body, debug))


# -- demo -------------------------------------------------------------------------------------------


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds to stay in the room.", min=1)] = 15.0,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", "-e", help="Share this real local server instead of the stand-in."),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between heartbeats.", min=0.01)
    ] = 1.0,
    debug: DebugOpt = False,
) -> None:
    """The whole product in one command: an embedded hub, a stand-in LLM, a room, a participant with
    real heartbeats, one chat request through the hub, then leave."""

    def body() -> int:
        from llmroom_cli.demo import run_demo

        return run_demo(duration, endpoint, interval, _CliUI())

    raise typer.Exit(_run(body, debug))


def main() -> None:
    """Console-script entry point; click's multi-line usage errors become one line, exit 2."""
    try:
        from typer._click import exceptions as click_exc  # typer >= 0.28 vendors click
    except ImportError:  # pragma: no cover - older typer on plain click
        from click import exceptions as click_exc  # type: ignore[no-redef,import-not-found,unused-ignore]

    try:
        code = app(prog_name="llmroom", standalone_mode=False)
    except click_exc.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
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
