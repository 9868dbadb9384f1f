"""The v0.6 management client, the generation detector and RelayHandler, with injected fakes: a scripted
hub behind httpx.MockTransport (answers copied from the wire recordings) and a scripted local server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.errors import (
    HubProtocolError,
    HubRejected,
    HubUnavailable,
    InvalidPassword,
    ParticipantNotFound,
    RoomNotFound,
    UsageError,
)
from llmroom_cli.protocols.generation import clear_cache, detect_generation
from llmroom_cli.protocols.v06 import (
    CLOSE_MEANINGS,
    RelayHandler,
    TunnelGone,
    V06Client,
    describe_close,
    registration_body,
)
from llmroom_cli.session import JoinPlan

META = {"requestId": "eeaf9f86-e951-4c0d-a898-d2af913c68d9"}
# Verbatim from reference-participant-wire.txt (the PUT answer).
PUT_ANSWER = {
    "data": {
        "participant": {
            "id": "cli-run-0",
            "nickname": "fake-model@cli-ru",
            "model": "fake-model",
            "endpoint": "http://127.0.0.1:40111",
            "config": {"hasInstructions": False},
            "specs": {"ram": 24, "cpu": "Intel(R) Xeon(R) Processor"},
            "capabilities": {"openResponses": "supported", "chatCompletions": "supported"},
            "connection": {"kind": "tunnel", "connected": False, "lastTunnelSeenAt": None},
            "status": "offline",
            "joinedAt": 1796151883140,
            "lastSeen": 1796151883140,
            "updatedAt": 1796151883140,
        },
        "roomId": "xGXPnLsec7mOuVTyJGgo0",
        "tunnel": {
            "token": "800e53d5-e6a6-4ca2-9464-646c4c85716b",
            "url": "ws://127.0.0.1:40130/v1/rooms/EKY-DK/participants/cli-run-0/tunnel",
        },
    },
    "meta": META,
}


def envelope(code: str, message: str, hint: str | None = None, details: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if hint:
        err["hint"] = hint
    if details is not None:
        err["details"] = details
    return {"error": err, "meta": META}


Answer = Callable[[httpx.Request], httpx.Response]


def client_for(
    answer: Answer, base: str = "http://127.0.0.1:40100", **kw: Any
) -> tuple[V06Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return answer(req)

    http = httpx.Client(transport=httpx.MockTransport(handler), trust_env=False)
    return V06Client(http, base, **kw), seen


def test_register_puts_the_plan_and_builds_the_tunnel_url_from_our_own_hub_url() -> None:
    for status in (201, 200):  # created and updated are the same to us
        client, seen = client_for(
            lambda r, s=status: httpx.Response(s, json=PUT_ANSWER), "https://hub.example/gambi/"
        )
        plan = JoinPlan(
            hub_url="https://hub.example/gambi",
            code="eky-dk",
            participant_id="cli-run-0",
            nickname="n",
            model="fake-model",
            endpoint="http://127.0.0.1:40111",
            password="pw",
            specs={"ram": 24},
        )
        body = registration_body(plan, {"chatCompletions": "supported", "openResponses": "unsupported"})
        participant, url, token = client.register("eky-dk", "cli-run-0", {**body, "authHeaders": {"x": "y"}})
        assert participant["id"] == "cli-run-0"
        assert token == "800e53d5-e6a6-4ca2-9464-646c4c85716b"
        # The hub said ws://127.0.0.1:40130 (the Host it saw); we are behind TLS at hub.example/gambi.
        assert url == "wss://hub.example/gambi/v1/rooms/eky-dk/participants/cli-run-0/tunnel"
        req = seen[0]
        assert req.method == "PUT" and req.url.path == "/gambi/v1/rooms/eky-dk/participants/cli-run-0"
        sent = json.loads(req.content)
        assert sent == {
            "nickname": "n",
            "model": "fake-model",
            "endpoint": "http://127.0.0.1:40111",
            "password": "pw",
            "specs": {"ram": 24},
            "capabilities": {"chatCompletions": "supported", "openResponses": "unsupported"},
        }
    plain, _ = client_for(lambda r: httpx.Response(201, json=PUT_ANSWER), "http://10.0.0.5:3000")
    assert plain.tunnel_url("A_B-CD", "p/1") == "ws://10.0.0.5:3000/v1/rooms/A_B-CD/participants/p%2F1/tunnel"


def test_error_envelopes_map_to_the_error_tree_with_the_hubs_hint() -> None:
    cases: list[tuple[int, dict[str, Any], type[Exception], int]] = [
        (
            404,
            envelope(
                "ROOM_NOT_FOUND", "Room not found.", "Run 'gambi room list' to inspect available rooms."
            ),
            RoomNotFound,
            3,
        ),
        (401, envelope("INVALID_PASSWORD", "Invalid password."), InvalidPassword, 4),
        (404, envelope("PARTICIPANT_NOT_FOUND", "Participant not found."), ParticipantNotFound, 1),
        (
            404,
            envelope("INVALID_REQUEST", "Route not found.", "Check the requested path and HTTP method."),
            HubProtocolError,
            5,
        ),
        (500, envelope("INTERNAL_ERROR", "boom"), HubUnavailable, 5),
    ]
    for status, body, cls, exit_code in cases:
        client, _ = client_for(lambda r, s=status, b=body: httpx.Response(s, json=b))
        with pytest.raises(cls) as info:
            client.register("EKY-DK", "p1", {"nickname": "n", "model": "m", "endpoint": "http://x"})
        assert info.value.exit_code == exit_code  # type: ignore[attr-defined]
        if cls is RoomNotFound:
            assert info.value.hint == "Run 'gambi room list' to inspect available rooms."  # type: ignore[attr-defined]
            assert "EKY-DK" in str(info.value)


def test_a_400_shows_its_details() -> None:
    details = {"fieldErrors": {"temperature": ["Too big: expected number to be <=2"]}}
    client, _ = client_for(
        lambda r: httpx.Response(
            400, json=envelope("INVALID_REQUEST", "Invalid room defaults.", details=details)
        )
    )
    with pytest.raises(HubRejected) as info:
        client.create_room("r", defaults={"temperature": 9})
    assert info.value.status == 400
    assert "Invalid room defaults." in info.value.message
    assert "Too big: expected number to be <=2" in info.value.message


def test_html_and_non_envelopes_are_protocol_errors_and_a_huge_answer_is_refused() -> None:
    html = lambda r: httpx.Response(200, text="<html>hi</html>", headers={"content-type": "text/html"})  # noqa: E731
    client, _ = client_for(html)
    with pytest.raises(HubProtocolError):
        client.list_rooms()
    big = json.dumps({"data": ["x" * 1000] * 200}).encode()
    client, _ = client_for(lambda r: httpx.Response(200, content=big), max_bytes=10_000)
    with pytest.raises(HubProtocolError, match="more than 10000 bytes"):
        client.list_rooms()


def test_every_call_has_a_whole_exchange_deadline() -> None:
    # A hub that drips its answer: each read is quick, the whole answer never ends in time.
    def drip() -> Iterator[bytes]:
        yield b'{"data": ['
        for _ in range(10_000):
            time.sleep(0.01)
            yield b'"x",'

    client, _ = client_for(lambda r: httpx.Response(200, content=drip()))
    with pytest.raises(HubUnavailable, match="did not answer in time"):
        client.heartbeat("ROOM", "p1", timeout_s=0.2)
    frozen = lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("timed out", request=r))  # noqa: E731
    client, _ = client_for(frozen)
    with pytest.raises(HubUnavailable):
        client.delete("ROOM", "p1", timeout_s=0.2)
    gone = lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r))  # noqa: E731
    client, _ = client_for(gone)
    with pytest.raises(HubUnavailable, match="cannot reach"):
        client.health()


def test_routes_and_their_answers() -> None:
    room = {
        "id": "zr3",
        "code": "ZZEZHF",
        "name": "Open Room",
        "passwordProtected": False,
        "participantCount": 0,
    }

    def hub(req: httpx.Request) -> httpx.Response:
        route = f"{req.method} {req.url.path}"
        answers = {
            "GET /v1/health": {"status": "ok", "timestamp": 1},
            "POST /v1/rooms": {"room": room, "hostId": "h"},
            "GET /v1/rooms": [room],
            "GET /v1/rooms/ZZEZHF": room,
            "GET /v1/rooms/ZZEZHF/participants": [PUT_ANSWER["data"]["participant"]],
            "POST /v1/rooms/ZZEZHF/participants/p1/heartbeat": {
                "success": True,
                "status": "busy",
                "lastSeen": 5,
            },
            "DELETE /v1/rooms/ZZEZHF/participants/p1": {"success": True},
        }
        return httpx.Response(
            201 if req.method == "POST" and "rooms" == req.url.path[-5:] else 200,
            json={"data": answers[route], "meta": META},
        )

    client, seen = client_for(hub)
    assert client.health()["status"] == "ok"
    assert (
        client.create_room("Open Room", password="pw", defaults={"temperature": 0.3})["room"]["code"]
        == "ZZEZHF"
    )
    assert json.loads(seen[-1].content) == {
        "name": "Open Room",
        "password": "pw",
        "defaults": {"temperature": 0.3},
    }
    assert client.list_rooms() == [room]
    assert client.room("ZZEZHF") == room
    assert client.participants("ZZEZHF")[0]["connection"]["kind"] == "tunnel"
    assert client.heartbeat("ZZEZHF", "p1") == "busy"
    assert seen[-1].content == b""  # the heartbeat carries no body (the reference sends Content-Length: 0)
    client.delete("ZZEZHF", "p1")


def test_close_codes_each_have_a_meaning() -> None:
    assert "superseded" not in describe_close(1000, "bye")
    assert "another agent" in describe_close(1000, "Superseded by a newer tunnel session.")
    assert "30 s" in describe_close(4001, "Tunnel heartbeat timed out.")
    assert "shutting down" in describe_close(1001, "Hub shutting down.")
    assert "without a close frame" in describe_close(None, "")
    assert "4999" in describe_close(4999, "")
    assert len(set(CLOSE_MEANINGS.values())) == len(CLOSE_MEANINGS)


# -- the generation detector ------------------------------------------------------------------------


def hub_of(v01: bool, v06: bool) -> Answer:
    route_not_found = envelope("INVALID_REQUEST", "Route not found.")

    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/v1/health":
            if v06:
                return httpx.Response(200, json={"data": {"status": "ok", "timestamp": 1}, "meta": META})
            return httpx.Response(404, json={"error": "Not found"})
        if req.url.path == "/health":
            if v01:
                return httpx.Response(200, json={"status": "ok", "timestamp": 1})
            return httpx.Response(404, json=route_not_found)
        return httpx.Response(404)

    return answer


@pytest.mark.parametrize(
    ("v01", "v06", "expected"), [(True, False, "v0.1"), (False, True, "v0.6"), (True, True, "both")]
)
def test_detect_generation(v01: bool, v06: bool, expected: str) -> None:
    clear_cache()
    seen: list[str] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.path)
        return hub_of(v01, v06)(req)

    http = httpx.Client(transport=httpx.MockTransport(answer), trust_env=False)
    assert detect_generation(http, "http://127.0.0.1:9/") == expected
    assert detect_generation(http, "http://127.0.0.1:9") == expected
    assert seen == ["/v1/health", "/health"]  # one probe per run: the second answer came from the cache
    clear_cache()


def test_detect_generation_forced_and_failures() -> None:
    clear_cache()
    calls: list[str] = []

    def nothing(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.path)
        return httpx.Response(200, text="<html>router</html>")

    http = httpx.Client(transport=httpx.MockTransport(nothing), trust_env=False)
    assert detect_generation(http, "http://h:1", forced="v0.6") == "v0.6"
    assert detect_generation(http, "http://h:1", forced="v0.1") == "v0.1"
    assert calls == []
    with pytest.raises(UsageError):
        detect_generation(http, "http://h:1", forced="v9")
    with pytest.raises(HubProtocolError, match="not a hub"):
        detect_generation(http, "http://h:1")

    def refused(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(HubUnavailable):
        detect_generation(httpx.Client(transport=httpx.MockTransport(refused)), "http://h:2")
    clear_cache()


# -- RelayHandler -----------------------------------------------------------------------------------


class Frames:
    """A `send` that records frames; optionally the tunnel goes away after `gone_after` frames."""

    def __init__(self, gone_after: int | None = None) -> None:
        self.frames: list[dict[str, Any]] = []
        self.gone_after = gone_after
        self.lock = threading.Lock()

    def __call__(self, frame: dict[str, Any]) -> None:
        with self.lock:
            if self.gone_after is not None and len(self.frames) >= self.gone_after:
                raise TunnelGone()
            self.frames.append(frame)

    def types(self) -> list[str]:
        return [f["type"].rsplit(".", 1)[-1] for f in self.frames]

    def body(self) -> bytes:
        return b"".join(base64.b64decode(f["chunk"]) for f in self.frames if f["type"].endswith("chunk"))


def request(stream: bool, body: Any = None) -> dict[str, Any]:
    return {
        "type": "tunnel.request",
        "requestId": "c089760b-70fa-4787-a373-54ce62694624",
        "operation": "chat.completions.create",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": {"Content-Type": "application/json"},
        "body": body if body is not None else {"model": "m", "messages": [], "stream": stream},
        "stream": stream,
    }


def test_a_plain_answer_goes_back_as_start_chunks_end_with_at_most_1_mib_per_frame() -> None:
    big = json.dumps({"text": "y" * (3 * 1024 * 1024 + 17)}).encode()
    seen: list[tuple[str, str, dict[str, str], bytes | None]] = []

    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        seen.append((method, path, headers, body))
        return 200, {"Content-Type": "application/json", "Content-Length": str(len(big))}, iter([big])

    send = Frames()
    RelayHandler(upstream)(request(False), send)
    assert send.types() == ["start", "chunk", "chunk", "chunk", "chunk", "end"]
    assert send.frames[0]["status"] == 200 and "content-length" not in send.frames[0]["headers"]
    assert all(len(base64.b64decode(f["chunk"])) <= 1024 * 1024 for f in send.frames[1:-1])
    assert send.body() == big
    assert json.loads(seen[0][3] or b"") == {"model": "m", "messages": [], "stream": False}


def test_a_non_json_plain_answer_becomes_json_keeping_an_error_status() -> None:
    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        return 500, {"content-type": "text/html"}, iter([b"<html>oops</html>"])

    send = Frames()
    RelayHandler(upstream)(request(False), send)
    assert send.types() == ["start", "chunk", "end"]
    assert send.frames[0]["status"] == 500
    assert "non-JSON (text/html" in json.loads(send.body())["error"]["message"]


def test_an_upstream_failure_is_an_error_frame_with_stage_proxy() -> None:
    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        raise ConnectionRefusedError("the local server is down")

    for stream in (False, True):
        send = Frames()
        RelayHandler(upstream)(request(stream), send)
        assert send.frames == [
            {
                "type": "tunnel.response.error",
                "requestId": request(stream)["requestId"],
                "stage": "proxy",
                "message": "the local server is down",
            }
        ]


def test_a_slow_stream_gets_start_then_keepalives_until_the_first_byte() -> None:
    release = threading.Event()

    def slow() -> Iterator[bytes]:
        release.wait(10)
        yield b"data: {}\n\n"
        yield b"data: [DONE]\n\n"

    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        return 200, {"content-type": "text/event-stream"}, slow()

    send = Frames()
    worker = threading.Thread(target=RelayHandler(upstream, keepalive_s=0.02), args=(request(True), send))
    worker.start()
    # Wait (hang-guarded) for three keepalives, then let the server answer.
    deadline = time.monotonic() + 30
    while send.body().count(b": keepalive\n\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    worker.join(30)
    assert send.types()[0] == "start" and send.types()[-1] == "end"
    assert send.frames[0]["status"] == 200
    assert send.body().startswith(b": keepalive\n\n: keepalive\n\n: keepalive\n\n")
    assert send.body().endswith(b"data: {}\n\ndata: [DONE]\n\n")


def test_a_stream_whose_server_answers_slowly_gets_a_synthetic_start() -> None:
    release = threading.Event()

    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        release.wait(10)  # the headers themselves are late (the server queues the request)
        return 429, {"content-type": "application/json"}, iter([b'{"error": "busy"}'])

    send = Frames()
    worker = threading.Thread(target=RelayHandler(upstream, keepalive_s=0.02), args=(request(True), send))
    worker.start()
    deadline = time.monotonic() + 30
    while len(send.frames) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    worker.join(30)
    # start went out as 200 text/event-stream to keep the client; the late answer's body follows.
    assert send.frames[0]["status"] == 200
    assert send.frames[0]["headers"]["content-type"] == "text/event-stream"
    assert send.body().endswith(b'{"error": "busy"}') and send.types()[-1] == "end"


def test_nothing_is_sent_once_the_tunnel_is_gone_and_the_upstream_is_closed() -> None:
    closed = threading.Event()

    class Chunks:
        def __iter__(self) -> Iterator[bytes]:
            for i in range(1000):
                yield f"data: {i}\n\n".encode()

        def close(self) -> None:
            closed.set()

    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        return 200, {"content-type": "text/event-stream"}, Chunks()

    send = Frames(gone_after=3)
    RelayHandler(upstream)(request(True), send)
    assert len(send.frames) == 3
    assert closed.wait(10)


def test_importing_the_v06_module_does_not_import_websockets() -> None:
    code = (
        "import sys, llmroom_cli.protocols.v06, llmroom_cli.protocols.generation;"
        " print('websockets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_keepalive_goes_into_a_streamed_json_error_body() -> None:
    release = threading.Event()

    def late() -> Iterator[bytes]:
        release.wait(10)
        yield b'{"error": "model is loading"}'

    def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        return 503, {"content-type": "application/json"}, late()

    send = Frames()
    worker = threading.Thread(target=RelayHandler(upstream, keepalive_s=0.02), args=(request(True), send))
    worker.start()
    deadline = time.monotonic() + 30
    while not send.frames and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # several keepalive periods pass with the body still pending
    release.set()
    worker.join(30)
    assert send.frames[0]["status"] == 503
    assert send.body() == b'{"error": "model is loading"}'


def test_from_core_adapts_the_relay_cores_upstream_and_closes_it_on_its_own_thread() -> None:
    class Upstream:
        def __init__(self) -> None:
            self.status = 200
            self.headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")]
            self.threads: set[int] = set()
            self.closed = False

        def __iter__(self) -> Iterator[bytes]:
            self.threads.add(threading.get_ident())
            yield b"data: 1\n\n"
            yield b"data: [DONE]\n\n"

        def close(self) -> None:
            self.threads.add(threading.get_ident())
            self.closed = True

    class Core:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, dict[str, str], bytes | None]] = []
            self.upstream = Upstream()

        def open(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Upstream:
            self.calls.append((method, path, headers, body))
            return self.upstream

    core = Core()
    send = Frames()
    RelayHandler.from_core(core)(request(True), send)
    assert core.calls[0][:2] == ("POST", "/v1/chat/completions")
    assert send.frames[0]["headers"] == {"content-type": "text/event-stream"}  # hop-by-hop dropped
    assert send.body() == b"data: 1\n\ndata: [DONE]\n\n" and send.types()[-1] == "end"
    deadline = time.monotonic() + 30
    while not core.upstream.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.upstream.closed and len(core.upstream.threads) == 1  # iterated and closed on one thread
