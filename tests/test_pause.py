"""Pause / resume of the v0.1 Session, in-process against a scripted hub (httpx.MockTransport), and
what a stop before joining leaves behind (issue 14 item 10). The lifecycle thread runs for real (short
interval); waits poll for events with a generous hang guard, never a wall-clock assertion."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.errors import RoomNotFound
from llmroom_cli.session import JoinPlan, Session, never_reached_the_hub, run_session
from tests.helpers import WAIT_S

REQ = httpx.Request("POST", "http://hub.test")


class Hub:
    """Answers join/health/leave from per-route queues (default: success); records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.answers: dict[str, list[Any]] = {"join": [], "health": [], "leave": []}
        self.down = False  # every request: connection refused
        self.lock = threading.Lock()

    def __call__(self, req: httpx.Request) -> httpx.Response:
        route = (
            "join"
            if req.url.path.endswith("/join")
            else "health"
            if req.url.path.endswith("/health")
            else "leave"
        )
        with self.lock:
            self.requests.append((req.method, route))
            if route == "join":
                self.bodies.append(json.loads(req.content))
            if self.down:
                raise httpx.ConnectError("[Errno 111] Connection refused", request=req)
            queue = self.answers[route]
            answer = queue.pop(0) if queue else None
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            answer = (201, {"participant": {"id": "pid-1"}}) if route == "join" else (200, {"success": True})
        status, data = answer
        return httpx.Response(status, json=data)

    def routes(self) -> list[str]:
        with self.lock:
            return [route for _, route in self.requests]


class Run:
    """A Session with its lifecycle thread (join + heartbeat_loop), as run_session runs it."""

    def __init__(self, hub: Hub, interval_s: float = 0.02, **kw: Any) -> None:
        self.hub = hub
        self.events: list[dict[str, Any]] = []
        http = httpx.Client(transport=httpx.MockTransport(hub), trust_env=False)
        plan = JoinPlan("http://hub.test", "ABC123", "pid-1", "alice", "m", "http://127.0.0.1:11434")
        plan.interval_s = interval_s
        self.session = Session(HubClient(http, "http://hub.test"), plan, self.events.append, **kw)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.session.join()
            self.session.heartbeat_loop()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Run:
        self.thread.start()
        self.wait("joined")
        return self

    def stop(self) -> None:
        self.session.stop.set()
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()

    def names(self) -> list[str]:
        return [e["event"] for e in list(self.events)]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def wait(self, name: str, count: int = 1) -> dict[str, Any]:
        return wait_for(lambda: self._nth(name, count), f"{count} x {name}; got {self.names()}", self)

    def _nth(self, name: str, count: int) -> dict[str, Any] | None:
        found = [e for e in list(self.events) if e["event"] == name]
        return found[count - 1] if len(found) >= count else None


def wait_for(fn: Callable[[], Any], what: str, run: Run | None = None) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if run is not None and run.error is not None:
            raise AssertionError(f"the session ended with {run.error!r} waiting for {what}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def hub() -> Iterator[Hub]:
    yield Hub()


def test_pause_leaves_sends_no_heartbeat_and_resume_rejoins_with_the_same_body(hub: Hub) -> None:
    run = Run(hub).start()
    run.wait("heartbeat", 2)
    run.session.pause("the local LLM server is not answering", "server_down")
    paused = run.wait("paused")
    assert (paused["reason"], paused["cause"]) == ("the local LLM server is not answering", "server_down")
    assert run.session.status.state == "paused" and run.session.paused
    assert hub.requests[-1] == ("DELETE", "leave")
    # Several intervals pass paused: nothing at all goes to the hub (no beat could re-join us).
    before = len(hub.routes())
    beats = run.count("heartbeat")
    time.sleep(run.session.plan.interval_s * 5)
    assert len(hub.routes()) == before and run.count("heartbeat") == beats
    run.session.resume()
    resumed = run.wait("resumed")
    assert resumed["id"] == "pid-1" and run.session.status.state == "online"
    assert len(hub.bodies) == 2 and hub.bodies[0] == hub.bodies[1]  # same id, same body
    run.wait("heartbeat", beats + 1)  # and the beats go on
    run.stop()
    assert run.session.leave() is True


def test_a_hub_outage_while_paused_does_not_unpause(hub: Hub) -> None:
    run = Run(hub).start()
    run.wait("heartbeat")
    hub.down = True
    run.session.pause("the GPU is busy with other processes", "gpu_busy")
    run.wait("paused")
    trouble = run.wait("reconnecting")
    assert "did not confirm the leave" in trouble["reason"]
    run.wait("reconnecting", 3)  # the DELETE is retried each interval, and only the DELETE
    hub.down = False
    again = run.wait("paused", 2)  # the hub took the DELETE: paused again, not online
    assert again["cause"] == "gpu_busy" and run.session.status.state == "paused"
    joins = hub.routes().count("join")
    time.sleep(run.session.plan.interval_s * 5)
    assert hub.routes().count("join") == joins == 1  # nothing re-joined the paused participant
    assert "online" not in run.names() and "rejoined" not in run.names()
    # The hub goes down again: a confirmed pause has nothing to leave, so the leave is confirmed.
    hub.down = True
    run.stop()
    deletes = hub.routes().count("leave")
    assert run.session.leave() is True
    assert hub.routes().count("leave") == deletes


def test_resume_while_the_hub_is_down_retries_each_interval(hub: Hub) -> None:
    run = Run(hub).start()
    run.session.pause("down", "server_down")
    run.wait("paused")
    hub.down = True
    run.session.resume()
    run.wait("reconnecting", 2)
    assert run.session.status.state == "reconnecting"
    hub.down = False
    run.wait("resumed")
    assert run.session.status.state == "online"
    run.stop()


def test_a_room_gone_at_resume_ends_the_session(hub: Hub) -> None:
    run = Run(hub).start()
    run.session.pause("down", "server_down")
    run.wait("paused")
    hub.answers["join"].append((404, {"error": "Room not found"}))
    run.session.resume()
    wait_for(lambda: run.error is not None or None, "the session to end")
    assert isinstance(run.error, RoomNotFound)


def test_a_new_cause_while_paused_updates_the_reason_without_a_second_leave(hub: Hub) -> None:
    run = Run(hub).start()
    run.session.pause("the GPU is busy", "gpu_busy")
    run.wait("paused")
    run.session.pause("the local LLM server is not answering", "server_down")
    second = run.wait("paused", 2)
    assert second["cause"] == "server_down" and run.session.status.pause_cause == "server_down"
    assert hub.routes().count("leave") == 1
    run.stop()


def test_pause_and_resume_before_the_loop_runs_net_to_nothing(hub: Hub) -> None:
    run = Run(hub)
    run.session.pause("x", "server_down")
    run.session.resume()
    run.start()
    run.wait("heartbeat", 2)
    assert "paused" not in run.names() and "leave" not in hub.routes()
    run.stop()


# -- a stop before joining (issue 14 item 10) -------------------------------------------------------


def stopped_during_startup(hub: Hub) -> tuple[Run, Any]:
    run = Run(hub, startup_retry_s=60)
    wake = threading.Event()
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(run_session(run.session, wake)), daemon=True)
    thread.start()
    wait_for(lambda: hub.routes().count("join") >= 2, "two join attempts")
    wake.set()  # what a signal does
    thread.join(WAIT_S)
    assert outcome, "run_session did not return"
    return run, outcome[0]


def test_stop_during_the_startup_retry_with_the_hub_down_sends_no_leave(hub: Hub) -> None:
    hub.down = True
    run, outcome = stopped_during_startup(hub)
    assert outcome.stopped_before_joining and not outcome.joined and not outcome.left_behind
    assert outcome.confirmed is None and outcome.error is None
    assert "leave" not in hub.routes()
    assert run.events == []  # no "left": nothing was joined


def test_stop_after_a_join_that_timed_out_cleans_up_quietly(hub: Hub) -> None:
    hub.answers["join"] = [httpx.ReadTimeout("slow", request=REQ)] * 100
    run, outcome = stopped_during_startup(hub)
    assert outcome.stopped_before_joining and not outcome.left_behind
    assert hub.routes()[-1] == "leave"  # the timed-out join may have landed: it is taken back
    assert run.events == []


def test_stop_after_a_timed_out_join_and_an_unconfirmed_cleanup_says_so(hub: Hub) -> None:
    hub.answers["join"] = [httpx.ReadTimeout("slow", request=REQ)] * 100
    hub.answers["leave"] = [httpx.ReadTimeout("slow", request=REQ)] * 100
    _, outcome = stopped_during_startup(hub)
    assert outcome.stopped_before_joining and outcome.left_behind


def test_never_reached_the_hub_follows_the_cause_chain() -> None:
    from llmroom_cli.errors import HubUnavailable

    def raised(inner: BaseException) -> HubUnavailable:
        try:
            try:
                raise inner
            except Exception as exc:
                raise HubUnavailable("x") from exc
        except HubUnavailable as outer:
            return outer

    assert never_reached_the_hub(raised(httpx.ConnectError("refused", request=REQ)))
    assert never_reached_the_hub(raised(httpx.ConnectTimeout("no route", request=REQ)))
    assert not never_reached_the_hub(raised(httpx.ReadTimeout("slow", request=REQ)))
    assert not never_reached_the_hub(HubUnavailable("the hub failed: 500"))
