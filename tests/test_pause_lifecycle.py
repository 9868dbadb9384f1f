"""Pause end to end: session objects against the embedded hub (start_hub on port 0), a real stand-in
LLM server that is stopped and started again, the relay core's ping and ServerWatch; and the real CLI
stopped by a real SIGINT while the hub is down (issue 14 item 10)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.hub import RunningHub, start_hub
from llmroom_cli.protocols.v06 import RelayHandler, TunnelSession, V06Client, run_tunnel_session
from llmroom_cli.relay import RelayCore
from llmroom_cli.session import JoinPlan, Outcome, Session, run_session
from llmroom_cli.standin import MODEL, StandIn
from llmroom_cli.watch import ServerWatch
from tests.helpers import WAIT_S, wait_for


@pytest.fixture
def hub() -> Iterator[RunningHub]:
    with start_hub(port=0, test_hooks=True) as h:
        yield h


class Pings:
    """RelayCore.ping, counting the failed ones: "paused at the first failed check" is what makes it
    "within one interval" without a clock in the test."""

    def __init__(self, core: RelayCore) -> None:
        self.core = core
        self.failed = 0

    def __call__(self) -> bool:
        up = self.core.ping(timeout_s=0.5)
        if not up:
            self.failed += 1
        return up


class Running:
    """A session run as the CLI runs it (run_session in a thread), with its events."""

    def __init__(self, session: Any, runner: Any) -> None:
        self.session = session
        self.wake = threading.Event()
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=lambda: self._run(runner), daemon=True)

    def _run(self, runner: Any) -> None:
        self.outcome = runner(self.session, self.wake)

    def names(self) -> list[str]:
        return [e["event"] for e in list(self.session.status.history)]

    def wait(self, name: str, count: int = 1) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            seen = [e for e in list(self.session.status.history) if e["event"] == name]
            if self.outcome is not None and self.outcome.error is not None:
                raise AssertionError(f"the session ended: {self.outcome.error!r}")
            return seen[count - 1] if len(seen) >= count else None

        event: dict[str, Any] = wait_for(found, f"{name} x{count}; got {self.names()}")
        return event

    def stop(self) -> Outcome:
        self.wake.set()
        self.thread.join(WAIT_S)
        assert self.outcome is not None
        return self.outcome


def chat(hub: RunningHub, code: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(trust_env=False, timeout=WAIT_S) as http:
        return http.post(f"{hub.url}/rooms/{code}/v1/chat/completions", json=body).status_code


def plan(hub: RunningHub, code: str, pid: str, endpoint: str, interval_s: float) -> JoinPlan:
    return JoinPlan(hub.url, code, pid, "alice", MODEL, endpoint, interval_s=interval_s)


def test_v01_server_killed_pauses_at_the_first_failed_check_and_restarted_resumes(hub: RunningHub) -> None:
    code = hub.state.create_room("r")["code"]
    llm = StandIn()
    port = llm.port
    hub_http = httpx.Client(trust_env=False)
    # No keep-alive: StandIn.stop() still serves connections already open, where a killed server would not.
    core = RelayCore(llm.url, httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)))
    session = Session(
        HubClient(hub_http, hub.url), plan(hub, code, "pause-v01", llm.url, 0.2), lambda e: None
    )
    run = Running(session, run_session)
    pings = Pings(core)
    watch = ServerWatch(session, pings, interval_s=0.2)
    run.thread.start()
    try:
        run.wait("joined")
        watch.start()
        assert chat(hub, code, "pause-v01") == 200
        llm.stop()
        paused = run.wait("paused")
        assert paused["cause"] == "server_down" and "not answering" in paused["reason"]
        assert pings.failed == 1  # the first check after the kill paused it
        # v0.1: the participant left, so the room neither lists nor routes to it.
        assert [p["id"] for p in hub.state.participants(code)] == []
        assert chat(hub, code, "pause-v01") != 200
        llm = StandIn(port=port)
        resumed = run.wait("resumed")
        assert resumed["id"] == "pause-v01"
        listed = hub.state.participants(code)
        assert [(p["id"], p["status"]) for p in listed] == [("pause-v01", "online")]
        assert chat(hub, code, "pause-v01") == 200
    finally:
        watch.close()
        outcome = run.stop()
        llm.stop()
        hub_http.close()
    assert outcome.error is None and outcome.confirmed is True
    assert hub.state.participants(code) == []


def test_v06_a_failed_relayed_request_pauses_at_once_and_the_next_check_resumes(hub: RunningHub) -> None:
    code = hub.state.create_room("r")["code"]
    llm = StandIn()
    port = llm.port
    hub_http = httpx.Client(trust_env=False)
    # No keep-alive: StandIn.stop() still serves connections already open, where a killed server would not.
    core = RelayCore(llm.url, httpx.Client(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)))
    # A long interval: no timer can be what pauses or resumes here, only server_down() and the check.
    session = TunnelSession(
        V06Client(hub_http, hub.url),
        plan(hub, code, "pause-v06", llm.url, 60.0),
        RelayHandler.from_core(core),
        lambda e: None,
    )
    watch = ServerWatch(session, lambda: core.ping(timeout_s=0.5), interval_s=60.0)
    core.on_server_down = watch.server_down
    run = Running(session, run_tunnel_session)
    run.thread.start()
    try:
        run.wait("joined")

        def connected() -> bool:
            p = [p for p in hub.state.participants(code) if p["id"] == "pause-v06"]
            return bool(p and p[0]["status"] == "online")

        wait_for(connected, "the tunnel to be up")
        assert chat(hub, code, "pause-v06") == 200
        llm.stop()
        assert chat(hub, code, "pause-v06") == 502  # the relay could not connect: it said so ...
        paused = run.wait("paused")  # ... and paused the participant at once
        assert paused["cause"] == "server_down"
        # v0.6: still in the room, its tunnel closed: not routable (503 for its id), not gone.
        wait_for(lambda: not connected(), "the hub to see the tunnel closed")
        assert [p["id"] for p in hub.state.participants(code)] == ["pause-v06"]
        assert chat(hub, code, "pause-v06") == 503
        llm = StandIn(port=port)
        watch.check_now()  # what the next interval does
        resumed = run.wait("resumed")
        assert resumed["id"] == "pause-v06"
        wait_for(connected, "the participant back, same id")
        assert chat(hub, code, "pause-v06") == 200
    finally:
        watch.close()
        outcome = run.stop()
        llm.stop()
        hub_http.close()
    assert outcome.error is None and outcome.confirmed is True


# -- Ctrl-C during the start-up retry (issue 14 item 10) ---------------------------------------------


def _agent(hub_url: str, llm: StandIn) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", "join", "ABC123", "--hub", hub_url, "-e", llm.url, "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_during_retry(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the start-up retry notice: the join is being retried now
    assert "retrying for up to" in first, first
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=WAIT_S)
    return proc.returncode, out, first + rest


def test_ctrl_c_while_the_hub_is_down_says_stopped_before_joining_and_exits_zero() -> None:
    with socket.socket() as probe:  # a port where nothing listens: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with StandIn() as llm:
        code, out, err = _interrupt_during_retry(_agent(f"http://127.0.0.1:{port}", llm))
    assert code == 0, err
    assert "stopped before joining (the hub at" in err and "never answered): nothing to leave" in err
    assert "did not confirm" not in err and "llmroom leave" not in err and "Traceback" not in err
    assert out == ""  # no joined, no left: nothing happened in any room


def test_ctrl_c_against_a_frozen_hub_sends_no_join_and_says_so() -> None:
    """A hub that accepts and never answers: the generation probe (GET /health) is what times out, so
    no join request was ever sent and there is nothing to clean up (the case where a join request did
    go out and timed out is session.Outcome.left_behind, covered in test_pause.py)."""
    with socket.socket() as frozen, StandIn() as llm:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(16)
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        code, out, err = _interrupt_during_retry(_agent(url, llm))
    assert code == 0, err
    assert "stopped before joining" in err and "nothing to leave" in err
    assert "llmroom leave" not in err and "Traceback" not in err
    assert out == ""
