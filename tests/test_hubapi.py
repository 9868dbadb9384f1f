"""The generation-neutral Hub facade: unit tests over httpx.MockTransport, and both real hubs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.errors import HubProtocolError, HubUnavailable, RoomNotFound, UsageError
from llmroom_cli.hub import RunningHub
from llmroom_cli.hubapi import Hub, answers, generation_label, open_hub
from llmroom_cli.protocols.generation import clear_cache
from tests.fake_gambi_v06 import FakeGambiV06

BASE = "http://hub.test:3000"


@pytest.fixture(autouse=True)
def _fresh_probe_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def _http(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def _v06_only(seen: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        path = request.url.path
        if path == "/v1/health":
            return httpx.Response(200, json={"data": {"status": "ok", "timestamp": 1}, "meta": {}})
        if path == "/v1/rooms" and request.method == "GET":
            return httpx.Response(200, json={"data": [{"code": "ABC123", "name": "R"}], "meta": {}})
        if path == "/v1/rooms" and request.method == "POST":
            sent = json.loads(request.content)
            return httpx.Response(201, json={"data": {"room": {"code": "ABC123", **sent}}, "meta": {}})
        if path == "/v1/rooms/ABC123/participants":
            return httpx.Response(200, json={"data": [{"id": "p1", "connection": {"kind": "tunnel"}}]})
        if path == "/v1/rooms/ABC123/participants/p1" and request.method == "DELETE":
            return httpx.Response(200, json={"data": {"success": True}})
        err = {"code": "INVALID_REQUEST", "message": "Route not found.", "hint": "Check the path."}
        return httpx.Response(404, json={"error": err, "meta": {}})

    return handler


def test_a_v06_hub_is_spoken_to_through_v1_in_v01_shapes() -> None:
    seen: list[str] = []
    hub = open_hub(_http(_v06_only(seen)), BASE)
    assert (hub.generation, hub.label) == ("v0.6", "v0.6")
    assert hub.rooms_body() == {"rooms": [{"code": "ABC123", "name": "R"}]}
    assert hub.participants("ABC123")[0]["id"] == "p1"
    room = hub.create_room("R", "pw", {"temperature": 0.3})
    assert room["room"] == {"code": "ABC123", "name": "R", "password": "pw", "defaults": {"temperature": 0.3}}
    hub.leave("ABC123", "p1")
    assert not [s for s in seen if not s.split(" ")[1].startswith("/v1/") and s != "GET /health"]


def test_the_generation_is_probed_once_per_run() -> None:
    seen: list[str] = []
    http = _http(_v06_only(seen))
    open_hub(http, BASE)
    open_hub(http, BASE)
    assert seen.count("GET /v1/health") == 1


def test_a_forced_generation_skips_the_probe_and_a_bad_one_is_a_usage_error() -> None:
    seen: list[str] = []
    hub = open_hub(_http(_v06_only(seen)), BASE, "v0.1")
    assert hub.generation == "v0.1" and seen == []
    with pytest.raises(UsageError):
        open_hub(_http(_v06_only(seen)), BASE, "v9")


def test_v01_hubs_have_no_room_defaults() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "ok"})

    hub = Hub(_http(handler), BASE, "v0.1")
    with pytest.raises(UsageError, match="no room defaults"):
        hub.create_room("R", None, {"temperature": 0.3})


def test_nothing_listening_is_unavailable_with_the_start_hint_and_answers_false() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(HubUnavailable) as info:
        open_hub(_http(handler), BASE)
    assert info.value.hint is not None and "llmroom serve" in info.value.hint
    assert answers(_http(handler), BASE) is False


def test_something_that_is_not_a_hub_is_a_protocol_error_not_a_missing_hub() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>router</html>")

    with pytest.raises(HubProtocolError):
        open_hub(_http(handler), BASE)
    # For the LAN fallback, a web page on the default :3000 (a dev server) is no hub: look elsewhere.
    assert answers(_http(handler), BASE) is False


def _sse(frames: list[tuple[str, Any]]) -> bytes:
    return b"".join(f"event: {e}\ndata: {json.dumps(d)}\n\n".encode() for e, d in frames)


def test_v06_events_come_from_v1_and_are_unwrapped_to_the_v01_shape() -> None:
    frames = [
        ("connected", {"type": "connected", "timestamp": 1, "roomCode": "ABC123", "data": {"clientId": "c"}}),
        (
            "participant.left",
            {
                "type": "participant.left",
                "timestamp": 2,
                "roomCode": "ABC123",
                "data": {"participantId": "p"},
            },
        ),
    ]
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, content=_sse(frames), headers={"content-type": "text/event-stream"})

    hub = Hub(_http(handler), BASE, "v0.6")
    assert list(hub.events("ABC123")) == [
        ("connected", {"clientId": "c"}),
        ("participant.left", {"participantId": "p"}),
    ]
    assert paths == ["/v1/rooms/ABC123/events"]


def test_an_event_stream_for_a_missing_room_is_room_not_found_with_the_hubs_hint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"code": "ROOM_NOT_FOUND", "message": "Room not found.", "hint": "Run 'gambi room list'."}
        return httpx.Response(404, json={"error": err, "meta": {}})

    with pytest.raises(RoomNotFound) as info:
        list(Hub(_http(handler), BASE, "v0.6").events("ABC123"))
    assert info.value.hint == "Run 'gambi room list'."


def test_a_silent_event_stream_raises_so_the_watcher_reconnects() -> None:
    class Silent(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"event: connected\ndata: {}\n\n"
            raise httpx.ReadTimeout("silence")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Silent(), headers={"content-type": "text/event-stream"})

    events = Hub(_http(handler), BASE, "v0.6").events("ABC123", silence_s=0.5)
    assert next(events) == ("connected", {})
    with pytest.raises(HubUnavailable, match="no event for 0.5 s"):
        next(events)


def test_generation_labels() -> None:
    assert [generation_label(g) for g in ("v0.1", "v0.6", "both")] == ["v0.1", "v0.6", "v0.1 + v0.6"]


def test_against_our_hub_and_the_fake_reference(hub: RunningHub) -> None:
    with httpx.Client(trust_env=False) as http:
        ours = open_hub(http, hub.url)
        assert (ours.generation, ours.detected) == ("v0.6", "both")
        assert open_hub(http, hub.url, "v0.1").generation == "v0.1"
        with FakeGambiV06() as fake:
            ref = open_hub(http, fake.url)
            assert (ref.generation, ref.detected) == ("v0.6", "v0.6")
            code = ref.create_room("R")["room"]["code"]
            assert ref.participants(code) == []
            with pytest.raises(RoomNotFound):
                ref.participants("ZZZZZZ")
            assert answers(http, fake.url) is True
            # Forced to v0.1, the reference hub is not a hub: its /health is 404.
            with pytest.raises(HubProtocolError):
                Hub(http, fake.url, "v0.1").rooms_body()


def test_a_big_v06_room_lists_past_a_single_calls_bound() -> None:
    # 6,000 participants of ~1 KiB: more than the 4 MiB a single management call may read.
    parts = [{"id": f"p{i}", "nickname": "n" * 1000} for i in range(6000)]
    raw = json.dumps({"data": parts, "meta": {}}).encode()
    assert len(raw) > 4 * 1024 * 1024

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=raw, headers={"content-type": "application/json"})

    assert len(Hub(_http(handler), BASE, "v0.6").participants("ABC123")) == 6000
