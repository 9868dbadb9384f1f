"""The embedded hub against an attacker (issue 11): each test here fails on the hub it replaced.

Loopback only: a second client address is 127.0.0.2 (all of 127/8 is this machine), and an address
that is not the joiner's is checked at the relay's decision, without dialing anything.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmroom_cli.hub import Limits, RunningHub, start_hub
from llmroom_cli.hub import context as hub_context
from llmroom_cli.hub.context import Context
from llmroom_cli.hub.relay import _pick_address
from llmroom_cli.hub.state import HubState, Refused, Target
from tests.helpers import WAIT_S, wait_for
from tests.test_hub_v06 import BODY, Participant, call, err, ok
from tests.test_server_contract import member
from tests.test_server_relay import FakeLLM

OTHER = "127.0.0.2"  # another client address on this machine


def call_from(
    source: str,
    hub: RunningHub,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Any:
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S, source_address=(source, 0))
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload else None


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM("A")
    yield fake
    fake.stop()


def chat(hub: RunningHub, code: str, **body: Any) -> tuple[int, Any]:
    status, data = call_from(
        "127.0.0.1", hub, "POST", f"/rooms/{code}/v1/chat/completions", {"messages": [], **body}
    )
    return status, data


# -- open relay (SSRF) ----------------------------------------------------------------------------------


def _target(source: str, endpoint: str) -> Target:
    return Target("p", "n", "m", endpoint, "v0.1", source, None, {}, {}, None)


def _decide(target: Target, limits: Limits | None = None, port: int = 1) -> Any:
    async def run() -> Any:
        ctx = Context(HubState(), limits or Limits(), 30.0, port=port)
        try:
            return await _pick_address(ctx, target)
        except Refused as exc:
            return exc.status

    return asyncio.run(run())


def test_a_remote_joiner_is_relayed_to_only_at_its_own_address() -> None:
    remote = "192.0.2.7"  # TEST-NET: decided on, never dialed
    assert _decide(_target(remote, "http://127.0.0.1:11434")) == 403
    assert _decide(_target(remote, "http://10.1.2.3:11434")) == 403
    assert _decide(_target(remote, "http://2130706433:11434")) == 403  # 127.0.0.1 spelt as a number
    assert _decide(_target(remote, "http://192.0.2.7:11434")) == ("192.0.2.7", 11434)
    allowed = Limits(allow_relay_to=(ipaddress.ip_network("10.0.0.0/8"),))  # serve --allow-relay-to
    assert _decide(_target(remote, "http://10.1.2.3:11434"), allowed) == ("10.1.2.3", 11434)
    # a participant on the hub's machine may use loopback, but never the hub's own port
    assert _decide(_target("127.0.0.1", "http://localhost:11434")) in (("127.0.0.1", 11434), ("::1", 11434))
    assert _decide(_target("127.0.0.1", "http://127.0.0.1:3000"), port=3000) == 508


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_relay_refuses_endpoints_off_the_joining_address(hub: RunningHub, llm: FakeLLM, host: str) -> None:
    code = hub.state.create_room("r")["code"]
    port = llm.url.rsplit(":", 1)[1]
    assert (
        call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member(endpoint=f"http://{host}:{port}"))[
            0
        ]
        == 201
    )
    status, data = chat(hub, code, model="p1")
    assert status == 403 and "--allow-relay-to" in data["error"]
    assert llm.requests == []


def test_redirects_are_never_followed(hub: RunningHub, llm: FakeLLM) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", llm.url + "/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        code = hub.state.create_room("r")["code"]
        endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member(endpoint=endpoint))
        status, data = chat(hub, code, model="p1")
        assert status == 502 and "redirect" in data["error"]
        assert llm.requests == []
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- relay loops ------------------------------------------------------------------------------------------


def test_an_endpoint_pointing_at_the_hub_is_one_request_not_thousands(hub: RunningHub) -> None:
    code = hub.state.create_room("loop")["code"]
    call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member(endpoint=f"{hub.url}/rooms/{code}"))
    before = hub.requests_seen()
    status, data = chat(hub, code, model="p1")
    assert status == 508 and "loop" in data["error"].lower()
    assert hub.requests_seen() == before + 1  # the chat request itself, and nothing it caused
    status, _ = call_from(
        "127.0.0.1",
        hub,
        "POST",
        f"/rooms/{code}/v1/chat/completions",
        {"model": "p1"},
        {"X-Llmroom-Relay": "1"},
    )
    assert status == 508


# -- taking over or removing someone else's participant ---------------------------------------------------


def test_v01_participant_changes_only_from_its_address_until_it_is_gone(hub: RunningHub) -> None:
    code = hub.state.create_room("r")["code"]
    assert call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member())[0] == 201
    hijack = member(endpoint="http://127.0.0.2:9")
    assert call_from(OTHER, hub, "POST", f"/rooms/{code}/join", hijack)[0] == 403
    assert call_from(OTHER, hub, "DELETE", f"/rooms/{code}/leave/p1")[0] == 403
    (p,) = hub.state.participants(code)
    assert p["endpoint"] == "http://127.0.0.1:9"
    assert call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member())[0] == 201  # itself: fine
    hub.state.sweep(0.0)  # it went silent: now another address may reclaim the id (a changed DHCP lease)
    assert call_from(OTHER, hub, "POST", f"/rooms/{code}/join", hijack)[0] == 201
    assert hub.state.participants(code)[0]["endpoint"] == "http://127.0.0.2:9"


def test_v01_heartbeats_keep_a_participant_alive_only_from_its_address(hub: RunningHub) -> None:
    code = hub.state.create_room("r")["code"]
    assert call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member())[0] == 201
    health = f"/rooms/{code}/health"
    # Someone else cannot keep it "online" (so its prompts keep going to a dead agent) ...
    assert call_from(OTHER, hub, "POST", health, {"id": "p1"})[0] == 403
    assert call_from("127.0.0.1", hub, "POST", health, {"id": "p1"})[0] == 200
    hub.state.sweep(0.0)  # ... and once it is gone, a heartbeat from a new address is told to re-join
    status, data = call_from(OTHER, hub, "POST", health, {"id": "p1"})
    assert (status, data["error"]) == (404, "Participant not found")
    assert hub.state.participants(code)[0]["status"] == "offline"


def test_v06_participant_changes_only_from_its_tunnel_address_until_it_is_gone() -> None:
    with start_hub(participant_timeout_s=0.5) as hub:
        code = ok(call(hub, "POST", "/v1/rooms", {"name": "r"}))["room"]["code"]
        p = Participant(hub, code)
        path = f"/v1/rooms/{code}/participants/p1"
        status, data = call_from(OTHER, hub, "PUT", path, {**BODY, "endpoint": "http://evil:1"})
        assert (status, data["error"]["code"]) == (403, "PARTICIPANT_CONFLICT")
        assert call_from(OTHER, hub, "DELETE", path)[0] == 403
        assert call_from(OTHER, hub, "POST", path + "/heartbeat")[0] == 403
        assert ok(call(hub, "GET", f"/v1/rooms/{code}/participants"))[0]["endpoint"] == BODY["endpoint"]
        p.close()  # gone: no tunnel; once silent for the timeout, a new address may reclaim the id
        wait_for(lambda: call_from(OTHER, hub, "PUT", path, BODY)[0] == 200, "the id to be reclaimable")


# -- passwords --------------------------------------------------------------------------------------------


def test_password_failures_are_rate_limited_per_source(hub: RunningHub) -> None:
    code = hub.state.create_room("locked", password="hunter22")["code"]
    path = f"/rooms/{code}/join"
    for _ in range(hub.limits.password_failures):
        assert call_from("127.0.0.1", hub, "POST", path, member(password="guess"))[0] == 401
    status, data = call_from("127.0.0.1", hub, "POST", path, member(password="hunter22"))
    assert status == 429 and "Too many failed password attempts" in data["error"]
    status, data = call_from(
        "127.0.0.1", hub, "PUT", f"/v1/rooms/{code}/participants/x", {**BODY, "password": "guess"}
    )
    assert status == 429 and data["error"]["code"] == "RATE_LIMITED"
    assert call_from(OTHER, hub, "POST", path, member(password="hunter22"))[0] == 201  # another source


def test_asking_without_a_password_is_no_guess(hub: RunningHub) -> None:
    # An agent learns that a room is protected by joining without one, then asks its user: that first
    # answer must not use up the tries its user has.
    code = hub.state.create_room("locked", password="hunter22")["code"]
    path = f"/rooms/{code}/join"
    for _ in range(hub.limits.password_failures + 2):
        assert call_from("127.0.0.1", hub, "POST", path, member())[0] == 401
    assert call_from("127.0.0.1", hub, "POST", path, member(password="hunter22"))[0] == 201


def test_password_hashing_runs_at_most_two_at_once(hub: RunningHub, monkeypatch: pytest.MonkeyPatch) -> None:
    code = hub.state.create_room("locked", password="pw")["code"]
    real = hub_context.hash_password
    running, peak = [0], [0]
    lock = threading.Lock()

    def counted(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)  # long enough for the others to pile up behind the bound
            return real(password, salt)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(hub_context, "hash_password", counted)
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member(f"p{i}", password="pw"))[0]
            )
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert results == [201] * 8
    assert peak[0] == hub.limits.password_hash_concurrency == 2


# -- memory -----------------------------------------------------------------------------------------------


def test_rooms_participants_stored_sizes_and_buffered_answers_are_bounded(llm: FakeLLM) -> None:
    limits = Limits(
        max_rooms=2, max_participants_per_room=2, max_stored_bytes=1000, max_buffered_answer_bytes=100
    )
    with start_hub(limits=limits) as hub:
        codes = [call(hub, "POST", "/rooms", {"name": f"r{i}"})[1]["room"]["code"] for i in range(2)]
        status, data, _ = call(hub, "POST", "/rooms", {"name": "one too many"})
        assert status == 507 and "Too many rooms" in data["error"]
        err(
            call(hub, "POST", "/v1/rooms", {"name": "and here"}),
            507,
            "LIMIT_EXCEEDED",
            "Too many rooms on this hub (at most 2)",
        )
        code = codes[0]
        status, data, _ = call(hub, "POST", f"/rooms/{code}/join", member("big", specs={"blob": "x" * 2000}))
        assert status == 413
        for pid in ("a", "b"):
            assert call(hub, "POST", f"/rooms/{code}/join", member(pid, endpoint=llm.url))[0] == 201
        status, data, _ = call(hub, "POST", f"/rooms/{code}/join", member("c"))
        assert status == 507 and "Room is full" in data["error"]
        assert (
            call(hub, "POST", f"/rooms/{code}/join", member("a", endpoint=llm.url))[0] == 201
        )  # a rejoin fits
        big = "x" * 200  # FakeLLM echoes the model: an answer over the 100-byte bound
        hub.state.forget_participant(code, "b")
        call(hub, "POST", f"/rooms/{code}/join", member("b", model=big, endpoint=llm.url))
        status, data, _ = call(hub, "POST", f"/rooms/{code}/v1/chat/completions", {"model": "b"})
        assert status == 507 and '"stream": true' in data["error"]


# -- connections and deadlines ------------------------------------------------------------------------------


def test_slowloris_is_cut_at_the_header_deadline() -> None:
    with start_hub(limits=Limits(idle_timeout_s=0.5)) as hub:
        sock = socket.create_connection((hub.host, hub.port), timeout=WAIT_S)
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(0.1):  # one byte every 100 ms: never a whole header
                try:
                    sock.send(b"s")
                except OSError:
                    return

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            assert sock.recv(65536) == b""  # closed by the hub (the old hub held it 140 s and more)
        except ConnectionResetError:
            pass
        stop.set()
        t.join(WAIT_S)
        sock.close()


def test_a_body_that_never_arrives_is_408() -> None:
    with start_hub(limits=Limits(body_timeout_s=0.3)) as hub:
        sock = socket.create_connection((hub.host, hub.port), timeout=WAIT_S)
        sock.sendall(b'POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"name"')
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
        sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_that_hangs_gives_an_error_within_the_bound(stream: bool) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog and are never answered
    try:
        limits = Limits(upstream_answer_s=0.3, upstream_idle_s=0.3)
        with start_hub(limits=limits) as hub:
            code = hub.state.create_room("r")["code"]
            endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
            call(hub, "POST", f"/rooms/{code}/join", member(endpoint=endpoint))
            status, data = chat(hub, code, model="p1", stream=stream)
            assert status == 504 and data == {"error": "Participant did not answer in time"}
    finally:
        silent.close()


def test_relayed_bodies_nested_too_deep_are_refused(hub: RunningHub, llm: FakeLLM) -> None:
    code = hub.state.create_room("r")["code"]
    call(hub, "POST", f"/rooms/{code}/join", member(endpoint=llm.url))
    deep = json.loads("[" * 40 + "]" * 40)
    status, data = chat(hub, code, model="p1", tools=deep)
    assert (status, data) == (400, {"error": "Request body is nested too deeply"})
    assert llm.requests == []


# -- cross-origin writes ------------------------------------------------------------------------------------


def test_cross_origin_pages_may_read_and_chat_but_not_change_the_room(hub: RunningHub, llm: FakeLLM) -> None:
    code = hub.state.create_room("r")["code"]
    call(hub, "POST", f"/rooms/{code}/join", member(endpoint=llm.url))
    evil = {"Origin": "http://evil.example"}
    assert call_from("127.0.0.1", hub, "DELETE", f"/rooms/{code}/leave/p1", headers=evil)[0] == 403
    assert call_from("127.0.0.1", hub, "POST", f"/rooms/{code}/join", member("p2"), headers=evil)[0] == 403
    assert call_from("127.0.0.1", hub, "POST", "/rooms", {"name": "x"}, headers=evil)[0] == 403
    assert (
        call_from("127.0.0.1", hub, "PUT", f"/v1/rooms/{code}/participants/p3", BODY, headers=evil)[0] == 403
    )
    assert [p["id"] for p in hub.state.participants(code)] == ["p1"]
    assert call_from("127.0.0.1", hub, "GET", f"/rooms/{code}/participants", headers=evil)[0] == 200
    status, data = call_from(
        "127.0.0.1", hub, "POST", f"/rooms/{code}/v1/chat/completions", {"model": "p1"}, headers=evil
    )
    assert (status, data["who"]) == (200, "A")  # dashboards may chat
    same = {"Origin": hub.url}
    assert call_from("127.0.0.1", hub, "DELETE", f"/rooms/{code}/leave/p1", headers=same)[0] == 200
