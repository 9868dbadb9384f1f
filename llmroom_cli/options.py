"""Parsing what the user typed: room codes, hub URLs, generation config. Pure, stdlib only, fast.

Everything here raises UsageError (exit 2) and runs before any network request.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmroom_cli.errors import UsageError

DEFAULT_HUB = "http://localhost:3000"

# The reference hub draws codes from A-Z 0-9 _ - (a code may even start with "-").
_CODE_RE = re.compile(r"[A-Za-z0-9_-]{6}")


def parse_room_code(code: str) -> str:
    """Return the canonical (upper-case) room code, or raise UsageError."""
    text = code.strip()
    if not _CODE_RE.fullmatch(text):
        raise UsageError(
            f"invalid room code {code!r}: a code is 6 characters of A-Z, 0-9, '_' or '-'",
            "a code starting with '-' goes after '--', as in: llmroom join -- -YLUHJ",
        )
    return text.upper()


def redact_url(url: str) -> str:
    """The URL with any `user:password@` replaced by `***@`, for messages."""
    return re.sub(r"(://)[^/@?#]*@", r"\1***@", url)


def refuse_credentials(url: str, what: str) -> None:
    """Credentials in a URL would be echoed in messages and sent to the hub: refuse them, redacted."""
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        raise UsageError(
            f"invalid {what} URL {redact_url(url)!r}: credentials in the URL are not supported",
            "remove the user:password@ part",
        )


def _check_host_port(url: str, what: str) -> tuple[str, str]:
    try:
        parts = urlsplit(url)  # an unclosed IPv6 bracket (`http://[::1`) is a ValueError here
    except ValueError:
        raise UsageError(f"invalid {what} URL {url!r}: expected http(s)://host[:port][/path]") from None
    refuse_credentials(url, what)
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"invalid {what} URL {url!r}: it must start with http:// or https://")
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise UsageError(f"invalid {what} URL {url!r}: expected http(s)://host[:port][/path]")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid {what} URL {url!r}: the port must be a number 1-65535") from None
    if port == 0:
        raise UsageError(f"invalid {what} URL {url!r}: the port must be a number 1-65535")
    if any(ch.isspace() for ch in url):
        raise UsageError(f"invalid {what} URL {url!r}: it contains spaces")
    return parts.scheme, parts.path


def build_url(scheme: str, host: str, port: int | None = None, path: str = "") -> str:
    """The one place a URL is put together from its parts (hubs and LLM endpoints alike): an IPv6
    host gets its brackets, a port only when there is one. Never edit a URL as a string."""
    netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if port is not None:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{path}"


# A hub given as a bare host (`--hub h`, `--hub 10.0.0.5`) is on the reference hub's usual port.
HUB_DEFAULT_PORT = 3000


def normalize_hub_url(url: str) -> str:
    """`host` -> `http://host:3000`, `host:port` -> `http://host:port`; strips trailing slashes.
    Raises UsageError."""
    text = url.strip()
    if not text:
        raise UsageError("the hub URL is empty (use --hub http://HOST:PORT)")
    bare = "://" not in text
    if bare:
        text = "http://" + text
    _check_host_port(text, "hub")
    parts = urlsplit(text)
    port = parts.port
    if bare and port is None:
        port = HUB_DEFAULT_PORT
    host = parts.hostname or ""
    return build_url(parts.scheme.lower(), host, port, parts.path.rstrip("/"))


# OpenAI generation parameters that hub-api.md lists, with their ranges (None: unbounded that side).
_RANGES: dict[str, tuple[type, float | None, float | None]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, None),
    "frequency_penalty": (float, -2.0, 2.0),
    "presence_penalty": (float, -2.0, 2.0),
    "seed": (int, None, None),
}


def _typed_value(key: str, raw: str) -> Any:
    """`0.7` -> 0.7, `2048` -> 2048, `["\\n"]` -> list, `true` -> True; other text stays a string. A value
    that starts like a JSON list, object or string must be valid JSON (a typo is not sent as text)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        if raw.lstrip()[:1] in ("[", "{", '"'):
            raise UsageError(f"invalid --config {key}={raw}: not valid JSON ({exc})") from None
        return raw


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Range-check the known OpenAI parameters; unknown keys pass through unchanged."""
    for key, value in config.items():
        if key == "stop":
            if isinstance(value, str):
                continue
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UsageError(f"config stop={json.dumps(value)}: expected a string or a list of strings")
            continue
        if key not in _RANGES:
            continue
        kind, low, high = _RANGES[key]
        number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not (number_ok and float(value).is_integer()):
            raise UsageError(f"config {key}={json.dumps(value)}: expected an integer")
        if not number_ok or not math.isfinite(float(value)):
            raise UsageError(f"config {key}={json.dumps(value)}: expected a number")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise UsageError(f"config {key}={json.dumps(value)} is out of range ({span})")
        if kind is int:
            config[key] = int(value)
    return config


# Every generation key a hub understands (v0.6 room defaults and participant config: `instructions`
# too); anything else is still sent, as hubs keep it, but likely a typo.
KNOWN_CONFIG_KEYS = (*_RANGES, "stop", "instructions")


def unknown_config_keys(config: dict[str, Any]) -> list[str]:
    """A warning for each key no hub knows, naming the closest known one where there is one."""
    import difflib

    out = []
    for key in config:
        if key in KNOWN_CONFIG_KEYS:
            continue
        close = difflib.get_close_matches(key, KNOWN_CONFIG_KEYS, n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]}?)" if close else ""
        out.append(f"unknown config key {key!r}{guess}; sent anyway")
    return out


def parse_config(
    pairs: list[str], config_file: Path | None = None, warn: Callable[[str], None] | None = None
) -> dict[str, Any] | None:
    """Merge `--config-file` (JSON or TOML) and `--config KEY=VALUE` pairs (pairs win); None if empty.
    `warn` is told of each unknown key (with the closest known one): they are kept and sent."""
    config: dict[str, Any] = {}
    if config_file is not None:
        config.update(_read_config_file(config_file))
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid --config {pair!r}: expected KEY=VALUE, as in temperature=0.7")
        config[key] = _typed_value(key, raw)
    if warn is not None:
        for line in unknown_config_keys(config):
            warn(line)
    return validate_config(config) if config else None


# A generation config is a handful of keys: anything larger is a mistake (or /dev/zero), not a config.
MAX_CONFIG_FILE_BYTES = 1 << 20


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_FILE_BYTES + 1)
        if len(raw) > MAX_CONFIG_FILE_BYTES:
            raise UsageError(f"--config-file {str(path)!r} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --config-file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config-file {str(path)!r} is not UTF-8 text") from None
    data: Any
    if path.suffix.lower() == ".toml":
        try:
            import tomllib  # type: ignore[import-not-found,unused-ignore]
        except ModuleNotFoundError:  # Python 3.10: no tomllib, and tomli is not a dependency
            raise UsageError(
                f"--config-file {str(path)!r}: reading TOML needs Python 3.11 or later", "use a JSON file"
            ) from None
        try:
            data = tomllib.loads(text)
        except RecursionError:
            raise UsageError(f"--config-file {str(path)!r} is nested too deeply") from None
        except ValueError as exc:
            raise UsageError(f"--config-file {str(path)!r} is not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except RecursionError:
            raise UsageError(f"--config-file {str(path)!r} is nested too deeply") from None
        except ValueError as exc:
            raise UsageError(f"--config-file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config-file {str(path)!r} must hold an object of KEY: VALUE")
    return data


# -- credentials for the local LLM server (added by the relay, never sent to the hub) ----------------

# RFC 9110 5.6.2 token characters.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Set by the relay for each connection: a user value would break the request.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"}
)


def _header_name(name: str, option: str) -> str:
    name = name.strip()
    if not _HEADER_NAME_RE.fullmatch(name):
        # The name only: the value may be a secret, and a typo in the name is what the user must see.
        raise UsageError(f"invalid {option}: {name[:40]!r} is not a valid header name")
    if name.lower() in _RESERVED_HEADERS:
        raise UsageError(f"invalid {option}: the {name} header cannot be set (the relay sets it)")
    return name


def _header_value(name: str, value: str, option: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise UsageError(f"invalid {option} {name}: the value contains a line break or NUL")
    return value


def parse_headers(pairs: list[str], env_pairs: list[str], api_key: str | None) -> dict[str, str]:
    """The headers the relay adds to every request to the local server.

    `pairs`: `--header NAME=VALUE`; `env_pairs`: `--header-env NAME=ENVVAR` (the value read from the
    environment, so it stays out of the process list); `api_key`: `--api-key` / LLMROOM_API_KEY, sent
    as `Authorization: Bearer KEY`. Raises UsageError (exit 2); a message never contains a value.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}

    def put(name: str, value: str, option: str) -> None:
        low = name.lower()
        if low in seen:
            raise UsageError(f"invalid {option}: the {name} header is given twice (also by {seen[low]})")
        seen[low] = option
        out[name] = value

    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError("invalid --header: expected NAME=VALUE, as in --header X-Org=acme")
        name = _header_name(name, "--header")
        put(name, _header_value(name, value, "--header"), "--header")
    for pair in env_pairs:
        name, sep, var = pair.partition("=")
        var = var.strip()
        if not sep or not name.strip() or not var:
            raise UsageError(
                "invalid --header-env: expected NAME=ENVVAR, as in --header-env X-Token=MY_TOKEN"
            )
        name = _header_name(name, "--header-env")
        env_value = os.environ.get(var)
        if env_value is None:
            raise UsageError(f"invalid --header-env {name}: the environment variable {var} is not set")
        put(name, _header_value(name, env_value, "--header-env"), "--header-env")
    if api_key is not None:
        key = api_key.strip()
        if not key:
            raise UsageError("the API key is empty (--api-key or LLMROOM_API_KEY)")
        put("Authorization", _header_value("API key", key, "--api-key"), "--api-key")
        out["Authorization"] = f"Bearer {key}"
    return out


def room_api_url(hub_url: str, code: str) -> str:
    """The room's OpenAI-compatible base URL: `http://HUB/rooms/CODE/v1` (both hub generations)."""
    return f"{hub_url.rstrip('/')}/rooms/{code}/v1"


def curl_example(hub_url: str, code: str) -> str:
    """A copy-paste request to the room: any participant answers (`"model": "*"`)."""
    body = '{"model": "*", "messages": [{"role": "user", "content": "Hello!"}]}'
    return (
        f"curl {room_api_url(hub_url, code)}/chat/completions -H 'Content-Type: application/json' -d '{body}'"
    )


# -- the user's config file -------------------------------------------------------------------------

USER_CONFIG_KEYS = ("hub", "endpoint", "nickname", "model")


def user_config_path() -> Path:
    """`$XDG_CONFIG_HOME/llmroom/config.toml` (`~/.config/llmroom/config.toml` without XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "llmroom" / "config.toml"


def load_user_config(path: Path | None = None, warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """The defaults the user wrote in the config file (`hub`, `endpoint`, `nickname`, `model`), for the
    options neither a flag nor an LLMROOM_* variable set (those take precedence: the caller decides).

    No file: {}. A file that is not TOML, or a value that is not text: UsageError (exit 2), naming the
    file. Unknown keys are ignored, with a warning naming the closest known one. On Python 3.10 (no
    tomllib, and no tomli to lean on) the file is skipped with a warning rather than half-parsed."""
    import difflib

    path = path or user_config_path()
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_FILE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):  # a file where the directory would be: no file
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read the config file {str(path)!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise UsageError(f"the config file {str(path)!r} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB")
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:  # Python 3.10
        if warn is not None:
            warn(f"{path} skipped: reading TOML needs Python 3.11 or later")
        return {}
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"the config file {str(path)!r} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"the config file {str(path)!r} is not valid TOML: {exc}") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in USER_CONFIG_KEYS:
            if warn is not None:
                close = difflib.get_close_matches(key, USER_CONFIG_KEYS, n=1, cutoff=0.6)
                guess = f" (did you mean {close[0]}?)" if close else ""
                warn(f"{path}: unknown key {key!r}{guess}; ignored")
            continue
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"the config file {str(path)!r}: {key} must be a non-empty string")
        out[key] = value.strip()
    return out
