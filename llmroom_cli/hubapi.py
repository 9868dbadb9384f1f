"""One face for both hub generations: the commands other than `join` talk to a `Hub` and never care
whether a v0.1 hub (`HubClient`) or a v0.6 hub (`V06Client`) answers.

The generation is detected once per run (`protocols.generation.detect_generation`, cached) unless
`--hub-api` forces it. A hub that speaks both (llmroom's own) is spoken to through v0.6, the current
generation. Answers come back in the v0.1 shapes (`{"rooms": [...]}`, `{"participants": [...]}`), so the
tables, the piped output and `--json` keep one shape whichever hub answered; a v0.6 participant keeps
its extra keys (`connection`: the tunnel state).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmroom_cli.errors import HubProtocolError, HubUnavailable

if TYPE_CHECKING:
    import httpx

    from llmroom_cli.client import HubClient
    from llmroom_cli.protocols.v06 import V06Client

HUB_APIS = ("v0.1", "v0.6")
START_HINT = "is the hub running? start one with: llmroom serve"


def generation_label(detected: str) -> str:
    """How a detected generation is shown: "v0.1", "v0.6", or "v0.1 + v0.6" for a hub speaking both."""
    return "v0.1 + v0.6" if detected == "both" else detected


class Hub:
    """The hub at `base_url`, through the client of its `generation` ("v0.1" or "v0.6").

    `detected` is what the probe found ("v0.1", "v0.6" or "both"; the forced value under --hub-api)."""

    def __init__(
        self, http: httpx.Client, base_url: str, generation: str, detected: str | None = None
    ) -> None:
        from llmroom_cli.client import HubClient

        self.base_url = base_url.rstrip("/")
        self.generation = generation
        self.detected = detected or generation
        self.v01: HubClient = HubClient(http, self.base_url)
        self.v06: V06Client | None = None
        self._v06_lists: V06Client | None = None
        if generation == "v0.6":
            from llmroom_cli.client import LIST_CAP_BYTES, LIST_DEADLINE_S
            from llmroom_cli.protocols.v06 import V06Client

            self.v06 = V06Client(http, self.base_url)
            # Listings grow with the room (10,000 participants are ~10 MB): the same bound and deadline
            # as on v0.1, not the small ones of a single management call.
            self._v06_lists = V06Client(
                http, self.base_url, timeout_s=LIST_DEADLINE_S, max_bytes=LIST_CAP_BYTES
            )

    @property
    def label(self) -> str:
        """The generation as shown to a person (`doctor`, `hubs`, `--debug`)."""
        return generation_label(self.detected)

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The health body (`status`, and `timestamp` in ms where the hub stamps it)."""
        if self.v06 is not None:
            return self.v06.health(timeout_s)
        return self.v01.health(timeout_s)

    def create_room(
        self, name: str, password: str | None = None, defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`{"room": {..., "code": ...}, ...}`. v0.1 hubs have no room defaults: asking for some there
        is an error rather than a room created without them."""
        if self.v06 is not None:
            return self.v06.create_room(name, password, defaults)
        if defaults:
            from llmroom_cli.errors import UsageError

            raise UsageError(
                f"the hub at {self.base_url} speaks v0.1, which has no room defaults",
                "drop -c/--config-file, or use a v0.6 hub",
            )
        return self.v01.create_room(name, password)

    def rooms_body(self) -> dict[str, Any]:
        """`{"rooms": [room summary, ...]}` on both generations."""
        if self._v06_lists is not None:
            return {"rooms": self._v06_lists.list_rooms()}
        return self.v01.rooms_body()

    def participants_body(self, code: str) -> dict[str, Any]:
        """`{"participants": [participant, ...]}` on both generations."""
        if self._v06_lists is not None:
            return {"participants": self._v06_lists.participants(code)}
        return self.v01.participants_body(code)

    def participants(self, code: str) -> list[dict[str, Any]]:
        """The room's participants (RoomNotFound when there is no such room)."""
        parts: list[dict[str, Any]] = self.participants_body(code)["participants"]
        return parts

    def leave(self, code: str, participant_id: str, timeout_s: float | None = None) -> None:
        """Remove a participant; ParticipantNotFound when the hub does not list it."""
        if self.v06 is not None:
            self.v06.delete(code, participant_id, timeout_s)
        else:
            self.v01.leave(code, participant_id, timeout_s)

    def events(self, code: str, silence_s: float | None = None) -> Iterator[tuple[str, Any]]:
        """The room's event stream, (event, data) until it ends. On v0.6 it is `/v1/rooms/:code/events`
        and each frame's `{"type", "timestamp", "roomCode", "data"}` is unwrapped to its `data`, so the
        caller sees the v0.1 shape. A v0.6 hub cuts a quiet stream after ~10 s, and one silent for
        `silence_s` raises HubUnavailable: callers reconnect."""
        if self.v06 is None:
            yield from self.v01.events(code, silence_s=silence_s)
            return
        for event, data in self.v01.events(code, prefix="/v1", silence_s=silence_s):
            if isinstance(data, dict) and "type" in data and "data" in data:
                data = data["data"]
            yield event, data


def open_hub(http: httpx.Client, hub_url: str, forced: str | None = None) -> Hub:
    """The hub at `hub_url`, its generation probed once per run (or `forced`: "v0.1"/"v0.6").

    Raises HubUnavailable when nothing answers, HubProtocolError when what answers is no hub."""
    from llmroom_cli.protocols.generation import detect_generation

    try:
        found = detect_generation(http, hub_url, forced)
    except HubProtocolError:
        raise
    except HubUnavailable as exc:
        raise HubUnavailable(exc.message, exc.hint or START_HINT) from exc
    return Hub(http, hub_url, "v0.1" if found == "v0.1" else "v0.6", found)


def answers(http: httpx.Client, hub_url: str, forced: str | None = None, timeout_s: float = 1.0) -> bool:
    """True when a hub (of either generation, or of the `forced` one) answers at `hub_url` within
    `timeout_s`. Something that answers but is no hub is False too: the default :3000 is a common
    port for other development servers, and the LAN fallback is then what the user wants."""
    from llmroom_cli.protocols.generation import detect_generation

    try:
        found = detect_generation(http, hub_url, forced, timeout_s=timeout_s)
        if forced is not None:
            Hub(http, hub_url, found).health(timeout_s)
    except HubUnavailable:
        return False
    return True
