"""The Gambi v0.6 contract (gambi-v06-api.md sections 3 to 7) as executable cases, from both sides.

Each case runs against two hubs:
- `fake-reference`: tests/fake_gambi_v06.py, the reference hub's observed behaviour, quirks included;
- `llmroom`: `llmroom_cli.hub.start_hub` (skipped until that package exists).

The client is tests/v06_wire.py (httpx, websockets), never llmroom's own client code. The test plays
the participant through a real tunnel and the inference client over real HTTP. Timing is never asserted:
conditions are awaited with a deadline; liveness timeouts are set short through the hub's settings.

Markers in the names: `reference_quirk` cases assert what only the reference does (llmroom may differ);
`llmroom_only` cases are where the reference is known fragile (it crashes, or answers HTML) and ours must
do better.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_gambi_v06 import FakeGambiV06
from tests.helpers import wait_for
from tests.v06_wire import (
    PARTICIPANT,
    Answer,
    EventReader,
    Exchange,
    Inference,
    Mgmt,
    TunnelPeer,
    parse_recording,
    parse_timeline,
)

FIXTURES = Path(__file__).parent / "fixtures" / "gambi-v06"
ROUTE_NOT_FOUND = {
    "code": "INVALID_REQUEST",
    "message": "Route not found.",
    "hint": "Check the requested path and HTTP method.",
}
PARTICIPANT_KEYS = {
    "id",
    "nickname",
    "model",
    "endpoint",
    "config",
    "specs",
    "capabilities",
    "connection",
    "status",
    "joinedAt",
    "lastSeen",
    "updatedAt",
}
ROOM_KEYS = {"id", "code", "name", "hostId", "createdAt", "passwordProtected", "participantCount"}
CODE_RE = re.compile(r"^[A-Z0-9_-]{6}$")
# Short liveness settings so that no case waits 30 s (names as FakeGambiV06 takes them).
FAST = {"tunnel_timeout_s": 0.6, "participant_timeout_s": 0.6, "sweep_interval_s": 0.1}
CHAT_DOC = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "fake-model",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello from fake"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}
SSE_HEADERS = {"content-type": "text/event-stream"}


@dataclass
class Hub:
    """A hub under test: its URL, how to stop it, and the fake's controls when it is the fake."""

    kind: str
    url: str
    stop: Callable[[], None]
    fake: FakeGambiV06 | None = None


HubFactory = Callable[..., Hub]
# The fake's setting names -> other names llmroom's hub may give them (a start_hub argument, or a field
# of its `Limits`): the first one found is used.
LLMROOM_ALIASES = {
    "tunnel_timeout_s": ("tunnel_timeout_s", "tunnel_silence_s"),
    "sweep_interval_s": ("sweep_interval_s", "tunnel_sweep_s"),
    "token_ttl_s": ("token_ttl_s", "tunnel_token_ttl_s"),
    "participant_timeout_s": ("participant_timeout_s",),
    "client_idle_timeout_s": ("client_idle_timeout_s",),
}


def _llmroom_settings(hub_mod: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """start_hub keyword arguments for the fake's settings, or skip when the hub has no such knob."""
    params = inspect.signature(hub_mod.start_hub).parameters
    limits_cls = getattr(hub_mod, "Limits", None)
    if limits_cls is None:
        limits_mod = getattr(hub_mod, "limits", None)
        limits_cls = getattr(limits_mod, "Limits", None)
    limit_fields = set(inspect.signature(limits_cls).parameters) if limits_cls is not None else set()
    kwargs: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for name, value in settings.items():
        for alias in LLMROOM_ALIASES.get(name, (name,)):
            if alias in params and alias != "limits":
                kwargs[alias] = value
                break
            if alias in limit_fields and "limits" in params:
                limits[alias] = value
                break
        else:
            pytest.skip(f"llmroom_cli.hub.start_hub has no setting for {name}")
    if limits:
        kwargs["limits"] = limits_cls(**limits)  # type: ignore[misc]
    return kwargs


@pytest.fixture(params=["fake-reference", "llmroom"])
def make_hub(request: pytest.FixtureRequest) -> Iterator[HubFactory]:
    """Start a hub of the param's kind with the given settings; every hub is stopped at teardown."""
    stops: list[Callable[[], None]] = []
    kind = str(request.param)

    def make(**settings: Any) -> Hub:
        if kind == "fake-reference":
            fake = FakeGambiV06(**settings).start()
            stops.append(fake.stop)
            return Hub(kind, fake.url, fake.stop, fake)
        hub_mod = pytest.importorskip("llmroom_cli.hub")
        kwargs = _llmroom_settings(hub_mod, settings)
        running = hub_mod.start_hub(port=0, **kwargs)
        stops.append(running.stop)
        return Hub(kind, str(running.url), running.stop)

    yield make
    for stop in reversed(stops):
        stop()


@pytest.fixture
def hub(make_hub: HubFactory) -> Hub:
    return make_hub()


@pytest.fixture
def mgmt(hub: Hub) -> Iterator[Mgmt]:
    with Mgmt(hub.url) as client:
        yield client


@pytest.fixture
def inference(hub: Hub) -> Iterator[Inference]:
    with Inference(hub.url) as client:
        yield client


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Client calls that must run while the test answers them as the participant."""
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


@pytest.fixture
def peers() -> Iterator[list[TunnelPeer]]:
    opened: list[TunnelPeer] = []
    yield opened
    for peer in opened:
        if not peer.closed:
            peer.close()


def online(mgmt: Mgmt, peers: list[TunnelPeer], code: str, pid: str = "p1", **put: Any) -> TunnelPeer:
    """Register, open the tunnel, heartbeat: the participant is routable."""
    _url, token = mgmt.register(code, pid, **put)
    peer = TunnelPeer.open(mgmt.tunnel_url(code, pid, token))
    peers.append(peer)
    hb = mgmt.heartbeat(code, pid)
    assert hb.status == 200 and hb.data["status"] == "online", hb.body
    return peer


def only_fake(hub: Hub) -> FakeGambiV06:
    if hub.fake is None:
        pytest.skip("a reference quirk: llmroom's hub may differ")
    return hub.fake


def only_llmroom(hub: Hub) -> None:
    if hub.fake is not None:
        pytest.skip("the reference is known fragile here (gambi-v06-api.md section 7)")


def assert_json_answer(a: Answer) -> None:
    assert a.headers["content-type"].replace(" ", "").lower().startswith("application/json"), a.headers


# ---- 3. envelopes and management routes --------------------------------------------------------------


def test_health_is_an_envelope_with_a_request_id(hub: Hub, mgmt: Mgmt) -> None:
    a = mgmt.health()
    assert a.status == 200
    assert_json_answer(a)
    if hub.fake is not None:  # ours decides its own cross-origin policy (issue 11)
        assert a.headers["access-control-allow-origin"] == "*"
    assert a.data["status"] == "ok" and isinstance(a.data["timestamp"], int)
    assert mgmt.health().json()["meta"]["requestId"] != a.json()["meta"]["requestId"]


def test_create_room_answers_201_with_the_room_and_host_id(mgmt: Mgmt) -> None:
    a = mgmt.call("POST", "/v1/rooms", {"name": "Open Room"})
    assert a.status == 201, a.body
    room = a.data["room"]
    assert set(room) >= ROOM_KEYS
    assert CODE_RE.match(room["code"]), room["code"]
    assert room["name"] == "Open Room" and room["passwordProtected"] is False
    assert room["participantCount"] == 0 and a.data["hostId"] == room["hostId"]


def test_rooms_are_listed_and_found_case_insensitively(mgmt: Mgmt) -> None:
    code = mgmt.create_room("Listed")
    listed = mgmt.rooms()
    assert listed.status == 200 and code in [r["code"] for r in listed.data]
    for spelled in (code, code.lower()):
        a = mgmt.room(spelled)
        assert a.status == 200 and a.data["code"] == code and set(a.data) >= ROOM_KEYS


def test_unknown_room_is_room_not_found_on_every_room_route(mgmt: Mgmt) -> None:
    for method, path in [
        ("GET", "/v1/rooms/ZZZZZZ"),
        ("GET", "/v1/rooms/ZZZZZZ/participants"),
        ("POST", "/v1/rooms/ZZZZZZ/participants/p1/heartbeat"),
        ("DELETE", "/v1/rooms/ZZZZZZ/participants/p1"),
    ]:
        a = mgmt.call(method, path)
        assert a.status == 404, (method, path, a.body)
        assert a.error["code"] == "ROOM_NOT_FOUND", (method, path)
    a = mgmt.put("ZZZZZZ", "p1")
    assert a.status == 404 and a.error["code"] == "ROOM_NOT_FOUND"


def test_create_room_errors_are_invalid_request_envelopes(mgmt: Mgmt) -> None:
    a = mgmt.call("POST", "/v1/rooms", {})
    assert a.status == 400 and a.error["code"] == "INVALID_REQUEST"
    a = mgmt.call("POST", "/v1/rooms", raw=b"{")
    assert a.status == 400 and a.error["code"] == "INVALID_REQUEST"
    assert a.error["message"] == "Invalid JSON body."
    a = mgmt.call("POST", "/v1/rooms", {"name": "Bad", "defaults": {"temperature": 5}})
    assert a.status == 400 and a.error["code"] == "INVALID_REQUEST"
    assert "temperature" in a.error["details"]["fieldErrors"]


def test_room_defaults_are_shown_with_has_instructions_never_the_text(mgmt: Mgmt) -> None:
    defaults = {"temperature": 0.3, "max_tokens": 64, "instructions": "Answer briefly."}
    a = mgmt.call("POST", "/v1/rooms", {"name": "Defaults Room", "defaults": defaults})
    assert a.status == 201, a.body
    shown = a.data["room"]["defaults"]
    assert shown == {"temperature": 0.3, "max_tokens": 64, "hasInstructions": True}
    assert "Answer briefly." not in a.body.decode()


def test_password_room_refuses_a_missing_or_wrong_password(mgmt: Mgmt) -> None:
    a = mgmt.call("POST", "/v1/rooms", {"name": "Locked Room", "password": "s3cret"})
    assert a.status == 201 and a.data["room"]["passwordProtected"] is True
    code = a.data["room"]["code"]
    for extra in ({}, {"password": "wrong"}):
        refused = mgmt.put(code, "pl", **extra)
        assert refused.status == 401, refused.body
        assert refused.error["code"] == "INVALID_PASSWORD"
    assert mgmt.put(code, "pl", password="s3cret").status == 201
    assert "s3cret" not in mgmt.participants(code).body.decode()


def test_put_creates_with_201_then_updates_with_200_keeping_joined_at(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    first = mgmt.put(code, "p1")
    assert first.status == 201, first.body
    assert_json_answer(first)
    second = mgmt.put(code, "p1", nickname="renamed")
    assert second.status == 200, second.body
    p1, p2 = first.data["participant"], second.data["participant"]
    assert p2["nickname"] == "renamed" and p2["joinedAt"] == p1["joinedAt"]
    assert p2["updatedAt"] >= p1["updatedAt"]
    assert [p["id"] for p in mgmt.participants(code).data] == ["p1"]
    for a in (first, second):
        tunnel = a.data["tunnel"]
        uuid.UUID(tunnel["token"])
        assert tunnel["url"].startswith("ws://")
        assert tunnel["url"].endswith(f"/v1/rooms/{code}/participants/p1/tunnel")
    assert first.data["tunnel"]["token"] != second.data["tunnel"]["token"]
    assert isinstance(first.data["roomId"], str)


def test_put_answer_has_the_public_participant_shape(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    a = mgmt.put(
        code, "pmin", {"nickname": "min", "model": "fake-model", "endpoint": "http://127.0.0.1:40111"}
    )
    assert a.status == 201, a.body
    p = a.data["participant"]
    assert set(p) == PARTICIPANT_KEYS
    assert p["capabilities"] == {"openResponses": "unknown", "chatCompletions": "unknown"}
    assert p["connection"] == {"kind": "tunnel", "connected": False, "lastTunnelSeenAt": None}
    assert p["config"] == {"hasInstructions": False} and p["specs"] == {}
    assert p["status"] == "offline"


def test_path_id_wins_and_unknown_keys_are_dropped(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    body = {
        **PARTICIPANT,
        "id": "someone-else",
        "status": "online",
        "foo": "bar",
        "specs": {"cpu": "Test CPU", "ram": 16, "npu": "x"},
        "config": {"temperature": 0.7, "weird": 1},
    }
    a = mgmt.put(code, "p1", body)
    assert a.status == 201, a.body
    p = a.data["participant"]
    assert p["id"] == "p1" and "foo" not in p and p["status"] == "offline"
    assert p["specs"] == {"cpu": "Test CPU", "ram": 16}
    assert p["config"] == {"temperature": 0.7, "hasInstructions": False}
    assert mgmt.participant(code, "someone-else") is None


def test_instructions_become_has_instructions(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    a = mgmt.put(code, "p1")
    assert a.data["participant"]["config"] == {"temperature": 0.7, "hasInstructions": True}
    assert "You are a test." not in a.body.decode()
    assert "You are a test." not in mgmt.participants(code).body.decode()


@pytest.mark.parametrize(
    ("body", "detail_key"),
    [
        ({}, "required"),
        ({**PARTICIPANT, "authHeaders": {"Authorization": "Bearer x"}}, "forbidden"),
        ({**PARTICIPANT, "endpoint": "not a url"}, "fieldErrors"),
        ({**PARTICIPANT, "capabilities": {"openResponses": "maybe"}}, "fieldErrors"),
        ({**PARTICIPANT, "config": {"temperature": 5}}, "fieldErrors"),
    ],
    ids=["missing-fields", "auth-headers", "endpoint-not-url", "capability-enum", "config-range"],
)
def test_put_refuses_bad_registrations_with_details(
    mgmt: Mgmt, body: dict[str, Any], detail_key: str
) -> None:
    code = mgmt.create_room()
    a = mgmt.put(code, "p1", body)
    assert a.status == 400, a.body
    assert a.error["code"] == "INVALID_REQUEST"
    assert detail_key in a.error["details"], a.error
    assert "Bearer x" not in a.body.decode()
    assert mgmt.participant(code, "p1") is None


def test_put_with_invalid_json_is_400(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    a = mgmt.call("PUT", f"/v1/rooms/{code}/participants/p1", raw=b"{")
    assert a.status == 400 and a.error["code"] == "INVALID_REQUEST"


def test_heartbeat_answers_status_and_ignores_a_body(mgmt: Mgmt, peers: list[TunnelPeer]) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    a = mgmt.heartbeat(code, "p1")
    assert a.status == 200 and a.data["success"] is True and a.data["status"] == "offline"
    assert isinstance(a.data["lastSeen"], int)
    with_body = mgmt.call("POST", f"/v1/rooms/{code}/participants/p1/heartbeat", {"id": "p1", "anything": 1})
    assert with_body.status == 200 and with_body.data["status"] == "offline"
    peers.append(TunnelPeer.open(mgmt.tunnel_url(code, "p1", token)))
    assert mgmt.heartbeat(code, "p1").data["status"] == "online"
    gone = mgmt.heartbeat(code, "nobody")
    assert gone.status == 404 and gone.error["code"] == "PARTICIPANT_NOT_FOUND"
    wrong_method = mgmt.call("GET", f"/v1/rooms/{code}/participants/p1/heartbeat")
    assert wrong_method.status == 404 and wrong_method.error == ROUTE_NOT_FOUND


def test_a_heartbeat_never_reconnects_a_dropped_tunnel(mgmt: Mgmt, peers: list[TunnelPeer]) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    peer.close(1000, "test drop")
    wait_for(
        lambda: not mgmt.participant(code, "p1")["connection"]["connected"], "the tunnel to be seen closed"
    )
    assert mgmt.heartbeat(code, "p1").data["status"] == "offline"
    p = mgmt.participant(code, "p1")
    assert p["connection"] == {"kind": "tunnel", "connected": False, "lastTunnelSeenAt": None}


def test_delete_answers_200_then_404(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    assert mgmt.put(code, "pmin").status == 201
    a = mgmt.delete(code, "pmin")
    assert a.status == 200 and a.data == {"success": True}
    again = mgmt.delete(code, "pmin")
    assert again.status == 404 and again.error["code"] == "PARTICIPANT_NOT_FOUND"
    assert mgmt.participant(code, "pmin") is None


def test_unknown_routes_answer_the_route_not_found_envelope(hub: Hub, mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    for method, path in [
        ("GET", f"/v1/rooms/{code}/participants/p1"),
        ("GET", "/v1/nothing-here"),
    ]:
        a = mgmt.call(method, path)
        assert a.status == 404, (path, a.body)
        assert a.error == ROUTE_NOT_FOUND, path
    wrong_method = mgmt.call("GET", f"/rooms/{code}/v1/chat/completions")
    if hub.fake is not None:
        assert wrong_method.status == 404 and wrong_method.error == ROUTE_NOT_FOUND
    else:  # a path both generations share: ours keeps the v0.1 contract's JSON 405
        assert wrong_method.status in (404, 405) and "error" in wrong_method.json()


def test_options_is_a_204_preflight(hub: Hub, mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    a = mgmt.call("OPTIONS", f"/v1/rooms/{code}/participants/p1")
    assert a.status == 204
    if hub.fake is not None:  # the reference allows every method cross-origin; ours may not
        assert a.headers["access-control-allow-methods"] == "GET, POST, PUT, DELETE, OPTIONS"


def _legacy_requests() -> list[tuple[str, str, bytes | None, int, str]]:
    """(method, path, body, status, body seen) for each curl in legacy-routes-on-v06.txt."""
    text = (FIXTURES / "legacy-routes-on-v06.txt").read_text()
    out = []
    for block in text.split("$ curl ")[1:]:
        head, _, rest = block.partition("\n")
        method = re.search(r"-X (\w+)", head)
        url = re.search(r"http://[^ /]+(/\S*)", head)
        data = re.search(r" -d (.*)$", head)
        assert url is not None
        status = int(re.search(r"HTTP/1.1 (\d+)", rest).group(1))  # type: ignore[union-attr]
        body_seen = (
            rest.strip().split("\n\n", 1)[1].split("\n\n")[0].strip() if "\n\n" in rest.strip() else ""
        )
        out.append(
            (
                method.group(1) if method else "GET",
                url.group(1),
                data.group(1).encode() if data else None,
                status,
                body_seen,
            )
        )
    return out


def test_reference_quirk_legacy_v01_routes_answer_404_envelopes(hub: Hub, mgmt: Mgmt) -> None:
    """Replayed from legacy-routes-on-v06.txt: a v0.6-only hub has no v0.1 participant routes."""
    only_fake(hub)  # ours serves both generations, so these routes answer there
    code = mgmt.create_room("Legacy Room")
    replayed = 0
    for method, path, body, status, seen in _legacy_requests():
        if path.endswith("/events"):
            continue  # a stream: covered by the events cases
        path = path.replace("YURRWK", code)
        a = mgmt.call(method, path, raw=body)
        assert a.status == status, (method, path, a.body)
        if status == 404 and seen.startswith('{"error":{'):
            assert a.error == ROUTE_NOT_FOUND, (method, path)
        replayed += 1
    assert replayed >= 9


# ---- 5.1 tunnel bootstrap ----------------------------------------------------------------------------


def test_tunnel_upgrade_refusals(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    _url9, token9 = mgmt.register(code, "p9")
    status, body = mgmt.upgrade_refusal(code, "p1", None)
    assert status == 400 and body["error"]["code"] == "INVALID_REQUEST"
    status, body = mgmt.upgrade_refusal(code, "p1", "not-a-token")
    assert status == 401 and body["error"]["code"] == "INVALID_REQUEST"
    assert body["error"]["message"] == "Tunnel token is invalid or expired."
    status, body = mgmt.upgrade_refusal(code, "p9", token)  # another participant's token
    assert status == 401
    status, body = mgmt.upgrade_refusal(code, "nobody", token)
    assert status == 404 and body["error"]["code"] == "PARTICIPANT_NOT_FOUND"
    status, body = mgmt.upgrade_refusal("ZZZZZZ", "p1", token)
    assert status == 404 and body["error"]["code"] == "ROOM_NOT_FOUND"
    # none of the refusals used the tokens up
    TunnelPeer.open(mgmt.tunnel_url(code, "p1", token)).close()
    TunnelPeer.open(mgmt.tunnel_url(code, "p9", token9)).close()


def test_token_is_single_use(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    TunnelPeer.open(mgmt.tunnel_url(code, "p1", token)).close()
    status, body = mgmt.upgrade_refusal(code, "p1", token)
    assert status == 401, body


def test_a_plain_get_does_not_consume_the_token(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    a = mgmt.call("GET", f"/v1/rooms/{code}/participants/p1/tunnel?token={token}")
    assert 400 <= a.status < 500, a.body
    peer = TunnelPeer.open(mgmt.tunnel_url(code, "p1", token))
    peer.close()


def test_an_expired_token_is_401(make_hub: HubFactory) -> None:
    hub = make_hub(token_ttl_s=0.3)
    with Mgmt(hub.url) as mgmt:
        code = mgmt.create_room()
        _url, token = mgmt.register(code, "p1")
        time.sleep(0.6)  # past the token's (injected) life; not a speed assertion
        status, body = mgmt.upgrade_refusal(code, "p1", token)
        assert status == 401, body


def test_the_returned_tunnel_url_works_as_is(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    url, token = mgmt.register(code, "p1")
    peer = TunnelPeer.open(f"{url}?token={token}")
    assert mgmt.participant(code, "p1")["connection"]["connected"] is True
    peer.close()


def test_opening_the_tunnel_sets_online_at_once_and_closing_sets_offline(mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    peer = TunnelPeer.open(mgmt.tunnel_url(code, "p1", token))
    p = wait_for(
        lambda: mgmt.participant(code, "p1")["status"] == "online" and mgmt.participant(code, "p1"), "online"
    )
    assert p["connection"]["connected"] is True and isinstance(p["connection"]["lastTunnelSeenAt"], int)
    peer.close(1000, "bye")
    assert peer.close_code == 1000 and peer.close_reason == "bye"  # the participant's close is echoed
    p = wait_for(
        lambda: mgmt.participant(code, "p1")["status"] == "offline" and mgmt.participant(code, "p1"),
        "offline",
    )
    assert p["connection"] == {"kind": "tunnel", "connected": False, "lastTunnelSeenAt": None}


# ---- 5.2 framing, 5.3 catalogue ----------------------------------------------------------------------


def test_ping_gets_a_pong_with_the_hub_clock(mgmt: Mgmt, peers: list[TunnelPeer]) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    before = int(time.time() * 1000)
    peer.ping()
    pong = peer.next()
    assert pong["type"] == "tunnel.pong" and isinstance(pong["timestamp"], int)
    assert abs(pong["timestamp"] - before) < 60_000  # the hub's clock, not an echo of ours
    peer.ping(binary=True)  # binary frames holding the same JSON are accepted
    assert peer.next()["type"] == "tunnel.pong"


def test_garbage_is_ignored_without_reply_or_close(mgmt: Mgmt, peers: list[TunnelPeer]) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    for junk in [
        "hello, not json",
        json.dumps({"type": "tunnel.bogus"}),
        json.dumps({"type": "tunnel.pong", "timestamp": 1}),
        json.dumps({"type": "tunnel.response.end", "requestId": "no-such-request"}),
        json.dumps([1, 2, 3]),
    ]:
        peer.send(junk)
    peer.ping()
    assert peer.next()["type"] == "tunnel.pong"  # the first reply is the pong: nothing answered the junk
    assert not peer.closed
    assert mgmt.participant(code, "p1")["status"] == "online"


def test_the_hub_never_pings(hub: Hub, mgmt: Mgmt, peers: list[TunnelPeer]) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    assert peer.nothing_within(0.5)


def test_non_stream_request_and_answer(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "hi")
    req = peer.next_request()
    uuid.UUID(req.id)
    assert req.raw["operation"] == "chat.completions.create"
    assert req.raw["method"] == "POST" and req.raw["path"] == "/v1/chat/completions"
    assert req.raw["stream"] is False
    assert req.raw["headers"].get("Content-Type") == "application/json"
    assert req.body["model"] == "fake-model"  # the participant's registered model, not "p1"
    assert req.body["messages"][-1] == {"role": "user", "content": "hi"}
    # chunks are concatenated and the answer goes out at end, re-serialised as JSON
    text = json.dumps(CHAT_DOC)
    peer.start(req.id, 200, {"content-type": "application/json", "x-fake-llm": "1"})
    for i in range(0, len(text), 40):
        peer.chunk(req.id, text[i : i + 40])
    assert not answer.done() or answer.result().status == 200
    peer.end(req.id)
    a = answer.result(10)
    assert a.status == 200 and a.json() == CHAT_DOC
    assert "x-fake-llm" not in a.headers  # the participant's headers are dropped


def test_a_streamed_answer_goes_out_chunk_by_chunk(
    mgmt: Mgmt, hub: Hub, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    seen: list[bytes] = []
    got_first = threading.Event()
    status: list[int] = []
    headers: list[httpx.Headers] = []

    def client() -> None:
        with Inference(hub.url) as inf:
            body = {"model": "p1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            for st, h, piece in inf.stream_chunks(f"/rooms/{code}/v1/chat/completions", body):
                status.append(st)
                headers.append(h)
                seen.append(piece)
                got_first.set()

    done = pool.submit(client)
    req = peer.next_request()
    assert req.raw["stream"] is True and req.body["stream"] is True
    peer.start(req.id, 200, SSE_HEADERS)
    peer.chunk(req.id, b"data: one\n\n")
    assert got_first.wait(10), "the first chunk was held back"
    peer.chunk(req.id, b"data: two\n\n")
    peer.chunk(req.id, b"data: [DONE]\n\n")
    peer.end(req.id)
    done.result(10)
    assert status[0] == 200 and headers[0]["content-type"].startswith("text/event-stream")
    assert b"".join(seen) == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"


def test_a_chunk_before_start_is_buffered_and_delivered_first(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "hi", stream=True)
    req = peer.next_request()
    peer.chunk(req.id, b"data: early\n\n")
    peer.start(req.id, 200, SSE_HEADERS)
    peer.chunk(req.id, b"data: late\n\n")
    peer.end(req.id)
    a = answer.result(10)
    assert a.status == 200 and a.body == b"data: early\n\ndata: late\n\n"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_error_before_start_is_502_with_the_participant_message(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor, stream: bool
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x", stream=stream)
    req = peer.next_request()
    peer.error(req.id, "fake provider exploded")
    a = answer.result(10)
    assert a.status == 502, a.body
    assert "fake provider exploded" in a.json()["error"]


def test_error_after_start_on_a_stream_is_a_clean_truncated_end(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x", stream=True)
    req = peer.next_request()
    peer.start(req.id, 200, SSE_HEADERS)
    peer.chunk(req.id, b"data: Hello\n\n")
    peer.error(req.id, "provider stream broke", stage="stream")
    a = answer.result(10)  # no exception: the chunked body ended normally
    assert a.status == 200 and a.body == b"data: Hello\n\n"


def test_error_after_start_on_a_non_stream_is_502(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x")
    req = peer.next_request()
    peer.start(req.id, 200, {"content-type": "application/json"})
    peer.chunk(req.id, b'{"id": "chatcmpl-')
    peer.error(req.id, "provider stream broke", stage="stream")
    a = answer.result(10)
    assert a.status == 502 and "provider stream broke" in a.json()["error"]


def test_a_non_json_non_stream_answer_is_502(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x")
    req = peer.next_request()
    peer.start(req.id, 200, {"content-type": "text/plain"})
    peer.chunk(req.id, b"not json at all")
    peer.end(req.id)
    assert answer.result(10).status == 502


@pytest.mark.parametrize(
    ("stream", "status"), [(False, 500), (True, 429)], ids=["non-stream-500", "stream-429"]
)
def test_the_participant_status_is_kept(
    mgmt: Mgmt,
    inference: Inference,
    peers: list[TunnelPeer],
    pool: ThreadPoolExecutor,
    stream: bool,
    status: int,
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", f"status:{status}", stream=stream)
    req = peer.next_request()
    doc = {"error": {"message": f"fake error {status}", "type": "fake"}}
    peer.answer_json(req.id, doc, status=status)
    a = answer.result(10)
    assert a.status == status and a.json() == doc


def test_a_start_with_an_impossible_status_is_ignored(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x")
    req = peer.next_request()
    peer.start(req.id, 700, {"content-type": "application/json"})  # outside 100-599: dropped
    peer.chunk(req.id, json.dumps(CHAT_DOC))
    peer.end(req.id)
    a = answer.result(10)
    assert a.status == 200 and a.json() == CHAT_DOC


def test_a_dropped_tunnel_fails_the_request_in_flight_with_502(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x")
    peer.next_request()
    peer.close(1000, "bye")
    a = answer.result(10)
    assert a.status == 502 and "disconnected" in a.json()["error"].lower()


def test_binary_response_frames_are_accepted(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x")
    req = peer.next_request()
    rid = req.id
    chunk = base64.b64encode(json.dumps(CHAT_DOC).encode()).decode()
    for msg in (
        {"type": "tunnel.response.start", "requestId": rid, "status": 200, "headers": {}},
        {"type": "tunnel.response.chunk", "requestId": rid, "chunk": chunk},
        {"type": "tunnel.response.end", "requestId": rid},
    ):
        peer.send(msg, binary=True)
    a = answer.result(10)
    assert a.status == 200 and a.json() == CHAT_DOC


# ---- 4. routing, busy, no tunnel ---------------------------------------------------------------------


def test_model_routing_by_id_model_name_star_any_and_plain_name(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    alpha = online(mgmt, peers, code, "pa", model="alpha-model")
    beta = online(mgmt, peers, code, "pb", model="beta-model")
    by_peer = {"pa": alpha, "pb": beta}

    def served_by(model: str, candidates: tuple[str, ...]) -> str:
        answer = pool.submit(inference.chat, code, model, "x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in candidates:
                peer = by_peer[pid]
                if not peer.nothing_within(0.02):
                    req = peer.next_request()
                    peer.answer_json(req.id, CHAT_DOC)
                    assert answer.result(10).status == 200
                    return pid
        raise AssertionError(f"no participant got the request for {model!r}")

    assert served_by("pb", ("pa", "pb")) == "pb"
    assert served_by("model:alpha-model", ("pa", "pb")) == "pa"
    assert served_by("beta-model", ("pa", "pb")) == "pb"
    assert served_by("*", ("pa", "pb")) in ("pa", "pb")
    assert served_by("any", ("pa", "pb")) in ("pa", "pb")
    none = inference.chat(code, "model:no-such-model", "x")
    assert none.status == 404 and none.json() == {"error": "No available participant for the requested model"}


def test_a_busy_participant_gets_409_and_is_skipped_by_star_and_model_routing(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x", stream=True)
    req = peer.next_request()
    peer.start(req.id, 200, SSE_HEADERS)
    busy = inference.chat(code, "p1", "x")
    assert busy.status == 409 and busy.json() == {"error": "Participant is already handling another request."}
    assert inference.responses(code, "p1", "x").status == 409
    for model in ("*", "model:fake-model"):
        assert inference.chat(code, model, "x").status == 404, model
    assert mgmt.heartbeat(code, "p1").data["status"] == "busy"
    assert mgmt.participant(code, "p1")["status"] == "busy"
    peer.chunk(req.id, b"data: [DONE]\n\n")
    peer.end(req.id)
    assert answer.result(10).status == 200
    wait_for(lambda: mgmt.participant(code, "p1")["status"] == "online", "the participant to be free again")


def test_a_registered_participant_without_a_tunnel_gets_503(mgmt: Mgmt, inference: Inference) -> None:
    code = mgmt.create_room()
    assert mgmt.put(code, "p3", nickname="no-tunnel").status == 201
    for a in (inference.chat(code, "p3", "x"), inference.responses(code, "p3", "x")):
        assert a.status == 503 and a.json() == {"error": "Participant tunnel is not connected."}


def test_inference_on_an_unknown_room_or_participant_is_404(mgmt: Mgmt, inference: Inference) -> None:
    code = mgmt.create_room()
    a = inference.chat("ZZZZZZ", "p1", "x")
    assert a.status == 404 and a.json() == {"error": "Room not found"}
    a = inference.chat(code, "nobody", "x")
    assert a.status == 404 and a.json() == {"error": "No available participant for the requested model"}
    assert inference.models("ZZZZZZ").status == 404


def test_models_lists_connected_participants_with_the_gambi_key(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer]
) -> None:
    code = mgmt.create_room()
    assert inference.models(code).json() == {"object": "list", "data": []}
    peer = online(mgmt, peers, code)
    listed = inference.models(code).json()["data"]
    assert [m["id"] for m in listed] == ["p1"]
    entry = listed[0]
    assert entry["object"] == "model" and entry["owned_by"] == "py-probe"
    assert entry["gambi"]["model"] == "fake-model" and entry["gambi"]["connection"]["connected"] is True
    assert "gambiarra" not in entry
    peer.close()
    wait_for(lambda: inference.models(code).json()["data"] == [], "the participant to leave /v1/models")


def test_room_defaults_then_participant_config_then_request_are_merged(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room(
        "Defaults Room", defaults={"temperature": 0.3, "max_tokens": 64, "instructions": "Answer briefly."}
    )
    peer = online(mgmt, peers, code, "pd", config={"temperature": 0.9})

    def forwarded(call: Callable[[], Answer]) -> dict[str, Any]:
        answer: Future[Answer] = pool.submit(call)
        req = peer.next_request()
        peer.answer_json(req.id, CHAT_DOC)
        assert answer.result(10).status == 200
        return dict(req.body)

    body = forwarded(lambda: inference.chat(code, "pd", "chunks:1"))
    assert body["temperature"] == 0.9 and body["max_tokens"] == 64  # participant over room
    assert body["messages"][0] == {"role": "system", "content": "Answer briefly."}
    body = forwarded(lambda: inference.chat(code, "pd", "x", temperature=0.1))
    assert body["temperature"] == 0.1  # the request wins
    own = [{"role": "system", "content": "own system"}, {"role": "user", "content": "x"}]
    body = forwarded(
        lambda: inference.post(f"/rooms/{code}/v1/chat/completions", {"model": "pd", "messages": own})
    )
    assert body["messages"] == own  # the client's own system message is kept
    body = forwarded(lambda: inference.responses(code, "pd", "chunks:1"))
    assert body["instructions"] == "Answer briefly." and body["max_output_tokens"] == 64
    assert body["temperature"] == 0.9 and "max_tokens" not in body


# ---- 4. Responses ------------------------------------------------------------------------------------

RESPONSE_DOC = {
    "id": "resp_fake29d55d47b3",
    "object": "response",
    "status": "completed",
    "model": "fake-model",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello from fake", "annotations": []}],
        }
    ],
}


def test_responses_go_natively_to_a_participant_that_supports_them(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    answer = pool.submit(inference.responses, code, "p1", "hi")
    req = peer.next_request()
    assert req.raw["operation"] == "responses.create" and req.raw["path"] == "/v1/responses"
    assert req.body["model"] == "fake-model" and req.body["input"] == "hi"
    assert req.body["instructions"] == "You are a test."  # participant config instructions fill it
    peer.answer_json(req.id, RESPONSE_DOC)
    a = answer.result(10)
    assert a.status == 200 and a.json() == RESPONSE_DOC


def _chat_answer(peer: TunnelPeer, req_id: str, stream: bool) -> None:
    if stream:
        peer.start(req_id, 200, SSE_HEADERS)
        for word in ("Hello", " from"):
            delta = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            peer.chunk(req_id, f"data: {json.dumps(delta)}\n\n")
        peer.chunk(req_id, b"data: [DONE]\n\n")
        peer.end(req_id)
    else:
        doc = {
            **CHAT_DOC,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from"}}],
        }
        peer.answer_json(req_id, doc)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_responses_fall_back_to_chat_for_an_unsupported_participant(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor, stream: bool
) -> None:
    code = mgmt.create_room()
    caps = {"openResponses": "unsupported", "chatCompletions": "supported"}
    peer = online(mgmt, peers, code, "p2", capabilities=caps, config={})
    answer = pool.submit(inference.responses, code, "p2", "hi", stream=stream)
    req = peer.next_request()
    assert req.raw["operation"] == "chat.completions.create", req.raw  # straight to chat, no native try
    assert req.body["messages"][-1] == {"role": "user", "content": "hi"}
    _chat_answer(peer, req.id, stream)
    a = answer.result(10)
    assert a.status == 200, a.body
    if stream:
        text = a.body.decode()
        for event in ("response.created", "response.output_text.delta", "response.completed"):
            assert f"event: {event}" in text, text
        assert text.rstrip().endswith("data: [DONE]")
    else:
        doc = a.json()
        assert doc["object"] == "response" and doc["id"].startswith("resp_")
        assert doc["output"][0]["content"][0]["text"] == "Hello from"


def test_responses_fall_back_after_a_404_and_the_fallback_refuses_lifecycle_and_store(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code, "p2", capabilities={}, config={})  # openResponses unknown
    answer = pool.submit(inference.responses, code, "p2", "hi")
    first = peer.next_request()
    assert first.raw["operation"] == "responses.create"
    peer.answer_json(first.id, {"error": {"message": "no route /v1/responses"}}, status=404)
    second = peer.next_request()
    assert second.raw["operation"] == "chat.completions.create"
    _chat_answer(peer, second.id, stream=False)
    a = answer.result(10)
    assert a.status == 200 and a.json()["object"] == "response"
    lifecycle = inference.get(f"/rooms/{code}/v1/responses/{a.json()['id']}")
    assert lifecycle.status == 501, lifecycle.body
    stored = pool.submit(inference.responses, code, "p2", "hi", store=True)
    req = peer.next_request()
    peer.answer_json(req.id, {"error": {"message": "no route /v1/responses"}}, status=404)
    refused = stored.result(10)
    assert refused.status == 400 and "store" in refused.json()["error"]
    unknown = inference.get(f"/rooms/{code}/v1/responses/resp_unknown")
    assert unknown.status == 404


def test_responses_lifecycle_calls_go_to_the_participant_that_answered(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    created = pool.submit(inference.responses, code, "p1", "hi")
    req = peer.next_request()
    peer.answer_json(req.id, RESPONSE_DOC)
    assert created.result(10).status == 200
    fetched = pool.submit(inference.get, f"/rooms/{code}/v1/responses/{RESPONSE_DOC['id']}")
    req = peer.next_request()
    assert req.raw["operation"] == "responses.get" and req.raw["method"] == "GET"
    assert req.raw["path"] == f"/v1/responses/{RESPONSE_DOC['id']}" and req.raw["headers"] == {}
    assert "body" not in req.raw
    peer.answer_json(req.id, RESPONSE_DOC)
    assert fetched.result(10).json() == RESPONSE_DOC


# ---- 3.4 events --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1/rooms", "/rooms"])
def test_room_events_carry_the_v06_types_and_shape(
    hub: Hub,
    mgmt: Mgmt,
    inference: Inference,
    peers: list[TunnelPeer],
    pool: ThreadPoolExecutor,
    prefix: str,
) -> None:
    if prefix == "/rooms" and hub.fake is None:
        pytest.skip("a path both generations share: ours keeps the v0.1 event stream there")
    code = mgmt.create_room()
    reader = EventReader(hub.url, f"{prefix}/{code}/events")
    try:
        assert reader.status == 200 and reader.headers is not None
        assert reader.headers["content-type"].startswith("text/event-stream")
        wait_for(lambda: reader.of_type("connected"), "the connected event")
        peer = online(mgmt, peers, code)
        assert mgmt.put(code, "p1").status == 200
        peer = online(mgmt, peers, code)
        answer = pool.submit(inference.chat, code, "p1", "x")
        req = peer.next_request()
        peer.answer_json(req.id, CHAT_DOC)
        assert answer.result(10).status == 200
        assert mgmt.delete(code, "p1").status == 200
        wait_for(lambda: reader.of_type("participant.left"), "participant.left")
        wait_for(lambda: reader.of_type("llm.complete"), "llm.complete")
        types = [e["type"] for e in reader.events]
        assert types[0] == "connected"
        for expected in ("participant.joined", "participant.updated", "llm.request", "llm.complete"):
            assert expected in types, types
        for e in reader.events:
            assert set(e) >= {"type", "timestamp", "roomCode", "data"}, e
            assert e["_event"] == e["type"] and e["roomCode"] == code
        assert reader.of_type("participant.joined")[0]["data"]["id"] == "p1"
        assert reader.of_type("participant.left")[0]["data"] == {"participantId": "p1"}
        request_event = reader.of_type("llm.request")[0]["data"]
        assert request_event["participantId"] == "p1" and request_event["model"] == "p1"
        complete = reader.of_type("llm.complete")[0]["data"]
        assert complete["model"] == "fake-model" and "metrics" in complete
    finally:
        reader.close()


def test_failed_requests_are_llm_error_events_with_their_stage(
    hub: Hub, mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    reader = EventReader(hub.url, f"/v1/rooms/{code}/events")
    try:
        peer = online(mgmt, peers, code)
        before = pool.submit(inference.chat, code, "p1", "x", stream=True)
        req = peer.next_request()
        peer.error(req.id, "fake provider exploded")
        assert before.result(10).status == 502
        after = pool.submit(inference.chat, code, "p1", "x", stream=True)
        req = peer.next_request()
        peer.start(req.id, 200, SSE_HEADERS)
        peer.chunk(req.id, b"data: Hello\n\n")
        peer.error(req.id, "provider stream broke", stage="stream")
        assert after.result(10).status == 200
        errors = wait_for(
            lambda: len(reader.of_type("llm.error")) >= 2 and reader.of_type("llm.error"), "llm.error"
        )
        assert [e["data"]["stage"] for e in errors] == ["dispatch", "stream"]
        for e in errors:
            assert e["data"]["participantId"] == "p1" and isinstance(e["data"]["error"], str)
        assert "fake provider exploded" in errors[0]["data"]["error"]
    finally:
        reader.close()


def test_events_of_an_unknown_room_are_404(mgmt: Mgmt) -> None:
    a = mgmt.call("GET", "/v1/rooms/ZZZZZZ/events")
    assert a.status == 404 and a.error["code"] == "ROOM_NOT_FOUND"


def test_a_silent_participant_goes_offline_with_an_event(
    make_hub: HubFactory, peers: list[TunnelPeer]
) -> None:
    # a generous tunnel timeout: a stalled test thread must not lose the tunnel here
    hub = make_hub(**{**FAST, "tunnel_timeout_s": 5.0})
    with Mgmt(hub.url) as mgmt, Inference(hub.url) as inference:
        code = mgmt.create_room()
        reader = EventReader(hub.url, f"/v1/rooms/{code}/events")
        try:
            peer = online(mgmt, peers, code)
            # pings keep the tunnel, but no management heartbeat: offline, and not routable
            deadline = time.monotonic() + 10
            while mgmt.participant(code, "p1")["status"] != "offline" and time.monotonic() < deadline:
                peer.ping()
                time.sleep(0.1)
            p = mgmt.participant(code, "p1")
            assert p["status"] == "offline" and p["connection"]["connected"] is True
            assert not peer.closed
            wait_for(lambda: reader.of_type("participant.offline"), "participant.offline")
            assert reader.of_type("participant.offline")[0]["data"] == {"participantId": "p1"}
            assert inference.chat(code, "p1", "x").status == 404
            assert mgmt.heartbeat(code, "p1").data["status"] == "online"  # one heartbeat: routable again
        finally:
            reader.close()


# ---- 5.4 liveness, 5.5 close codes -------------------------------------------------------------------


def test_a_second_tunnel_supersedes_the_first_with_1000(
    mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    code = mgmt.create_room()
    first = online(mgmt, peers, code)
    answer = pool.submit(inference.chat, code, "p1", "x", stream=True)
    req = first.next_request()
    first.start(req.id, 200, SSE_HEADERS)
    first.chunk(req.id, b"data: Hello\n\n")
    second = online(mgmt, peers, code)
    assert first.wait_closed() == (1000, "Superseded by a newer tunnel session.")
    a = answer.result(10)  # the first tunnel's stream is cut with a clean, truncated end
    assert a.status == 200 and a.body == b"data: Hello\n\n"
    second.ping()
    assert second.next()["type"] == "tunnel.pong"
    assert mgmt.participant(code, "p1")["status"] == "online"


def test_a_silent_tunnel_is_closed_with_4001(make_hub: HubFactory) -> None:
    hub = make_hub(**FAST)
    with Mgmt(hub.url) as mgmt:
        code = mgmt.create_room()
        _url, token = mgmt.register(code, "p1")
        peer = TunnelPeer.open(mgmt.tunnel_url(code, "p1", token))
        # management heartbeats go on, tunnel messages do not: the tunnel is closed
        deadline = time.monotonic() + 10
        while not peer.closed and time.monotonic() < deadline:
            mgmt.heartbeat(code, "p1")
            time.sleep(0.1)
        assert peer.wait_closed() == (4001, "Tunnel heartbeat timed out.")
        wait_for(lambda: mgmt.participant(code, "p1")["status"] == "offline", "offline after 4001")


def test_participant_pongs_do_not_count_but_pings_do(make_hub: HubFactory) -> None:
    hub = make_hub(**{**FAST, "tunnel_timeout_s": 1.5})  # room for a stalled pinger
    with Mgmt(hub.url) as mgmt:
        code = mgmt.create_room()
        tokens = [mgmt.register(code, pid)[1] for pid in ("pinger", "ponger")]
        pinger = TunnelPeer.open(mgmt.tunnel_url(code, "pinger", tokens[0]))
        ponger = TunnelPeer.open(mgmt.tunnel_url(code, "ponger", tokens[1]))
        deadline = time.monotonic() + 10
        while not ponger.closed and time.monotonic() < deadline:
            pinger.ping()
            ponger.send({"type": "tunnel.pong", "timestamp": int(time.time() * 1000)})
            time.sleep(0.1)
        assert ponger.wait_closed() == (4001, "Tunnel heartbeat timed out.")
        assert not pinger.closed
        pinger.close()


def test_hub_shutdown_closes_tunnels_with_1001(hub: Hub, mgmt: Mgmt) -> None:
    code = mgmt.create_room()
    _url, token = mgmt.register(code, "p1")
    peer = TunnelPeer.open(mgmt.tunnel_url(code, "p1", token))
    hub.stop()
    assert peer.wait_closed() == (1001, "Hub shutting down.")


# ---- reference-only quirks (asserted against the fake only) -------------------------------------------


def test_reference_quirk_every_put_marks_the_participant_offline(
    hub: Hub, mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer]
) -> None:
    only_fake(hub)
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    a = mgmt.put(code, "p1")
    assert a.status == 200 and a.data["participant"]["status"] == "offline"
    assert a.data["participant"]["connection"]["connected"] is False
    assert not peer.closed
    assert inference.chat(code, "p1", "x").status == 503  # its tunnel is still open
    peer.ping()
    assert peer.next()["type"] == "tunnel.pong"
    p = mgmt.participant(code, "p1")
    assert p["connection"]["connected"] is True and p["status"] == "offline"  # until a heartbeat


def test_reference_quirk_earlier_tokens_are_not_revoked(hub: Hub, mgmt: Mgmt) -> None:
    only_fake(hub)
    code = mgmt.create_room()
    tokens = [mgmt.register(code, "p1")[1] for _ in range(3)]
    for token in tokens:
        TunnelPeer.open(mgmt.tunnel_url(code, "p1", token)).close()


def test_reference_quirk_delete_leaves_the_socket_open_and_unanswered(
    hub: Hub, mgmt: Mgmt, peers: list[TunnelPeer]
) -> None:
    only_fake(hub)
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    assert mgmt.delete(code, "p1").status == 200
    peer.ping()
    assert peer.nothing_within(0.5) and not peer.closed


def test_reference_quirk_invalid_inference_json_is_a_500_html_page(
    hub: Hub, mgmt: Mgmt, inference: Inference
) -> None:
    only_fake(hub)
    code = mgmt.create_room()
    for raw in (b"{", json.dumps({"messages": []}).encode()):
        a = inference.post(f"/rooms/{code}/v1/chat/completions", raw=raw)
        assert a.status == 500 and a.headers["content-type"].startswith("text/html")


def test_reference_quirk_a_chunk_after_the_client_left_crashes_the_hub(
    make_hub: HubFactory, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    hub = make_hub()
    fake = only_fake(hub)
    with Mgmt(hub.url) as mgmt:
        code = mgmt.create_room()
        peer = online(mgmt, peers, code)

        def client_gives_up() -> None:
            with httpx.Client(timeout=10, trust_env=False) as http:
                body = {"model": "p1", "stream": True, "messages": []}
                with http.stream("POST", f"{hub.url}/rooms/{code}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_raw())

        gone = pool.submit(client_gives_up)
        req = peer.next_request()
        peer.start(req.id, 200, SSE_HEADERS)
        peer.chunk(req.id, b"data: one\n\n")
        gone.result(10)
        wait_for(lambda: mgmt.participant(code, "p1")["status"] == "online", "the participant freed")
        peer.chunk(req.id, b"data: two\n\n")
        assert fake.crashed.wait(10)
        assert peer.wait_closed() == (None, None)  # TCP dropped, no close frame


# ---- llmroom only: where the reference is known fragile (section 7) -----------------------------------


def test_llmroom_only_survives_a_client_that_leaves_mid_stream(
    hub: Hub, mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    only_llmroom(hub)
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)

    def client_gives_up() -> None:
        with httpx.Client(timeout=10, trust_env=False) as http:
            body = {"model": "p1", "stream": True, "messages": []}
            with http.stream("POST", f"{hub.url}/rooms/{code}/v1/chat/completions", json=body) as r:
                next(r.iter_raw())

    gone = pool.submit(client_gives_up)
    req = peer.next_request()
    peer.start(req.id, 200, SSE_HEADERS)
    peer.chunk(req.id, b"data: one\n\n")
    gone.result(10)
    for _ in range(5):
        peer.chunk(req.id, b"data: late\n\n")  # the hub must drop these quietly
    peer.end(req.id)
    assert mgmt.health().status == 200
    assert not peer.closed
    wait_for(lambda: mgmt.participant(code, "p1")["status"] == "online", "the request released")
    answer = pool.submit(inference.chat, code, "p1", "x")
    nxt = peer.next_request()
    peer.answer_json(nxt.id, CHAT_DOC)
    assert answer.result(10).status == 200
    assert not any(
        isinstance(m, dict) and m.get("type") not in ("tunnel.request", "tunnel.pong") for m in peer.received
    )


@pytest.mark.slow
def test_llmroom_only_a_first_token_after_more_than_10_s_still_reaches_the_client(
    hub: Hub, mgmt: Mgmt, peers: list[TunnelPeer], pool: ThreadPoolExecutor, inference: Inference
) -> None:
    only_llmroom(hub)
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    with Inference(hub.url, timeout_s=30) as slow_client:
        answer = pool.submit(slow_client.chat, code, "p1", "ttft:11", stream=True)
        req = peer.next_request()
        peer.start(req.id, 200, SSE_HEADERS)
        time.sleep(11)  # the reference cuts the client at ~10 s and then crashes on the next chunk
        peer.ping()
        peer.chunk(req.id, b"data: late first token\n\n")
        peer.end(req.id)
        a = answer.result(30)
    assert a.status == 200 and b"late first token" in a.body
    assert mgmt.health().status == 200


def test_llmroom_only_invalid_inference_json_is_a_json_400(
    hub: Hub, mgmt: Mgmt, inference: Inference
) -> None:
    only_llmroom(hub)
    code = mgmt.create_room()
    a = inference.post(f"/rooms/{code}/v1/chat/completions", raw=b"{")
    assert a.status == 400, a.body
    assert a.headers["content-type"].startswith("application/json") and "error" in a.json()
    no_model = inference.post(f"/rooms/{code}/v1/chat/completions", {"messages": []})
    assert 400 <= no_model.status < 500 and "error" in no_model.json()  # JSON, never an HTML 500


def test_llmroom_only_liveness_timeouts_are_settings(hub: Hub) -> None:
    only_llmroom(hub)
    import llmroom_cli.hub as hub_mod

    for name in ("tunnel_timeout_s", "sweep_interval_s", "token_ttl_s"):
        try:
            _llmroom_settings(hub_mod, {name: 1.0})
        except pytest.skip.Exception:
            pytest.fail(f"llmroom's hub has no setting for {name}")


def test_llmroom_only_rooms_are_shared_between_generations(
    hub: Hub, mgmt: Mgmt, peers: list[TunnelPeer]
) -> None:
    only_llmroom(hub)
    code = mgmt.create_room("Shared")
    legacy = mgmt.call(
        "POST",
        f"/rooms/{code}/join",
        {"id": "legacy-1", "nickname": "alice", "model": "fake-model", "endpoint": "http://127.0.0.1:40111"},
    )
    assert legacy.status == 201, legacy.body
    online(mgmt, peers, code, "tunnel-1")
    v06_ids = {p["id"] for p in mgmt.participants(code).data}
    v01 = mgmt.call("GET", f"/rooms/{code}/participants").json()
    assert v06_ids == {"legacy-1", "tunnel-1"}
    assert {p["id"] for p in v01["participants"]} == {"legacy-1", "tunnel-1"}


# ---- the recording, replayed ------------------------------------------------------------------------

# Conns of tunnel-client-wire.txt whose answer depends on the reference not revoking older tokens.
TOKEN_QUIRK_CONNS = {84, 85, 86}


def test_the_recorded_management_and_bootstrap_session_replays(hub: Hub, mgmt: Mgmt) -> None:
    """tunnel-client-wire.txt up to the tunnel that carries the inference: same answers, call by call.

    Room codes and tokens are mapped from the recorded answers to the live ones. Status and error
    `code` must match on both hubs; the fake must match error messages too.
    """
    exchanges = parse_recording((FIXTURES / "tunnel-client-wire.txt").read_text())
    codes: dict[str, str] = {}
    tokens: dict[str, str] = {}
    replayed = 0
    peers: list[TunnelPeer] = []
    for ex in exchanges:
        if ex.conn > 86:
            break
        if ex.conn in TOKEN_QUIRK_CONNS and hub.fake is None:
            continue
        target = ex.target
        for old, new in (*codes.items(), *tokens.items()):
            target = target.replace(old, new)
        where = f"conn {ex.conn}: {ex.method} {ex.target}"
        if ex.status == 101:
            peer = TunnelPeer.open(mgmt.base_url.replace("http", "ws", 1) + target)
            peers.append(peer)
            if ex.conn != 86:
                peer.close()
            replayed += 1
            continue
        if ex.upgrade:
            status, body = mgmt.upgrade_refusal(*_tunnel_parts(target))
            answer_doc: Any = body
        else:
            a = mgmt.call(ex.method, target, raw=ex.request_body)
            status, answer_doc = a.status, (a.json() if a.body else None)
        assert status == ex.status, (where, answer_doc)
        recorded = ex.response_json()
        if isinstance(recorded, dict) and "error" in recorded:
            assert answer_doc["error"]["code"] == recorded["error"]["code"], where
            if hub.fake is not None:
                assert answer_doc["error"]["message"] == recorded["error"]["message"], where
        if isinstance(recorded, dict) and isinstance(recorded.get("data"), dict):
            data = recorded["data"]
            if "room" in data:
                live = answer_doc["data"]["room"]["code"]
                codes[data["room"]["code"]] = live
                codes[data["room"]["code"].lower()] = live.lower()
            if "tunnel" in data:
                tokens[data["tunnel"]["token"]] = answer_doc["data"]["tunnel"]["token"]
            if "status" in data and "success" in data:
                assert answer_doc["data"]["status"] == data["status"], where
        replayed += 1
    assert replayed >= 40
    if hub.fake is not None:
        assert mgmt.heartbeat(codes["ZZEZHF"], "p1").data["status"] == "online"  # conn 87
    for peer in peers:
        if not peer.closed:
            peer.close()


def _tunnel_parts(target: str) -> tuple[str, str, str | None]:
    m = re.match(r"^/v1/rooms/([^/]+)/participants/([^/]+)/tunnel(?:\?token=(.*))?$", target)
    assert m is not None, target
    return m.group(1), m.group(2), m.group(3)


def test_the_recorded_inference_session_replays_through_a_tunnel(
    hub: Hub, mgmt: Mgmt, inference: Inference, peers: list[TunnelPeer], pool: ThreadPoolExecutor
) -> None:
    """tunnel-client-wire.txt 2.64-3.01 s: client calls and the participant's recorded frames.

    The test plays the recorded participant (answers taken frame by frame from the recording, request
    ids mapped) and the recorded client; each forwarded `tunnel.request` and each client answer must
    be the recorded one: chat, stream, `model:`/`*`/plain routing, Responses native and streamed,
    and the Responses lifecycle calls.
    """
    timeline = parse_timeline((FIXTURES / "tunnel-client-wire.txt").read_text())
    first = next(i for i, e in enumerate(timeline) if isinstance(e, Exchange) and e.conn == 88)
    last = next(e.answered_after for e in timeline if isinstance(e, Exchange) and e.conn == 99)
    code = mgmt.create_room()
    peer = online(mgmt, peers, code)
    calls: dict[int, Future[Answer]] = {}
    rids: dict[str, str] = {}

    def call(ex: Exchange) -> Answer:
        target = ex.target.replace("ZZEZHF", code)
        if ex.method == "POST":
            return inference.post(target, raw=ex.request_body)
        r = inference.http.request(ex.method, target)
        return Answer(r.status_code, r.headers, r.content)

    for index in range(first, last + 1):
        item = timeline[index]
        if isinstance(item, Exchange):
            calls[index] = pool.submit(call, item)
        elif item.conn == 86 and item.direction == "hub->participant":
            recorded = item.json()
            try:
                live = peer.next_request()
            except AssertionError:
                raise AssertionError(
                    f"the hub never sent the recorded {recorded['operation']} {recorded['path']}"
                ) from None
            rids[recorded["requestId"]] = live.id
            for key in ("operation", "method", "path", "stream"):
                assert live.raw[key] == recorded[key], (key, live.raw, recorded)
            assert live.raw.get("body") == recorded.get("body"), (live.raw, recorded)
            if hub.fake is not None:
                assert live.raw["headers"] == recorded["headers"]
        elif item.conn == 86:
            message = item.json()
            message["requestId"] = rids[message["requestId"]]
            peer.send(message)
        for start, ex in [(i, e) for i, e in enumerate(timeline) if isinstance(e, Exchange)]:
            if ex.answered_after == index and start in calls:
                _check_recorded_answer(ex, calls.pop(start).result(10))
    assert not calls
    assert len(rids) >= 9


def _check_recorded_answer(ex: Exchange, a: Answer) -> None:
    where = f"conn {ex.conn}: {ex.method} {ex.target}"
    assert a.status == ex.status, (where, a.body)
    if ex.response_body is None:
        return
    recorded = ex.response_json()
    if ex.target.endswith("/v1/models"):
        assert [m["id"] for m in a.json()["data"]] == [m["id"] for m in recorded["data"]], where
        assert [m["gambi"]["model"] for m in a.json()["data"]] == [
            m["gambi"]["model"] for m in recorded["data"]
        ]
    elif recorded is not None:
        assert a.json() == recorded, where
    else:  # an event stream: the same events, blank separator lines aside
        lines = [line for line in a.body.decode().splitlines() if line.strip()]
        assert lines == ex.response_body.splitlines(), where


REFERENCE_SESSIONS = [f"cli-run-{i}" for i in range(10)] + [
    *(f"cli-nospecs-{i}" for i in range(5)),
    "cli-ndjson",
    "cli-idle",
    "cli-term",
]


def test_the_reference_participants_recorded_sessions_replay(hub: Hub, mgmt: Mgmt) -> None:
    """reference-participant-wire.txt: what `gambi participant join` sent, sent again, session by session.

    Its PUT bodies, its tunnel upgrade with the returned token, its pings (each answered by a pong),
    its heartbeats (`online`), its close 1000 and DELETE: the reference participant can join this hub.
    The tunnel requests in that capture came from clients not recorded, so they are left out here.
    """
    timeline = parse_timeline((FIXTURES / "reference-participant-wire.txt").read_text())
    pid_of_conn: dict[int, str] = {}
    for item in timeline:
        if isinstance(item, Exchange) and _pid(item.target):
            pid_of_conn.setdefault(item.conn, _pid(item.target))
    rooms: dict[str, str] = {}
    replayed: dict[str, list[str]] = {}
    for pid in REFERENCE_SESSIONS:
        peer: TunnelPeer | None = None
        token = ""
        steps = replayed.setdefault(pid, [])
        for item in timeline:
            if isinstance(item, Exchange):
                if _pid(item.target) != pid:
                    continue
                recorded_code = item.target.split("/")[3]
                code = rooms.setdefault(recorded_code, mgmt.create_room(f"Replay {recorded_code}"))
                path = item.target.replace(f"/rooms/{recorded_code}/", f"/rooms/{code}/")
                if item.upgrade:
                    peer = TunnelPeer.open(mgmt.tunnel_url(code, pid, token))
                    steps.append("upgrade")
                    continue
                a = mgmt.call(item.method, path, raw=item.request_body)
                assert a.status == item.status, (pid, item.method, path, a.body)
                if item.method == "PUT":
                    token = a.data["tunnel"]["token"]
                    assert (
                        a.data["participant"]["nickname"]
                        == item.response_json()["data"]["participant"]["nickname"]
                    )
                if path.endswith("/heartbeat"):
                    assert a.data["status"] == item.response_json()["data"]["status"], (pid, a.body)
                steps.append(item.method)
            elif (
                pid_of_conn.get(item.conn) == pid
                and item.direction == "participant->hub"
                and peer is not None
            ):
                if item.kind == "close":
                    peer.close(1000, "")
                    assert peer.close_code == 1000
                    steps.append("close")
                    continue
                message = item.json()
                if not isinstance(message, dict) or message.get("type") != "tunnel.ping":
                    continue  # answers to the unrecorded clients' requests
                peer.send(item.payload)
                assert peer.next()["type"] == "tunnel.pong"
                steps.append("ping")
        if peer is not None and not peer.closed:
            peer.close()
    assert replayed["cli-run-0"] == ["PUT", "upgrade", "close", "DELETE"]
    assert replayed["cli-idle"].count("ping") >= 5 and replayed["cli-idle"].count("POST") >= 5
    assert all(steps[:2] == ["PUT", "upgrade"] and steps[-1] == "DELETE" for steps in replayed.values())


def _pid(target: str) -> str:
    """The participant id in a `/v1/rooms/CODE/participants/ID[/...]` target, or ''."""
    m = re.match(r"^/v1/rooms/[^/]+/participants/([^/?]+)", target)
    return m.group(1) if m else ""
