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
