"""The fake reference hub's own test controls, which the agent's v0.6 tests rely on.

The wire behaviour itself is checked in test_hub_v06_contract.py (against the fake and llmroom's hub);
here: freeze, restart, hub-side closes and drops, the oversized-frame drop, Bun's idle cut, the logs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fake_gambi_v06 import FakeGambiV06
from tests.v06_wire import Inference, Mgmt, TunnelPeer


@pytest.fixture
def fake() -> Iterator[FakeGambiV06]:
    with FakeGambiV06() as hub:
        yield hub


@pytest.fixture
def mgmt(fake: FakeGambiV06) -> Iterator[Mgmt]:
    with Mgmt(fake.url) as client:
        yield client


def _join(mgmt: Mgmt, code: str, pid: str = "p1") -> TunnelPeer:
    _url, token = mgmt.register(code, pid)
    peer = TunnelPeer.open(mgmt.tunnel_url(code, pid, token))
    assert mgmt.heartbeat(code, pid).data["status"] == "online"
    return peer


def test_freeze_stops_answering_http_and_ws_until_unfreeze(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    code = fake.create_room("Frozen")
    peer = _join(mgmt, code)
    fake.freeze()
    with Mgmt(fake.url, timeout_s=0.5) as impatient, pytest.raises(httpx.TimeoutException):
        impatient.health()
    peer.ping()
    assert peer.nothing_within(0.5), "a frozen hub answered a ping"
    answered: list[int] = []
    late = threading.Thread(target=lambda: answered.append(mgmt.heartbeat(code, "p1").status))
    late.start()
    fake.unfreeze()
    assert peer.next()["type"] == "tunnel.pong"  # what queued is answered after the thaw
    late.join(10)
    assert answered == [200]
    peer.close()


@pytest.mark.parametrize("graceful", [True, False], ids=["sigint", "sigkill"])
def test_restart_keeping_rooms(fake: FakeGambiV06, mgmt: Mgmt, graceful: bool) -> None:
    code = fake.create_room("Kept")
    peer = _join(mgmt, code)
    port = fake.port
    fake.restart(keep_rooms=True, graceful=graceful)
    assert peer.wait_closed() == ((1001, "Hub shutting down.") if graceful else (None, None))
    assert fake.port == port
    p = mgmt.participant(code, "p1")
    assert p is not None and p["status"] == "offline" and p["connection"]["connected"] is False
    again = _join(mgmt, code)  # the reconnect path: PUT again, new tunnel
    assert mgmt.participant(code, "p1")["status"] == "online"
    again.close()


def test_restart_losing_rooms(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    code = fake.create_room("Lost")
    peer = _join(mgmt, code)
    fake.restart(keep_rooms=False)
    peer.wait_closed()
    assert mgmt.room(code).status == 404
    assert mgmt.put(code, "p1").error["code"] == "ROOM_NOT_FOUND"


def test_close_tunnel_and_drop_tunnel(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    code = fake.create_room("Closes")
    peer = _join(mgmt, code)
    fake.close_tunnel("p1", 4001, "Tunnel heartbeat timed out.")
    assert peer.wait_closed() == (4001, "Tunnel heartbeat timed out.")
    peer = _join(mgmt, code)
    fake.drop_tunnel("p1")
    assert peer.wait_closed() == (None, None)
    fake.wait_for(lambda: fake.participant(code, "p1")["status"] == "offline", "offline after the drop")


def test_delete_participant_control_leaves_the_socket_open(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    code = fake.create_room("Deleted")
    peer = _join(mgmt, code)
    assert fake.delete_participant(code, "p1") is True
    assert fake.delete_participant(code, "p1") is False
    assert mgmt.heartbeat(code, "p1").status == 404
    assert not peer.closed
    peer.close()


def test_an_oversized_frame_drops_the_tcp_connection() -> None:
    with FakeGambiV06(max_frame_bytes=64 * 1024) as fake, Mgmt(fake.url) as mgmt:
        code = fake.create_room("Frames")
        peer = _join(mgmt, code)
        peer.chunk("no-such-request", b"x" * 40 * 1024)  # ~55 KB of base64: under the limit
        peer.ping()
        assert peer.next()["type"] == "tunnel.pong"
        peer.chunk("no-such-request", b"x" * 64 * 1024)
        assert peer.wait_closed() == (None, None)  # no close frame, as the reference at 18.2 MB
        sizes = [f.size for f in fake.frames if f.direction == "in" and f.kind == "text"]
        assert max(sizes) > 64 * 1024


def test_a_stream_silent_past_the_idle_timeout_is_cut_and_the_participant_freed() -> None:
    with (
        FakeGambiV06(client_idle_timeout_s=0.5, crash_on_late_chunk=False) as fake,
        Mgmt(fake.url) as mgmt,
        Inference(fake.url) as inference,
        ThreadPoolExecutor(2) as pool,
    ):
        code = fake.create_room("Idle")
        peer = _join(mgmt, code)

        def stream() -> str:
            try:
                inference.chat(code, "p1", "ttft:long", stream=True)
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return "answered"

        client = pool.submit(stream)
        req = peer.next_request()
        peer.start(req.id, 200, {"content-type": "text/event-stream"})
        assert client.result(10) != "answered"  # cut before any byte of the body
        fake.wait_for(lambda: fake.participant(code, "p1")["status"] == "online", "the participant freed")
        peer.chunk(req.id, b"data: late\n\n")  # crash_on_late_chunk=False: ignored
        peer.ping()
        assert peer.next()["type"] == "tunnel.pong"
        assert not fake.crashed.is_set()


def test_keepalive_comments_keep_a_slow_stream_alive() -> None:
    with (
        FakeGambiV06(client_idle_timeout_s=0.5) as fake,
        Mgmt(fake.url) as mgmt,
        Inference(fake.url) as inference,
        ThreadPoolExecutor(2) as pool,
    ):
        code = fake.create_room("Keepalive")
        peer = _join(mgmt, code)
        client = pool.submit(inference.chat, code, "p1", "ttft:long", stream=True)
        req = peer.next_request()
        peer.start(req.id, 200, {"content-type": "text/event-stream"})
        for _ in range(6):  # 1.2 s in all, more than twice the idle timeout
            peer.chunk(req.id, b": keepalive\n\n")
            assert peer.nothing_within(0.2)
        peer.chunk(req.id, b"data: first token\n\n")
        peer.end(req.id)
        a = client.result(10)
        assert a.status == 200 and a.body.endswith(b"data: first token\n\n")
        assert not fake.crashed.is_set()


def test_requests_and_frames_are_logged(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    code = fake.create_room("Logged")
    peer = _join(mgmt, code)
    peer.ping()
    peer.next()
    peer.close(1000, "bye")
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert (
        puts
        and puts[0].path == f"/v1/rooms/{code}/participants/p1"
        and puts[0].json()["model"] == "fake-model"
    )
    upgrades = [r for r in fake.requests if r.path.endswith("/tunnel")]
    assert upgrades and upgrades[0].query.startswith("token=")
    assert [m["type"] for m in fake.tunnel_frames("p1", direction="in")] == ["tunnel.ping"]
    assert [m["type"] for m in fake.tunnel_frames("p1", direction="out")] == ["tunnel.pong"]
    closes = [(f.direction, f.close_code, f.close_reason) for f in fake.frames if f.kind == "close"]
    assert closes == [("in", 1000, "bye"), ("out", 1000, "bye")]


def test_a_late_chunk_crash_closes_the_port(fake: FakeGambiV06, mgmt: Mgmt) -> None:
    fake.client_idle_timeout_s = 0.3
    code = fake.create_room("Crash")
    peer = _join(mgmt, code)
    with Inference(fake.url) as inference, ThreadPoolExecutor(1) as pool:
        client = pool.submit(
            lambda: pytest.raises(httpx.HTTPError, inference.chat, code, "p1", "x", stream=True)
        )
        req = peer.next_request()
        peer.start(req.id, 200, {})
        client.result(10)
        peer.chunk(req.id, b"data: late\n\n")
        assert fake.crashed.wait(10)
    with Mgmt(fake.url) as fresh, pytest.raises(httpx.ConnectError):
        fresh.health()  # nothing listens any more
    fake.restart(keep_rooms=False)  # the test can bring a crashed hub back, like a supervisor would
    with Mgmt(fake.url) as fresh:
        assert fresh.health().status == 200
        assert fresh.room(code).status == 404  # every room was lost
