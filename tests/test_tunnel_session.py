"""TunnelSession end to end against the fake reference v0.6 hub (tests/fake_gambi_v06.py, quirks
included), on loopback with short intervals; plus a few cases with an in-memory tunnel double where the
reference hub cannot produce the situation (two requests on one tunnel at once)."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.errors import InvalidPassword, RoomNotFound
from llmroom_cli.protocols import v06
from llmroom_cli.protocols.v06 import (
    RelayHandler,
    TunnelSession,
    TunnelSuperseded,
    V06Client,
    run_tunnel_session,
)
from llmroom_cli.session import JoinPlan, Outcome
from tests.helpers import WAIT_S

fake = pytest.importorskip("tests.fake_gambi_v06", reason="the fake reference hub (branch v06tests)")

INTERVAL_S = 0.2


def upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
    """A tiny local server: echoes the request as an OpenAI-ish answer; `"stream": true` streams it."""
    req = json.loads(body or b"{}")
    content = (req.get("messages") or [{}])[-1].get("content", "")
    if req.get("fail"):
        raise ConnectionRefusedError("the local server is down")
    if req.get("size"):
        answer = {"choices": [{"message": {"content": "z" * int(req["size"])}}]}
        return 200, {"content-type": "application/json"}, iter([json.dumps(answer).encode()])
    if req.get("stream"):

        def chunks() -> Iterator[bytes]:
            time.sleep(float(req.get("ttft_s", 0)))
            for word in str(content).split():
                yield f"data: {json.dumps({'delta': word})}\n\n".encode()
                time.sleep(float(req.get("gap_s", 0)))
            yield b"data: [DONE]\n\n"

        return 200, {"content-type": "text/event-stream"}, chunks()
    answer = {"choices": [{"message": {"role": "assistant", "content": f"echo: {content}"}}]}
    return 200, {"content-type": "application/json"}, iter([json.dumps(answer).encode()])


class Agent:
    """A TunnelSession run as the CLI runs it (run_tunnel_session in a thread); `leave()` stops it."""

    def __init__(
        self, hub: Any, code: str, pid: str = "p1", interval_s: float = INTERVAL_S, **kw: Any
    ) -> None:
        self.http = httpx.Client(trust_env=False)
        self.client = V06Client(self.http, hub.url)
        self.plan = JoinPlan(
            hub_url=hub.url,
            code=code,
            participant_id=pid,
            nickname=f"fake-model@{pid}",
            model="fake-model",
            endpoint="http://127.0.0.1:11434",
            interval_s=interval_s,
        )
        self.events: list[dict[str, Any]] = []
        handler = kw.pop("handler", None) or RelayHandler(upstream, keepalive_s=kw.pop("keepalive_s", 0.1))
        self.session = TunnelSession(
            self.client, self.plan, handler, self.events.append, startup_retry_s=3, **kw
        )
        self.wake = threading.Event()
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.outcome = run_tunnel_session(self.session, self.wake)

    def start(self) -> Agent:
        self.thread.start()
        self.wait_event("joined")
        return self

    def leave(self) -> Outcome:
        self.wake.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        self.http.close()
        assert self.outcome is not None
        return self.outcome

    def ended(self) -> Outcome:
        self.thread.join(WAIT_S)
        self.http.close()
        assert self.outcome is not None
        return self.outcome

    def names(self) -> list[str]:
        return [e["event"] for e in list(self.events)]

    def wait_event(self, name: str, after: int = 0, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in list(self.events)[after:]:
                if e["event"] == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.outcome is not None and self.outcome.error is not None and name != "left":
                raise AssertionError(f"session ended with {self.outcome.error!r}; events {self.names()}")
            return None

        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            event = found()
            if event:
                return event
            time.sleep(0.005)
        raise AssertionError(f"no {name} {match} event; got {self.names()}")


@pytest.fixture
def hub() -> Iterator[Any]:
    with fake.FakeGambiV06(
        tunnel_timeout_s=3.0, participant_timeout_s=3.0, sweep_interval_s=0.1, client_idle_timeout_s=0.6
    ) as h:
        yield h


def connected(hub: Any, code: str, pid: str = "p1") -> bool:
    p = hub.participant(code, pid)
    return bool(p and p["connection"]["connected"] and p["status"] == "online")


def upgrades(hub: Any) -> list[Any]:
    return [r for r in list(hub.requests) if r.path.endswith("/tunnel")]


def puts(hub: Any) -> list[Any]:
    return [r for r in list(hub.requests) if r.method == "PUT"]


def chat(hub: Any, code: str, body: dict[str, Any], timeout_s: float = WAIT_S) -> httpx.Response:
    return httpx.post(f"{hub.url}/rooms/{code}/v1/chat/completions", json=body, timeout=timeout_s)


def test_join_registers_opens_the_tunnel_and_sends_ping_and_heartbeat_each_interval(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "participant online through the tunnel")
    hub.wait_for(lambda: len(hub.tunnel_frames("p1", "in", "tunnel.ping")) >= 3, "three pings")
    beats = [r for r in list(hub.requests) if r.path.endswith("/heartbeat")]
    assert len(beats) >= 2
    pongs = hub.tunnel_frames("p1", "out", "tunnel.pong")
    assert pongs, "the hub answered our pings"
    put = puts(hub)[0]
    assert put.json() == {
        "nickname": "fake-model@p1",
        "model": "fake-model",
        "endpoint": "http://127.0.0.1:11434",
    }
    names = agent.names()
    assert names[:2] == ["tunnel", "joined"] and "heartbeat" in names
    assert agent.session.status.tunnel == "connected" and agent.session.status.hub_status == "online"
    # The token is used once and only in the query; it never appears in an event.
    assert len(upgrades(hub)) == 1 == len(puts(hub))
    token = json.loads(json.dumps(put.json()))  # (the PUT body carries no token)
    assert "token" not in token
    assert all("token" not in json.dumps(e) for e in agent.events)
    outcome = agent.leave()
    assert outcome.error is None and outcome.confirmed is True
    assert hub.participant(code, "p1") is None
    # Leave: the close 1000 came before the DELETE.
    closes = [f for f in list(hub.frames) if f.kind == "close" and f.direction == "in"]
    assert closes and closes[-1].close_code == 1000
    delete = [r for r in list(hub.requests) if r.method == "DELETE"]
    assert len(delete) == 1 and closes[-1].at <= delete[0].at
    assert agent.names()[-1] == "left"


def test_requests_are_served_plain_streamed_big_and_failed(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")

    plain = chat(hub, code, {"model": "p1", "messages": [{"role": "user", "content": "hi"}]})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "echo: hi"

    streamed = chat(
        hub, code, {"model": "p1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    )
    assert streamed.status_code == 200
    assert streamed.text.count("data: ") == 4 and streamed.text.endswith("data: [DONE]\n\n")

    big = chat(hub, code, {"model": "p1", "size": 3 * 1024 * 1024, "messages": []})
    assert big.status_code == 200, big.text[:300]
    assert len(big.json()["choices"][0]["message"]["content"]) == 3 * 1024 * 1024
    chunks = hub.tunnel_frames("p1", "in", "tunnel.response.chunk")
    assert max(len(base64.b64decode(c["chunk"])) for c in chunks) <= 1024 * 1024
    assert sum(len(base64.b64decode(c["chunk"])) for c in chunks) > 3 * 1024 * 1024

    failed = chat(hub, code, {"model": "p1", "fail": True, "messages": []})
    assert failed.status_code == 502
    assert "the local server is down" in failed.text
    errors = hub.tunnel_frames("p1", "in", "tunnel.response.error")
    assert errors[-1]["stage"] == "proxy"
    assert connected(hub, code), "a failed request does not take the tunnel down"
    agent.leave()


def test_keepalives_carry_a_stream_past_the_hubs_idle_cut(hub: Any) -> None:
    # The fake cuts a client after 0.6 s of silence (the reference: 10 s) and then "crashes" on the
    # first real chunk. The server here takes 1.5 s to its first token.
    code = hub.create_room("Open Room")
    agent = Agent(hub, code, keepalive_s=0.15).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    resp = chat(
        hub, code, {"model": "p1", "stream": True, "ttft_s": 1.5, "messages": [{"content": "slow answer"}]}
    )
    assert resp.status_code == 200
    assert resp.text.startswith(": keepalive\n\n")
    assert resp.text.endswith('data: {"delta": "answer"}\n\ndata: [DONE]\n\n')
    assert not hub.crashed.is_set()
    agent.leave()


@pytest.mark.parametrize(
    ("how", "code_seen"),
    [("4001", 4001), ("1001", 1001), ("drop", None), ("restart-kill", None), ("restart-graceful", 1001)],
)
def test_reconnects_with_the_same_id_after_a_tunnel_loss(hub: Any, how: str, code_seen: int | None) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    before = len(agent.events)
    if how == "4001":
        hub.close_tunnel("p1", 4001, "Tunnel heartbeat timed out.")
    elif how == "1001":
        hub.close_tunnel("p1", 1001, "Hub shutting down.")
    elif how == "drop":
        hub.drop_tunnel("p1")
    else:
        hub.restart(keep_rooms=True, graceful=how == "restart-graceful")
    lost = agent.wait_event("tunnel", after=before, state="lost")
    assert lost["code"] == code_seen
    assert lost["meaning"] == v06.describe_close(code_seen, lost["reason"])
    agent.wait_event("reconnecting", after=before)
    agent.wait_event("online", after=before)
    hub.wait_for(lambda: connected(hub, code), "online again")
    assert len(puts(hub)) == len(upgrades(hub)) == 2  # one fresh PUT and token per tunnel
    assert {r.path for r in puts(hub)} == {f"/v1/rooms/{code}/participants/p1"}
    resp = chat(hub, code, {"model": "p1", "messages": [{"content": "again"}]})
    assert resp.json()["choices"][0]["message"]["content"] == "echo: again"
    assert agent.leave().error is None


def test_no_chunk_of_a_request_goes_out_once_its_tunnel_is_gone(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    words = " ".join(f"w{i}" for i in range(60))
    body = {"model": "p1", "stream": True, "gap_s": 0.05, "messages": [{"content": words}]}
    client = threading.Thread(target=lambda: chat(hub, code, body), daemon=True)
    client.start()
    hub.wait_for(lambda: len(hub.tunnel_frames("p1", "in", "tunnel.response.chunk")) >= 3, "streaming")
    rid = hub.tunnel_frames("p1", "out", "tunnel.request")[0]["requestId"]
    hub.drop_tunnel("p1")
    agent.wait_event("online", after=len(agent.events) - 1)
    hub.wait_for(lambda: connected(hub, code), "reconnected")
    reopened = upgrades(hub)[-1].at
    time.sleep(0.5)  # the old answer's producer would still be going (60 words * 0.05 s)
    late = [f for f in list(hub.frames) if f.direction == "in" and f.at > reopened and rid in str(f.data)]
    assert late == [], "frames of the old request went out on the new tunnel"
    assert not hub.crashed.is_set()
    client.join(WAIT_S)
    agent.leave()


def test_a_restarted_hub_that_lost_the_room_ends_the_session_with_room_gone(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    hub.restart(keep_rooms=False, graceful=False)
    outcome = agent.ended()
    assert isinstance(outcome.error, RoomNotFound)
    assert outcome.error.exit_code == 3
    assert "is gone" in outcome.error.message and code in outcome.error.message


def test_superseded_stops_without_fighting_for_the_id(hub: Any) -> None:
    code = hub.create_room("Open Room")
    first = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    second = Agent(hub, code).start()  # the same id, opened elsewhere
    outcome = first.ended()
    assert isinstance(outcome.error, TunnelSuperseded)
    assert "rather than fight" in outcome.error.message
    lost = [e for e in first.events if e["event"] == "tunnel" and e["state"] == "lost"][-1]
    assert lost["code"] == 1000 and "another agent" in lost["meaning"]
    hub.wait_for(lambda: connected(hub, code), "the second agent keeps the id")
    time.sleep(INTERVAL_S * 3)  # a few intervals: the first agent must not come back for it
    assert [r.method for r in hub.requests].count("DELETE") == 0
    assert len(puts(hub)) == 2 and connected(hub, code)
    assert second.leave().confirmed is True


def test_heartbeat_404_after_a_delete_registers_again(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    assert hub.delete_participant(code, "p1")  # the reference leaves our socket open
    agent.wait_event("rejoined")
    hub.wait_for(lambda: connected(hub, code), "back in the room")
    assert agent.session.status.rejoins == 1
    agent.leave()


def test_a_frozen_hub_is_reconnecting_within_two_intervals_and_recovers(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    ticks: list[float] = []
    original = agent.client.heartbeat

    def counted(*a: Any, **kw: Any) -> str:
        ticks.append(time.monotonic())
        return original(*a, **kw)

    agent.client.heartbeat = counted  # type: ignore[method-assign]
    before = len(agent.events)
    hub.freeze()
    agent.wait_event("reconnecting", after=before)
    # Logical, not wall-clock: at most two interval ticks passed between the freeze and "reconnecting".
    assert len(ticks) <= 2
    hub.unfreeze()
    agent.wait_event("online", after=before)
    hub.wait_for(lambda: connected(hub, code), "online after the thaw")
    agent.leave()


def test_leave_on_a_frozen_hub_is_bounded(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    hub.freeze()
    started = time.monotonic()
    outcome = agent.leave()
    elapsed = time.monotonic() - started
    hub.unfreeze()
    assert outcome.confirmed is False  # the DELETE could not be confirmed, and we said so
    # The budget by construction (a wait for a call in flight, the close handshake, the DELETE):
    assert v06.LEAVE_WAIT_INFLIGHT_S + v06.LEAVE_CLOSE_S + v06.LEAVE_DELETE_S < 3.0
    assert elapsed < 10.0, elapsed  # a hang guard only; the figure is in the benchmark


def test_pause_closes_the_tunnel_keeps_the_registration_and_resume_reopens(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    agent.session.pause("the local server stopped answering")
    agent.wait_event("paused")
    hub.wait_for(lambda: not hub.participant(code, "p1")["connection"]["connected"], "tunnel closed")
    resp = chat(hub, code, {"model": "p1", "messages": []})
    assert resp.status_code == 503  # registered, not connected: the hub says so at once
    time.sleep(INTERVAL_S * 2)
    assert hub.participant(code, "p1") is not None  # still in the room, heartbeats go on
    agent.session.resume()
    agent.wait_event("resumed")
    hub.wait_for(lambda: connected(hub, code), "serving again")
    agent.leave()


def test_pause_carries_its_cause_and_a_hub_outage_while_paused_does_not_reopen_the_tunnel(hub: Any) -> None:
    code = hub.create_room("Open Room")
    agent = Agent(hub, code).start()
    hub.wait_for(lambda: connected(hub, code), "online")
    agent.session.pause("the GPU is busy: other processes use it", "gpu_busy")
    paused = agent.wait_event("paused")
    assert (paused["cause"], paused["reason"]) == ("gpu_busy", "the GPU is busy: other processes use it")
    assert agent.session.status.state == "paused" and agent.session.status.tunnel == "paused"
    opened = len(upgrades(hub))
    hub.freeze()
    agent.wait_event("reconnecting")  # the heartbeats go on while paused, and notice the outage
    hub.unfreeze()
    again = agent.wait_event("paused", after=agent.names().index("reconnecting"))
    assert again["cause"] == "gpu_busy" and agent.session.status.state == "paused"
    n = len(agent.events)
    agent.wait_event("heartbeat", after=n)
    assert len(upgrades(hub)) == opened  # nothing re-opened the tunnel of the paused participant
    assert "online" not in agent.names()[n - 1 :] and "resumed" not in agent.names()
    agent.session.resume()
    resumed = agent.wait_event("resumed")
    assert resumed["id"] == "p1" and agent.session.status.state == "online"
    # "resumed" comes once the hub has the tunnel again, not when resume() was called.
    assert agent.names().index("resumed") > max(
        i for i, e in enumerate(agent.events) if e["event"] == "tunnel"
    )
    hub.wait_for(lambda: connected(hub, code), "serving again")
    agent.leave()


# -- an in-memory tunnel: situations the reference hub does not produce on demand ---------------------


class Closed(Exception):
    """Stands in for websockets' ConnectionClosed (it carries the received close frame as `rcvd`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.rcvd = type("Close", (), {"code": code, "reason": reason})()


class MemoryTunnel:
    def __init__(self) -> None:
        self.incoming: queue.Queue[Any] = queue.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None

    def send(self, message: str) -> None:
        frame = json.loads(message)
        self.sent.append(frame)
        if frame["type"] == "tunnel.ping":
            self.incoming.put(json.dumps({"type": "tunnel.pong", "timestamp": 1}))

    def recv(self, timeout: float | None = None) -> str:
        item = self.incoming.get()
        if isinstance(item, Exception):
            raise item
        return str(item)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.incoming.put(Closed(code, reason))


def memory_hub() -> tuple[V06Client, list[str]]:
    seen: list[str] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(f"{req.method} {req.url.path}")
        if req.method == "PUT":
            data = {
                "participant": {"id": "p1"},
                "roomId": "r",
                "tunnel": {"token": f"t{len(seen)}", "url": "ws://x/"},
            }
            return httpx.Response(201, json={"data": data})
        if req.url.path.endswith("/heartbeat"):
            return httpx.Response(200, json={"data": {"success": True, "status": "online"}})
        return httpx.Response(200, json={"data": {"success": True}})

    http = httpx.Client(transport=httpx.MockTransport(answer), trust_env=False)
    return V06Client(http, "http://127.0.0.1:9"), seen


def test_concurrent_requests_on_one_tunnel_are_served_at_once_keyed_by_request_id() -> None:
    client, seen = memory_hub()
    tunnels: list[MemoryTunnel] = []
    urls: list[str] = []

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        urls.append(url)
        tunnels.append(MemoryTunnel())
        return tunnels[-1]

    both = threading.Barrier(2, timeout=WAIT_S)

    def handler(request: dict[str, Any], send: Any) -> None:
        both.wait()  # each request waits for the other: only concurrent handling gets past
        rid = request["requestId"]
        send({"type": "tunnel.response.start", "requestId": rid, "status": 200, "headers": {}})
        send({"type": "tunnel.response.end", "requestId": rid})

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=0.05)
    events: list[dict[str, Any]] = []
    session = TunnelSession(client, plan, handler, events.append, connect=connect)
    wake = threading.Event()
    outcome: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run_tunnel_session(session, wake)), daemon=True)
    runner.start()
    deadline = time.monotonic() + WAIT_S
    while not tunnels and time.monotonic() < deadline:
        time.sleep(0.005)
    assert urls == ["ws://127.0.0.1:9/v1/rooms/ROOM/participants/p1/tunnel?token=t1"]
    for rid in ("req-a", "req-b"):
        tunnels[0].incoming.put(
            json.dumps(
                {
                    "type": "tunnel.request",
                    "requestId": rid,
                    "method": "POST",
                    "path": "/v1/chat/completions",
                    "headers": {},
                    "body": {},
                }
            )
        )
    tunnels[0].incoming.put("hello, not json")  # ignored, like the hub ignores ours
    while (
        len([f for f in tunnels[0].sent if f["type"] == "tunnel.response.end"]) < 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    ends = {f["requestId"] for f in tunnels[0].sent if f["type"] == "tunnel.response.end"}
    assert ends == {"req-a", "req-b"}
    # Pings each interval, answered by pongs: the session stays online; heartbeats go alongside.
    while seen.count("POST /v1/rooms/ROOM/participants/p1/heartbeat") < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len([f for f in tunnels[0].sent if f["type"] == "tunnel.ping"]) >= 2
    assert "reconnecting" not in [e["event"] for e in events]
    wake.set()
    runner.join(WAIT_S)
    assert tunnels[0].closed_with == (1000, "participant leaving")
    assert seen[-1] == "DELETE /v1/rooms/ROOM/participants/p1"
    assert outcome[0].confirmed is True


def test_a_missing_pong_is_noticed_within_two_intervals() -> None:
    client, seen = memory_hub()
    tunnels: list[MemoryTunnel] = []

    class Deaf(MemoryTunnel):
        def send(self, message: str) -> None:  # a hub that reads but never answers
            self.sent.append(json.loads(message))

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        tunnels.append(Deaf() if not tunnels else MemoryTunnel())
        return tunnels[-1]

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=0.05)
    events: list[dict[str, Any]] = []
    session = TunnelSession(client, plan, RelayHandler(upstream), events.append, connect=connect)
    wake = threading.Event()
    runner = threading.Thread(target=run_tunnel_session, args=(session, wake), daemon=True)
    runner.start()
    deadline = time.monotonic() + WAIT_S
    while "online" not in [e["event"] for e in events] and time.monotonic() < deadline:
        time.sleep(0.005)
    names = [e["event"] for e in events]
    assert "reconnecting" in names and names.index("reconnecting") < names.index("online")
    # The deaf tunnel got exactly one unanswered ping before we gave up on it, and was closed by us.
    assert [f["type"] for f in tunnels[0].sent].count("tunnel.ping") == 1
    assert tunnels[0].closed_with is not None and len(tunnels) == 2
    wake.set()
    runner.join(WAIT_S)


def test_a_refused_token_gets_a_fresh_put_and_no_token_is_used_twice() -> None:
    client, seen = memory_hub()
    urls: list[str] = []

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        urls.append(url)
        if len(urls) == 1:
            raise v06.TunnelRefused(
                401, b'{"error":{"code":"INVALID_REQUEST","message":"Tunnel token is invalid"}}'
            )
        return MemoryTunnel()

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=0.05)
    events: list[dict[str, Any]] = []
    session = TunnelSession(client, plan, RelayHandler(upstream), events.append, connect=connect)
    session.join()
    assert session.joined
    assert seen.count("PUT /v1/rooms/ROOM/participants/p1") == 2
    tokens = [u.split("token=")[1] for u in urls]
    assert len(tokens) == len(set(tokens)) == 2
    # A reconnect after a hub answers never waits longer than one interval between attempts.
    assert session.reconnect_max_delay_s <= plan.interval_s
    assert session.leave() is True


def test_a_tunnel_refused_because_the_room_is_gone_is_room_not_found() -> None:
    client, _ = memory_hub()

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        raise v06.TunnelRefused(404, b'{"error":{"code":"ROOM_NOT_FOUND","message":"Room not found."}}')

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=0.05)
    session = TunnelSession(client, plan, RelayHandler(upstream), lambda e: None, connect=connect)
    with pytest.raises(RoomNotFound):
        session.join()


def test_join_errors_at_start(hub: Any) -> None:
    agent = Agent(hub, "NOROOM")
    agent.thread.start()
    outcome = agent.ended()
    assert isinstance(outcome.error, RoomNotFound) and "was not found" in outcome.error.message
    code = hub.create_room("Locked", password="right")
    locked = Agent(hub, code)
    locked.plan.password = "wrong"
    locked.thread.start()
    outcome = locked.ended()
    assert isinstance(outcome.error, InvalidPassword) and outcome.error.exit_code == 4
    assert upgrades(hub) == []  # nothing opened without a registration
    locked.plan.password = "right"
    ok = Agent(hub, code, pid="p2")
    ok.plan.password = "right"
    ok.start()
    hub.wait_for(lambda: connected(hub, code, "p2"), "joined with the right password")
    ok.leave()


def test_a_ping_is_not_held_behind_a_full_queue_of_answer_frames() -> None:
    client, _ = memory_hub()

    class Slow(MemoryTunnel):
        def send(self, message: str) -> None:
            if '"tunnel.response.chunk"' in message:
                time.sleep(0.01)  # a slow link: the writer's queue stays full for many intervals
            super().send(message)

    tunnels: list[MemoryTunnel] = []

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        tunnels.append(Slow())
        return tunnels[-1]

    def handler(request: dict[str, Any], send: Any) -> None:
        rid = request["requestId"]
        send({"type": "tunnel.response.start", "requestId": rid, "status": 200, "headers": {}})
        for _ in range(100):
            send({"type": "tunnel.response.chunk", "requestId": rid, "chunk": "eA=="})
        send({"type": "tunnel.response.end", "requestId": rid})

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=0.05)
    events: list[dict[str, Any]] = []
    session = TunnelSession(client, plan, handler, events.append, connect=connect)
    wake = threading.Event()
    runner = threading.Thread(target=run_tunnel_session, args=(session, wake), daemon=True)
    runner.start()
    deadline = time.monotonic() + WAIT_S
    while not tunnels and time.monotonic() < deadline:
        time.sleep(0.005)
    tunnels[0].incoming.put(
        json.dumps(
            {"type": "tunnel.request", "requestId": "r1", "method": "POST", "path": "/v1/x", "body": {}}
        )
    )
    while (
        not any(f["type"] == "tunnel.response.end" for f in list(tunnels[0].sent))
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    sent = [f["type"] for f in list(tunnels[0].sent)]
    first, last = sent.index("tunnel.response.start"), sent.index("tunnel.response.end")
    assert "tunnel.ping" in sent[first:last], "pings went out while the answer was still streaming"
    assert "reconnecting" not in [e["event"] for e in events]
    assert len(tunnels) == 1
    wake.set()
    runner.join(WAIT_S)


def test_requests_beyond_the_worker_bound_get_429_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v06, "MAX_WORKERS", 2)
    client, _ = memory_hub()
    tunnels: list[MemoryTunnel] = []

    def connect(url: str, timeout_s: float) -> MemoryTunnel:
        tunnels.append(MemoryTunnel())
        return tunnels[-1]

    release = threading.Event()

    def handler(request: dict[str, Any], send: Any) -> None:
        release.wait(WAIT_S)
        send(
            {"type": "tunnel.response.start", "requestId": request["requestId"], "status": 200, "headers": {}}
        )
        send({"type": "tunnel.response.end", "requestId": request["requestId"]})

    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=5.0)
    session = TunnelSession(client, plan, handler, lambda e: None, connect=connect)
    session.join()
    for rid in ("a", "b", "c"):
        frame = {"type": "tunnel.request", "requestId": rid, "method": "POST", "path": "/v1/x", "body": {}}
        tunnels[0].incoming.put(json.dumps(frame))
    deadline = time.monotonic() + WAIT_S
    while not any(f.get("status") == 429 for f in list(tunnels[0].sent)) and time.monotonic() < deadline:
        time.sleep(0.005)
    refused = [f for f in list(tunnels[0].sent) if f["requestId"] == "c"]
    assert [f["type"] for f in refused] == [
        "tunnel.response.start",
        "tunnel.response.chunk",
        "tunnel.response.end",
    ]
    assert refused[0]["status"] == 429
    release.set()
    while len([f for f in list(tunnels[0].sent) if f["type"] == "tunnel.response.end"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert session.leave() is True


def test_against_llmrooms_own_hub_join_serve_restart_and_leave() -> None:
    """The same agent against `llmroom serve`'s v0.6 side (skips until branch `hub` is merged)."""
    hub_pkg = pytest.importorskip("llmroom_cli.hub", reason="llmroom's own v0.6 hub (branch hub)")
    from llmroom_cli.protocols.generation import clear_cache, detect_generation

    hub = hub_pkg.start_hub()
    port = int(hub.url.rsplit(":", 1)[1])
    try:
        with httpx.Client(trust_env=False) as http:
            clear_cache()
            assert detect_generation(http, hub.url) == "both"
            code = V06Client(http, hub.url).create_room("ours")["room"]["code"]
        agent = Agent(hub, code).start()
        plain = chat(hub, code, {"model": "p1", "messages": [{"content": "hi"}]})
        assert plain.json()["choices"][0]["message"]["content"] == "echo: hi"
        streamed = chat(
            hub, code, {"model": "p1", "stream": True, "ttft_s": 0.4, "messages": [{"content": "a b"}]}
        )
        assert streamed.text.startswith(": keepalive") and streamed.text.endswith("data: [DONE]\n\n")
        before = len(agent.events)
        state = hub.state
        hub.stop()
        hub = hub_pkg.start_hub(port=port, state=state)  # restarted, rooms kept
        lost = agent.wait_event("tunnel", after=before, state="lost")
        assert lost["code"] == 1001
        agent.wait_event("online", after=before)
        again = chat(hub, code, {"model": "p1", "messages": [{"content": "back"}]})
        assert again.json()["choices"][0]["message"]["content"] == "echo: back"
        outcome = agent.leave()
        assert outcome.error is None and outcome.confirmed is True
    finally:
        hub.stop()


def test_a_stop_event_passed_in_stops_the_loop_like_session_stop() -> None:
    client, _ = memory_hub()
    stop = threading.Event()
    plan = JoinPlan("http://127.0.0.1:9", "ROOM", "p1", "n", "m", "http://127.0.0.1:1", interval_s=60.0)
    session = TunnelSession(
        client, plan, RelayHandler(upstream), lambda e: None, stop=stop, connect=lambda u, t: MemoryTunnel()
    )
    session.join()
    loop = threading.Thread(target=session.heartbeat_loop, daemon=True)
    loop.start()
    stop.set()  # a 60 s interval: only the link between the two Events can end the wait now
    loop.join(WAIT_S)
    assert not loop.is_alive() and session.stop.is_set()
    assert session.leave() is True
