"""One exception tree for llmroom; each class carries the exit code the CLI maps it to.

    LlmroomError (1)            anything unexpected that the core still understood
    ├── UsageError (2)          bad option, room code, URL or config: raised before any request
    ├── RoomNotFound (3)        the hub has no such room (or it is gone: a restarted hub has no rooms)
    ├── InvalidPassword (4)     the room is protected and the password is missing or wrong
    ├── HubUnavailable (5)      the hub cannot be reached, timed out, or does not speak the hub API
    │   └── HubProtocolError (5)  it answered, but with HTML, non-JSON or an unexpected shape
    ├── HubRejected (1)         the hub refused a request for another reason (400, 405, 413 ...)
    │   └── ParticipantNotFound (1)  the hub forgot this participant (the agent rejoins)
    └── EndpointError (6)       the local LLM server: unreachable, no such model, still loading ...

The core raises these and never prints; `cli.py` turns them into one line on stderr and the exit code.
"""

from __future__ import annotations

import re


class LlmroomError(Exception):
    """Base class: a failure llmroom understood; `hint` says what the user can do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(LlmroomError):
    """A bad option, room code, URL or config value, found before any network request."""

    exit_code = 2


class RoomNotFound(LlmroomError):
    """The hub has no room with this code (a restarted hub has no rooms)."""

    exit_code = 3


class InvalidPassword(LlmroomError):
    """The room is protected and the password was missing or wrong."""

    exit_code = 4


class HubUnavailable(LlmroomError):
    """The hub could not be reached or did not answer in time."""

    exit_code = 5


class HubProtocolError(HubUnavailable):
    """Something answered, but not as a hub: HTML, non-JSON, or JSON of an unexpected shape."""


class HubRejected(LlmroomError):
    """The hub answered a request with an error not covered by a more specific class."""

    def __init__(self, message: str, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class ParticipantNotFound(HubRejected):
    """The hub does not know this participant (it forgot it, or it already left)."""


class EndpointError(LlmroomError):
    """The local LLM server is unreachable, lacks the model, is still loading, or is ambiguous."""

    exit_code = 6


# -- OS errors in words ----------------------------------------------------------------------------

# "[Errno 111] Connection refused" / "[Errno -2] Name or service not known": what the socket layer
# says, which a person should not have to decode.
_ERRNO_TEXT = re.compile(r"\[Errno (-?\d+)\]")


def describe_os_error(exc: BaseException, host: str | None = None, port: int | None = None) -> str:
    """What went wrong on the network, in words: "nothing listens on 127.0.0.1:3000", "no such host:
    hubb.local", "no answer from 10.0.0.5:8080 in time", "network unreachable", a TLS failure with its
    reason. `exc` may be an OSError, an ssl error, or a library error (httpx, httpcore) wrapping one:
    the chain of causes is searched, then the message itself. `host`/`port` name the far end where
    the error does not. Unknown errors keep their own message, without the "[Errno N]" prefix."""
    # socket and ssl are imported here: errors.py is loaded by `llmroom --help` (they cost ~10 ms).
    import socket
    import ssl

    where = _where(host, port)
    name = host or "the host"
    for err in _chain(exc):
        if isinstance(err, ssl.SSLCertVerificationError):
            reason = getattr(err, "verify_message", None) or getattr(err, "reason", None) or "unknown reason"
            return f"the TLS certificate of {name} could not be verified ({reason})"
        if isinstance(err, ssl.SSLError):
            # `reason` is set on errors from the ssl module itself, not on hand-made ones.
            said = str(getattr(err, "reason", None) or err)
            key = said.lower().replace("_", " ")  # WRONG_VERSION_NUMBER, or the long message
            if "wrong version number" in key or "record layer failure" in key or "http request" in key:
                return f"{where} does not speak TLS (is the URL http:// rather than https://?)"
            return f"the TLS handshake with {where} failed ({said})"
        if isinstance(err, socket.gaierror):
            return _gai_words(err.errno, name)
        if isinstance(err, (TimeoutError, socket.timeout)):
            return f"no answer from {where} in time"
        if isinstance(err, OSError) and err.errno is not None:
            words = _errno_words(err.errno, where, name)
            if words:
                return words
    text = str(exc) or type(exc).__name__
    found = _ERRNO_TEXT.search(text)
    if found:
        code = int(found.group(1))
        words = _gai_words(code, name) if code < 0 else _errno_words(code, where, name)
        if words:
            return words
        return _ERRNO_TEXT.sub("", text).strip() or text
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in type(exc).__name__.lower():
        return f"no answer from {where} in time"
    if "server disconnected" in lowered or "connection closed" in lowered:
        return f"{where} closed the connection without answering"
    return text


def _where(host: str | None, port: int | None) -> str:
    if not host:
        return "the far end"
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{shown}:{port}" if port is not None else shown


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, most specific (deepest) first; a cycle ends the walk."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return list(reversed(seen))


def _gai_words(code: int | None, name: str) -> str:
    import socket

    if code == getattr(socket, "EAI_AGAIN", -3):
        return f"cannot look up {name} now (temporary name resolution failure)"
    return f"no such host: {name}"


def _errno_words(code: int, where: str, name: str) -> str | None:
    import errno

    words = {
        errno.ECONNREFUSED: f"nothing listens on {where}",
        errno.ETIMEDOUT: f"no answer from {where} in time",
        errno.ENETUNREACH: f"network unreachable: no route to the network of {name}",
        errno.EHOSTUNREACH: f"no route to host {name}",
        errno.EHOSTDOWN: f"host {name} is down",
        errno.ECONNRESET: f"{where} reset the connection",
        errno.ECONNABORTED: f"the connection to {where} was aborted",
        errno.EPIPE: f"{where} closed the connection",
        errno.EADDRNOTAVAIL: f"cannot connect to {where} from this machine (address not available)",
        errno.ENETDOWN: "the network is down",
        errno.EACCES: f"not allowed to connect to {where} (a firewall rule?)",
        errno.EPERM: f"not allowed to connect to {where} (a firewall rule?)",
    }
    return words.get(code)
