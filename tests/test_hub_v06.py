"""The embedded hub's v0.6 side (gambi-v06-api.md sections 3-7) over real HTTP and a real WebSocket.

The participant here is a small tunnel client written from the wire recordings (websockets' sync
client, JSON text frames); the HTTP client is http.client. Nothing of llmroom's agent is used.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from llmroom_cli.hub import Limits, RunningHub, start_hub
from tests.helpers import WAIT_S, wait_for
from tests.test_server_contract import SSE, Http

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
PARTICIPANT_KEYS = [
    "id", "nickname", "model", "endpoint", "specs", "config", "capabilities", "connection", "status",
    "joinedAt", "lastSeen", "updatedAt",
]  # fmt: skip
BODY = {
    "nickname": "py-probe",
    "model": "fake-model",
    "endpoint": "http://127.0.0.1:40111",
    "specs": {"cpu": "Test CPU", "ram": 16, "npu": "dropped"},
    "config": {"temperature": 0.7, "instructions": "You are a test.", "weird": 1},
    "capabilities": {"openResponses": "supported", "chatCompletions": "supported"},
}


def call(hub: RunningHub, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    """(status, parsed JSON, headers) on a fresh connection."""
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload else None, {k.lower(): v for k, v in resp.getheaders()}


def ok(answer: Any) -> Any:
    status, data, headers = answer
    assert status in (200, 201), data
    assert list(data) == ["data", "meta"] and re.fullmatch(UUID, data["meta"]["requestId"])
    assert headers["content-type"] == "application/json;charset=utf-8"
    assert headers["access-control-allow-origin"] == "*"
    return data["data"]


def err(answer: Any, status: int, code: str, message: str) -> dict[str, Any]:
    got_status, data, _ = answer
    assert (got_status, data["error"]["code"], data["error"]["message"]) == (status, code, message), data
    assert re.fullmatch(UUID, data["meta"]["requestId"])
    error: dict[str, Any] = data["error"]
    return error


class Participant:
    """A tunnel participant from the recordings: registers, opens the tunnel, answers requests."""

    def __init__(self, hub: RunningHub, code: str, pid: str = "p1", **body: Any) -> None:
        self.hub, self.code, self.pid = hub, code, pid
        status, data, _ = call(hub, "PUT", f"/v1/rooms/{code}/participants/{pid}", {**BODY, **body})
        assert status in (200, 201), data
        self.registered = data["data"]
        tunnel = self.registered["tunnel"]
        self._stack = contextlib.ExitStack()  # websockets wants its connection used as a context manager
        self.ws: ClientConnection = self._stack.enter_context(
            connect(f"{tunnel['url']}?token={tunnel['token']}", open_timeout=WAIT_S)
        )

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.ws.recv(timeout=WAIT_S))
        return message

    def request(self) -> dict[str, Any]:
        while True:
            message = self.recv()
            if message["type"] == "tunnel.request":
                return message

    def answer(self, request_id: str, status: int, *chunks: bytes, end: bool = True) -> None:
        self.send({"type": "tunnel.response.start", "requestId": request_id, "status": status, "headers": {}})
        for chunk in chunks:
            self.chunk(request_id, chunk)
        if end:
            self.send({"type": "tunnel.response.end", "requestId": request_id})

    def chunk(self, request_id: str, data: bytes) -> None:
        self.send(
            {
                "type": "tunnel.response.chunk",
                "requestId": request_id,
                "chunk": base64.b64encode(data).decode(),
            }
        )

    def close_code(self) -> tuple[int | None, str | None]:
        try:
            while True:
                self.ws.recv(timeout=WAIT_S)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, None)

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def code(hub: RunningHub) -> str:
    return str(ok(call(hub, "POST", "/v1/rooms", {"name": "Open Room"}))["room"]["code"])


@pytest.fixture
def member(hub: RunningHub, code: str) -> Iterator[Participant]:
    p = Participant(hub, code)
    yield p
    p.close()


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def chat(hub: RunningHub, code: str, **body: Any) -> Any:
    return call(
        hub,
        "POST",
        f"/rooms/{code}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], **body},
    )


# -- management API ----------------------------------------------------------------------------------


def test_health_rooms_and_envelopes(hub: RunningHub) -> None:
    data = ok(call(hub, "GET", "/v1/health"))
    assert data["status"] == "ok" and isinstance(data["timestamp"], int)
    made = ok(call(hub, "POST", "/v1/rooms", {"name": "Locked Room", "password": "s3cret"}))
    room = made["room"]
    assert room["hostId"] == made["hostId"] and room["passwordProtected"] is True
    assert room["participantCount"] == 0 and "defaults" not in room
    listed = ok(call(hub, "GET", "/v1/rooms"))
    assert listed == [room]
    assert ok(call(hub, "GET", f"/v1/rooms/{room['code'].lower()}")) == room
    err(call(hub, "GET", "/v1/rooms/NOPE00"), 404, "ROOM_NOT_FOUND", "Room not found.")
    err(call(hub, "GET", "/v1/rooms/NOPE00/participants"), 404, "ROOM_NOT_FOUND", "Room not found.")
    for method, path in (
        ("GET", "/v1/nope"),
        ("GET", "/v1/rooms/X/participants/p1"),
        ("GET", f"/v1/rooms/{room['code']}/participants/p1/heartbeat"),
    ):
        err(call(hub, method, path), 404, "INVALID_REQUEST", "Route not found.")


def test_room_defaults_are_checked_and_summarised(hub: RunningHub) -> None:
    room = ok(
        call(
            hub,
            "POST",
            "/v1/rooms",
            {
                "name": "D",
                "defaults": {"temperature": 0.3, "max_tokens": 64, "instructions": "Answer briefly."},
            },
        )
    )["room"]
    assert room["defaults"] == {"temperature": 0.3, "max_tokens": 64, "hasInstructions": True}
    e = err(
        call(hub, "POST", "/v1/rooms", {"name": "Bad", "defaults": {"temperature": 5}}),
        400,
        "INVALID_REQUEST",
        "Invalid room defaults.",
    )
    assert e["details"]["fieldErrors"] == {"temperature": ["Too big: expected number to be <=2"]}
    e = err(call(hub, "POST", "/v1/rooms", raw=b"{"), 400, "INVALID_REQUEST", "Invalid JSON body.")
    assert e["details"] == {"cause": "Failed to parse JSON"}
    err(call(hub, "POST", "/v1/rooms", {}), 400, "INVALID_REQUEST", "Name is required")


def test_options_lists_put(hub: RunningHub) -> None:
    status, _, headers = call(hub, "OPTIONS", "/v1/rooms")
    assert status == 204 and headers["access-control-allow-methods"] == "GET, POST, PUT, DELETE, OPTIONS"


def test_put_creates_then_updates_with_a_new_token_each_time(hub: RunningHub, code: str) -> None:
    path = f"/v1/rooms/{code.lower()}/participants/p1"
    status, data, _ = call(hub, "PUT", path, {**BODY, "id": "ignored", "status": "online", "foo": 1})
    assert status == 201
    first = data["data"]
    p = first["participant"]
    assert list(p) == PARTICIPANT_KEYS and p["id"] == "p1"
    assert p["specs"] == {"cpu": "Test CPU", "ram": 16}  # unknown keys dropped
    assert p["config"] == {"temperature": 0.7, "hasInstructions": True}  # instructions never echoed
    assert p["connection"] == {"kind": "tunnel", "connected": False, "lastTunnelSeenAt": None}
    assert p["status"] == "offline" and p["joinedAt"] == p["lastSeen"] == p["updatedAt"]
    assert re.fullmatch(UUID, first["tunnel"]["token"])
    assert first["tunnel"]["url"] == f"ws://{hub.host}:{hub.port}/v1/rooms/{code}/participants/p1/tunnel"
    status, data, _ = call(hub, "PUT", path, {**BODY, "nickname": "renamed"})
    assert status == 200
    second = data["data"]
    assert (
        second["participant"]["joinedAt"] == p["joinedAt"] and second["participant"]["nickname"] == "renamed"
    )
    assert second["tunnel"]["token"] != first["tunnel"]["token"]
    # earlier tokens are not revoked: each opens a tunnel once
    for token in (first["tunnel"]["token"], second["tunnel"]["token"]):
        with connect(f"{first['tunnel']['url']}?token={token}", open_timeout=WAIT_S) as ws:
            ws.send(json.dumps({"type": "tunnel.ping", "timestamp": 1}))
            assert json.loads(ws.recv(timeout=WAIT_S))["type"] == "tunnel.pong"


@pytest.mark.parametrize(
    ("change", "message", "field"),
    [
        ({"nickname": None}, "Missing required fields.", None),
        ({"endpoint": "not a url"}, "Invalid participant registration.", "endpoint"),
        (
            {"capabilities": {"openResponses": "maybe"}},
            "Invalid participant registration.",
            "capabilities.openResponses",
        ),
        ({"config": {"temperature": 3}}, "Invalid participant registration.", "config.temperature"),
        (
            {"authHeaders": {"Authorization": "Bearer x"}},
            "Participant auth headers are not accepted by the hub.",
            None,
        ),
    ],
)
def test_put_refusals(
    hub: RunningHub, code: str, change: dict[str, Any], message: str, field: str | None
) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    e = err(call(hub, "PUT", f"/v1/rooms/{code}/participants/p1", body), 400, "INVALID_REQUEST", message)
    if field is not None:
        assert field in e["details"]["fieldErrors"]
    if "authHeaders" in change:
        assert e["details"] == {"forbidden": ["authHeaders"]}
    if message == "Missing required fields.":
        assert e["details"] == {"required": ["nickname", "model", "endpoint"]}


def test_put_password_and_missing_room(hub: RunningHub) -> None:
    locked = ok(call(hub, "POST", "/v1/rooms", {"name": "L", "password": "s3cret"}))["room"]["code"]
    path = f"/v1/rooms/{locked}/participants/p1"
    err(call(hub, "PUT", path, BODY), 401, "INVALID_PASSWORD", "Invalid password.")
    err(call(hub, "PUT", path, {**BODY, "password": "wrong"}), 401, "INVALID_PASSWORD", "Invalid password.")
    assert call(hub, "PUT", path, {**BODY, "password": "s3cret"})[0] == 201
    err(call(hub, "PUT", "/v1/rooms/NOPE00/participants/p1", BODY), 404, "ROOM_NOT_FOUND", "Room not found.")
    err(call(hub, "PUT", path, raw=b"{"), 400, "INVALID_REQUEST", "Invalid JSON body.")


def test_heartbeat_follows_the_tunnel(hub: RunningHub, code: str) -> None:
    status, data, _ = call(hub, "PUT", f"/v1/rooms/{code}/participants/p1", BODY)
    beat = f"/v1/rooms/{code}/participants/p1/heartbeat"
    answer = ok(call(hub, "POST", beat, raw=b'{"anything": 1}'))
    assert answer["success"] is True and answer["status"] == "offline"  # no tunnel yet
    tunnel = data["data"]["tunnel"]
    with connect(f"{tunnel['url']}?token={tunnel['token']}", open_timeout=WAIT_S):
        wait_for(
            lambda: ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["status"] == "online", "online"
        )
        assert ok(call(hub, "POST", beat))["status"] == "online"
    wait_for(lambda: ok(call(hub, "POST", beat))["status"] == "offline", "offline after the tunnel closed")
    err(
        call(hub, "POST", f"/v1/rooms/{code}/participants/ghost/heartbeat"),
        404,
        "PARTICIPANT_NOT_FOUND",
        "Participant not found.",
    )


def test_delete_removes_and_closes_the_tunnel(hub: RunningHub, code: str, member: Participant) -> None:
    assert ok(call(hub, "DELETE", f"/v1/rooms/{code}/participants/p1")) == {"success": True}
    err(
        call(hub, "DELETE", f"/v1/rooms/{code}/participants/p1"),
        404,
        "PARTICIPANT_NOT_FOUND",
        "Participant not found.",
    )
    assert member.close_code()[0] == 1000  # the reference orphans it; ours closes it
    assert ok(call(hub, "GET", f"/v1/rooms/{code}/participants")) == []


# -- tunnel bootstrap ---------------------------------------------------------------------------------


def _upgrade_status(url: str) -> tuple[int, Any]:
    try:
        with connect(url, open_timeout=WAIT_S):
            return 101, None
    except InvalidStatus as exc:
        return exc.response.status_code, json.loads(exc.response.body or b"null")


def test_tunnel_bootstrap_errors(hub: RunningHub, code: str) -> None:
    data = call(hub, "PUT", f"/v1/rooms/{code}/participants/p1", BODY)[1]["data"]
    url, token = data["tunnel"]["url"], data["tunnel"]["token"]
    status, body = _upgrade_status(url)
    assert (status, body["error"]["message"]) == (400, "Tunnel token is required.")
    status, body = _upgrade_status(url + "?token=nope")
    assert (status, body["error"]["message"]) == (401, "Tunnel token is invalid or expired.")
    status, body = _upgrade_status(url.replace("/p1/", "/ghost/") + "?token=" + token)
    assert (status, body["error"]["code"]) == (404, "PARTICIPANT_NOT_FOUND")
    status, body = _upgrade_status(url.replace(code, "NOPE00") + "?token=" + token)
    assert (status, body["error"]["code"]) == (404, "ROOM_NOT_FOUND")
    # a plain GET is refused and does not use the token up
    e = err(
        call(hub, "GET", f"/v1/rooms/{code}/participants/p1/tunnel?token={token}"),
        400,
        "INTERNAL_ERROR",
        "Failed to upgrade the participant tunnel.",
    )
    assert e["hint"]
    assert _upgrade_status(f"{url}?token={token}")[0] == 101
    assert _upgrade_status(f"{url}?token={token}")[0] == 401  # single use


def test_tunnel_token_expires() -> None:
    with start_hub(limits=Limits(tunnel_token_ttl_s=0.2)) as hub:
        code = ok(call(hub, "POST", "/v1/rooms", {"name": "r"}))["room"]["code"]
        data = call(hub, "PUT", f"/v1/rooms/{code}/participants/p1", BODY)[1]["data"]
        time.sleep(0.4)  # past the TTL: the point of the test, not a wait for the hub
        assert _upgrade_status(f"{data['tunnel']['url']}?token={data['tunnel']['token']}")[0] == 401


# -- messages, liveness, close codes ------------------------------------------------------------------


def test_ping_pong_binary_and_ignored_messages(hub: RunningHub, code: str, member: Participant) -> None:
    before = int(time.time() * 1000)
    member.send({"type": "tunnel.ping", "timestamp": 1})
    pong = member.recv()
    assert pong["type"] == "tunnel.pong" and pong["timestamp"] >= before
    for junk in (
        "hello, not json",
        json.dumps({"type": "tunnel.bogus"}),
        json.dumps({"type": "tunnel.pong", "timestamp": 1}),
        json.dumps({"type": "tunnel.response.end", "requestId": "no-such"}),
        "[1, 2]",
    ):
        member.ws.send(junk)
    member.ws.send(json.dumps({"type": "tunnel.ping", "timestamp": 2}).encode())  # a binary frame
    assert member.recv()["type"] == "tunnel.pong"  # still open, nothing answered to the junk


def test_silent_tunnel_is_closed_with_4001_and_pongs_do_not_count() -> None:
    with start_hub(limits=Limits(tunnel_silence_s=0.5, tunnel_sweep_s=0.1)) as hub:
        code = ok(call(hub, "POST", "/v1/rooms", {"name": "r"}))["room"]["code"]
        p = Participant(hub, code)
        stop = threading.Event()

        def pongs() -> None:
            while not stop.wait(0.1):
                try:
                    p.send({"type": "tunnel.pong", "timestamp": 1})
                except ConnectionClosed:
                    return

        t = threading.Thread(target=pongs, daemon=True)
        t.start()
        assert p.close_code() == (4001, "Tunnel heartbeat timed out.")
        stop.set()
        t.join(WAIT_S)
        wait_for(
            lambda: (
                ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["connection"]["connected"] is False
            ),
            "disconnected",
        )


def test_second_tunnel_supersedes_the_first(hub: RunningHub, code: str, member: Participant) -> None:
    second = Participant(hub, code)
    assert member.close_code() == (1000, "Superseded by a newer tunnel session.")
    second.send({"type": "tunnel.ping", "timestamp": 1})
    assert second.recv()["type"] == "tunnel.pong"
    second.close()


def test_hub_shutdown_sends_1001() -> None:
    hub = start_hub()
    code = ok(call(hub, "POST", "/v1/rooms", {"name": "r"}))["room"]["code"]
    p = Participant(hub, code)
    hub.stop()
    assert p.close_code() == (1001, "Hub shutting down.")


# -- inference through the tunnel ---------------------------------------------------------------------


def test_chat_through_the_tunnel_with_defaults_merged(hub: RunningHub) -> None:
    room = ok(
        call(
            hub,
            "POST",
            "/v1/rooms",
            {
                "name": "D",
                "defaults": {"temperature": 0.3, "max_tokens": 64, "instructions": "Answer briefly."},
            },
        )
    )["room"]["code"]
    p = Participant(hub, room, config={"temperature": 0.9})
    t, out = in_thread(lambda: chat(hub, room, model="p1"))
    req = p.request()
    assert req["operation"] == "chat.completions.create" and req["method"] == "POST"
    assert req["path"] == "/v1/chat/completions" and req["stream"] is False
    assert req["headers"] == {"Content-Type": "application/json"} and re.fullmatch(UUID, req["requestId"])
    assert req["body"] == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
        "temperature": 0.9,
        "max_tokens": 64,
    }
    p.answer(req["requestId"], 201, b'{"choices": ', b'[{"message": {"content": "ok"}}]}')
    t.join(WAIT_S)
    status, data, headers = out[0]
    assert status == 201 and data == {
        "choices": [{"message": {"content": "ok"}}]
    }  # re-serialised, status kept
    assert headers["content-type"] == "application/json;charset=utf-8"
    p.close()


@pytest.mark.parametrize("model", ["p1", "model:fake-model", "fake-model", "*", "any"])
def test_routing(hub: RunningHub, code: str, member: Participant, model: str) -> None:
    t, out = in_thread(lambda: chat(hub, code, model=model))
    req = member.request()
    member.answer(req["requestId"], 200, b"{}")
    t.join(WAIT_S)
    assert out[0][0] == 200


def test_busy_is_409_and_others_skip_it(hub: RunningHub, code: str, member: Participant) -> None:
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    req = member.request()
    assert ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["status"] == "busy"
    status, data, _ = chat(hub, code, model="p1")
    assert (status, data) == (409, {"error": "Participant is already handling another request."})
    for model in ("*", "model:fake-model"):
        assert chat(hub, code, model=model)[:2] == (
            404,
            {"error": "No available participant for the requested model"},
        )
    member.answer(req["requestId"], 200, b"{}")
    t.join(WAIT_S)
    assert out[0][0] == 200


def test_no_tunnel_is_503(hub: RunningHub, code: str) -> None:
    call(hub, "PUT", f"/v1/rooms/{code}/participants/p1", BODY)
    assert chat(hub, code, model="p1")[:2] == (503, {"error": "Participant tunnel is not connected."})


def test_errors_from_the_participant(hub: RunningHub, code: str, member: Participant) -> None:
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    req = member.request()
    member.send(
        {
            "type": "tunnel.response.error",
            "requestId": req["requestId"],
            "stage": "proxy",
            "message": "fake provider exploded",
        }
    )
    t.join(WAIT_S)
    assert out[0][:2] == (502, {"error": "Failed to proxy request: Error: fake provider exploded"})
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    req = member.request()
    member.answer(req["requestId"], 200, b"not json")
    t.join(WAIT_S)
    assert out[0][:2] == (502, {"error": "Failed to proxy request: SyntaxError: Failed to parse JSON"})
    # a start with a status outside 100-599 is ignored; the answer then goes out with the real start
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    req = member.request()
    member.send({"type": "tunnel.response.start", "requestId": req["requestId"], "status": 42, "headers": {}})
    member.answer(req["requestId"], 200, b"{}")
    t.join(WAIT_S)
    assert out[0][0] == 200


_OPEN: list[http.client.HTTPConnection] = []


@pytest.fixture(autouse=True)
def _close_streams() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _stream_request(
    hub: RunningHub, code: str, body: dict[str, Any], path: str = "v1/chat/completions"
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
    _OPEN.append(conn)
    conn.request("POST", f"/rooms/{code}/{path}", body=json.dumps(body))
    return conn.getresponse()


def test_stream_chunks_before_start_error_after_start(
    hub: RunningHub, code: str, member: Participant
) -> None:
    t, out = in_thread(lambda: _stream_request(hub, code, {"model": "p1", "stream": True, "messages": []}))
    req = member.request()
    assert req["stream"] is True and req["body"]["stream"] is True
    member.chunk(req["requestId"], b"data: early\n\n")  # before start: buffered, delivered first
    member.answer(req["requestId"], 200, b"data: one\n\n", end=False)
    t.join(WAIT_S)
    resp = out[0]
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    got = b""
    while b"one" not in got:
        got += resp.read1(65536)
    assert got == b"data: early\n\ndata: one\n\n"
    member.send(
        {"type": "tunnel.response.error", "requestId": req["requestId"], "stage": "proxy", "message": "cut"}
    )
    assert resp.read() == b""  # a clean end of the chunked body, as on the reference


def test_client_gone_mid_stream_frees_the_participant(
    hub: RunningHub, code: str, member: Participant
) -> None:
    events = SSE(hub, code)
    events.until("connected")
    sock = socket.create_connection((hub.host, hub.port), timeout=WAIT_S)
    body = json.dumps({"model": "p1", "stream": True}).encode()
    sock.sendall(
        b"POST /rooms/%s/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (code.encode(), len(body), body)
    )
    req = member.request()
    member.answer(req["requestId"], 200, b"data: first\n\n", end=False)
    got = b""
    while b"first" not in got:
        piece = sock.recv(65536)
        assert piece, got
        got += piece
    sock.close()  # the client leaves in the middle of the stream
    wait_for(
        lambda: ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["status"] == "online",
        "the participant freed",
    )
    for _ in range(5):  # late chunks for the gone client: dropped, the hub stays up (the reference crashes)
        member.chunk(req["requestId"], b"data: late\n\n")
    member.send({"type": "tunnel.response.end", "requestId": req["requestId"]})
    assert ok(call(hub, "GET", "/v1/health"))["status"] == "ok"
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    nxt = member.request()
    member.answer(nxt["requestId"], 200, b"{}")
    t.join(WAIT_S)
    assert out[0][0] == 200
    events.close()


@pytest.mark.slow
def test_first_token_after_more_than_10_s_is_not_cut(hub: RunningHub, code: str, member: Participant) -> None:
    t, out = in_thread(lambda: _stream_request(hub, code, {"model": "p1", "stream": True}))
    req = member.request()
    time.sleep(11)  # longer than the reference hub's idle cut (Bun's 10 s): the point of the test
    member.answer(req["requestId"], 200, b"data: late but fine\n\n")
    t.join(WAIT_S)
    assert out[0].read() == b"data: late but fine\n\n"


def test_tunnel_drop_fails_the_request_in_flight(hub: RunningHub, code: str, member: Participant) -> None:
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    member.request()
    member.close()
    t.join(WAIT_S)
    assert out[0][:2] == (502, {"error": "Failed to proxy request: Error: Participant tunnel disconnected."})
    p = ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]
    assert p["status"] == "offline" and p["connection"] == {
        "kind": "tunnel",
        "connected": False,
        "lastTunnelSeenAt": None,
    }


def test_bad_json_and_missing_model_are_json_not_html(
    hub: RunningHub, code: str, member: Participant
) -> None:
    status, data, headers = call(hub, "POST", f"/rooms/{code}/v1/chat/completions", raw=b"{")
    assert (status, data) == (400, {"error": "Invalid JSON body"}) and headers["content-type"].startswith(
        "application/json"
    )
    status, data, _ = call(hub, "POST", f"/rooms/{code}/v1/chat/completions", {"messages": []})
    assert (status, data) == (404, {"error": "No available participant for the requested model"})


# -- Responses ---------------------------------------------------------------------------------------------


def test_responses_native_then_fallback(hub: RunningHub, code: str, member: Participant) -> None:
    t, out = in_thread(
        lambda: call(hub, "POST", f"/rooms/{code}/v1/responses", {"model": "p1", "input": "hi"})
    )
    first = member.request()
    assert first["operation"] == "responses.create" and first["body"]["instructions"] == "You are a test."
    member.answer(first["requestId"], 404, b'{"error": {"message": "no route /v1/responses"}}')
    second = member.request()
    assert second["operation"] == "chat.completions.create"
    assert second["body"]["messages"] == [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "hi"},
    ]
    member.answer(
        second["requestId"],
        200,
        json.dumps(
            {
                "choices": [{"message": {"content": "Hello from fake"}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        ).encode(),
    )
    t.join(WAIT_S)
    status, data, _ = out[0]
    assert status == 200 and data["object"] == "response" and data["output_text"] == "Hello from fake"
    assert (
        data["output"][0]["content"][0]["text"] == "Hello from fake" and data["usage"]["total_tokens"] == 10
    )
    status, data, _ = call(hub, "GET", f"/rooms/{code}/v1/responses/{data['id']}")
    assert status == 501 and "fallback" in data["error"]


def test_responses_fallback_refuses_store_and_streams_events(hub: RunningHub, code: str) -> None:
    p = Participant(hub, code, capabilities={"openResponses": "unsupported", "chatCompletions": "supported"})
    status, data, _ = call(
        hub, "POST", f"/rooms/{code}/v1/responses", {"model": "p1", "input": "hi", "store": True}
    )
    assert (status, data) == (
        400,
        {"error": "Responses -> chat/completions fallback does not support: store"},
    )
    t, out = in_thread(
        lambda: _stream_request(hub, code, {"model": "p1", "input": "hi", "stream": True}, "v1/responses")
    )
    req = p.request()
    assert req["operation"] == "chat.completions.create"  # unsupported: no native attempt
    deltas = [
        b'data: {"choices": [{"delta": {"content": "Hello"}}]}\n\n',
        b'data: {"choices": [{"delta": {"content": " from"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    p.answer(req["requestId"], 200, *deltas)
    t.join(WAIT_S)
    text = out[0].read().decode()
    kinds = re.findall(r"^event: (\S+)$", text, re.M)
    assert kinds == [
        "response.created",
        "response.output_item.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_item.done",
        "response.completed",
    ]
    assert text.endswith("data: [DONE]\n\n") and '"output_text":"Hello from"' in text
    p.close()


# -- room events and both generations in one room ------------------------------------------------------


class SSEv1(SSE):
    def __init__(self, hub: RunningHub, code: str) -> None:
        self.conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
        self.conn.request("GET", f"/v1/rooms/{code}/events")
        self.resp = self.conn.getresponse()
        self.buf = b""
        self.comments = []


def test_v06_room_events(hub: RunningHub, code: str) -> None:
    events = SSEv1(hub, code)
    connected = events.until("connected")
    assert (
        connected["type"] == "connected" and connected["roomCode"] == code and connected["data"]["clientId"]
    )
    p = Participant(hub, code)
    joined = events.until("participant.joined")
    assert list(joined) == ["type", "timestamp", "roomCode", "data"] and joined["data"]["id"] == "p1"
    assert events.until("participant.updated")["data"]["connection"]["connected"] is True
    t, out = in_thread(lambda: chat(hub, code, model="p1"))
    req = p.request()
    p.answer(req["requestId"], 200, b"{}")
    t.join(WAIT_S)
    request = events.until("llm.request")["data"]
    assert (
        request["participantId"] == "p1"
        and request["model"] == "p1"
        and request["protocol"] == "chatCompletions"
    )
    done = events.until("llm.complete")["data"]
    assert done["requestId"] == request["requestId"] and done["model"] == "fake-model"
    assert set(done["metrics"]) >= {"ttftMs", "durationMs"}
    call(hub, "DELETE", f"/v1/rooms/{code}/participants/p1")
    assert events.until("participant.left")["data"] == {"participantId": "p1"}
    events.close()
    p.close()


def test_event_stream_keepalive_on_v1(hub: RunningHub, code: str) -> None:
    hub.keepalive_s = 0.01
    events = SSEv1(hub, code)
    events.until("connected")
    wait_for(lambda: events.resp.read1(65536).startswith(b": keepalive"), "a keepalive comment")
    events.close()


def test_both_generations_share_a_room(hub: RunningHub, code: str, member: Participant) -> None:
    api = Http(hub)
    v01 = {"id": "old", "nickname": "old-timer", "model": "llama", "endpoint": "http://127.0.0.1:9"}
    assert api("POST", f"/rooms/{code}/join", v01).status == 201
    old_api = api("GET", f"/rooms/{code}/participants").json()["participants"]
    assert [p["id"] for p in old_api] == ["p1", "old"]
    assert set(old_api[0]) == {
        "id",
        "nickname",
        "model",
        "endpoint",
        "specs",
        "config",
        "status",
        "joinedAt",
        "lastSeen",
    }
    new_api = ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))
    assert [p["id"] for p in new_api] == ["p1", "old"]
    assert new_api[1]["connection"]["kind"] == "http" and list(new_api[1]) == PARTICIPANT_KEYS
    models = api("GET", f"/rooms/{code}/v1/models").json()["data"]
    assert {m["id"]: sorted(k for k in m if k.startswith("gambi")) for m in models} == {
        "p1": ["gambi"],
        "old": ["gambiarra"],
    }
    rooms = api("GET", "/rooms").json()["rooms"]
    assert rooms[0]["participantCount"] == 2
    api.close()


def test_a_participant_close_is_echoed_and_an_oversized_message_is_1009(hub: RunningHub, code: str) -> None:
    p = Participant(hub, code)
    p.ws.close(1000, "bye")
    assert p.ws.close_code == 1000 and p.ws.close_reason == "bye"  # the hub echoed code and reason
    wait_for(
        lambda: ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["status"] == "offline", "offline"
    )
    p.close()
    big = Participant(hub, code)
    try:  # the hub may close with 1009 while the frame is still being sent
        big.ws.send(
            json.dumps({"type": "tunnel.ping", "pad": "x" * (hub.limits.max_tunnel_message_bytes + 1)})
        )
    except ConnectionClosed as exc:
        # The close frame races the rest of our send: when the hub's close lands while we still
        # write, the kernel may reset the connection and the 1009 frame is lost on our side. Either
        # way the hub refused the message, dropped the tunnel and kept serving.
        if exc.rcvd is not None:
            assert exc.rcvd.code == 1009
        big.close()
        wait_for(
            lambda: ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["status"] == "offline",
            "offline after the oversized message",
        )
        return
    assert big.close_code()[0] == 1009
    big.close()
