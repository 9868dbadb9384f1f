"""The participant lifecycle in-process: the schedule with an injected clock, fault handling with a
scripted hub (httpx.MockTransport), leave, and the stable identity."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.errors import HubUnavailable, InvalidPassword, RoomNotFound
from llmroom_cli.identity import config_dir, stable_participant_id
from llmroom_cli.session import JoinPlan, Schedule, Session, run_session


def test_schedule_is_drift_free() -> None:
    s = Schedule(start=100.0, interval_s=10.0)
    # Beats that take time do not shift later deadlines.
    assert s.next_deadline(100.0) == 110.0
    assert s.next_deadline(110.7) == 120.0
    assert s.next_deadline(121.9) == 130.0
    assert [Schedule(0.0, 0.05).next_deadline(0.0)] == [0.05]


def test_schedule_skips_missed_deadlines_instead_of_bunching() -> None:
    s = Schedule(start=0.0, interval_s=10.0)
    assert s.next_deadline(0.0) == 10.0
    # The beat at 10 s took 25 s (a frozen hub): deadlines 20 and 30 are gone, the next is 40.
    assert s.next_deadline(35.0) == 40.0
    assert s.next_deadline(40.2) == 50.0


def test_schedule_over_many_beats_matches_ideal_deadlines() -> None:
    s = Schedule(start=5.0, interval_s=0.05)
    now = 5.0
    for k in range(1, 1001):
        deadline = s.next_deadline(now)
        assert deadline == pytest.approx(5.0 + k * 0.05)
        now = deadline + 0.003  # each beat takes 3 ms


class ScriptedHub:
    """A hub answering from a script of (status, body) per route; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.health: list[Any] = []
        self.join: list[Any] = []
        self.leave_answer: Any = (200, {"success": True})

    def __call__(self, req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content) if req.content else None
        self.requests.append((req.method, req.url.path, body))
        path = req.url.path
        if path.endswith("/join"):
            answer = self.join.pop(0) if self.join else (201, {"participant": {"id": body and body["id"]}})
        elif path.endswith("/health"):
            answer = self.health.pop(0) if self.health else (200, {"success": True})
        else:
            answer = self.leave_answer
        if isinstance(answer, Exception):
            raise answer
        status, data = answer
        if isinstance(data, str):
            return httpx.Response(status, text=data, headers={"content-type": "text/html"})
        return httpx.Response(status, json=data)

    def paths(self) -> list[str]:
        return [f"{m} {p.split('/')[-1]}" for m, p, _ in self.requests]


def make_session(hub: ScriptedHub, **plan_kw: Any) -> tuple[Session, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    http = httpx.Client(transport=httpx.MockTransport(hub), trust_env=False)
    plan = JoinPlan(
        "http://hub.test", "ABC123", "pid-1", "alice", "llama3.2:latest", "http://127.0.0.1:11434"
    )
    for key, value in plan_kw.items():
        setattr(plan, key, value)
    return Session(HubClient(http, "http://hub.test"), plan, events.append, startup_retry_s=0.5), events


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def test_join_body_carries_specs_config_and_password() -> None:
    hub = ScriptedHub()
    session, events = make_session(hub, specs={"ram": 24}, config={"temperature": 0.5}, password="pw")
    session.join()
    assert hub.requests[0][2] == {
        "id": "pid-1",
        "nickname": "alice",
        "model": "llama3.2:latest",
        "endpoint": "http://127.0.0.1:11434",
        "password": "pw",
        "specs": {"ram": 24},
        "config": {"temperature": 0.5},
    }
    assert events[0]["event"] == "joined"
    assert "password" not in json.dumps(events)


def test_faults_keep_going_and_report_back_online() -> None:
    hub = ScriptedHub()
    req = httpx.Request("POST", "http://hub.test")
    hub.health = [
        (200, {"success": True}),
        httpx.ConnectError("refused", request=req),
        httpx.ReadTimeout("slow", request=req),
        (500, {"error": "boom"}),
        (200, "<html>proxy error</html>"),
        (200, {"success": True}),
    ]
    session, events = make_session(hub)
    session.join()
    for _ in range(6):
        session.beat()
    assert names(events) == [
        "joined",
        "heartbeat",
        "reconnecting",
        "reconnecting",
        "reconnecting",
        "reconnecting",
        "heartbeat",
        "online",
    ]
    assert [e["attempt"] for e in events if e["event"] == "reconnecting"] == [1, 2, 3, 4]
    assert session.status.state == "online"
    assert session.status.reconnects == 1  # one stretch of trouble, four failed attempts


def test_forgotten_participant_rejoins_at_once_with_the_same_body() -> None:
    hub = ScriptedHub()
    hub.health = [(404, {"error": "Participant not found"})]
    session, events = make_session(hub, specs={"cpu": "x"})
    session.join()
    session.beat()
    assert names(events) == ["joined", "rejoined"]
    joins = [body for m, p, body in hub.requests if p.endswith("/join")]
    assert len(joins) == 2 and joins[0] == joins[1]


def test_room_gone_raises_room_not_found() -> None:
    hub = ScriptedHub()
    hub.health = [(404, {"error": "Room not found"})]
    session, _ = make_session(hub)
    session.join()
    with pytest.raises(RoomNotFound):
        session.beat()


def test_startup_retries_then_gives_up_with_hub_unavailable() -> None:
    hub = ScriptedHub()
    req = httpx.Request("POST", "http://hub.test")
    hub.join = [httpx.ConnectError("refused", request=req)] * 50
    session, events = make_session(hub)
    with pytest.raises(HubUnavailable):
        session.join()
    assert len(hub.requests) >= 2
    assert events == []


def test_startup_retry_succeeds_when_the_hub_comes_up() -> None:
    hub = ScriptedHub()
    req = httpx.Request("POST", "http://hub.test")
    hub.join = [httpx.ConnectError("refused", request=req)]
    session, events = make_session(hub)
    session.join()
    assert names(events) == ["joined"]


def test_run_session_leaves_when_woken_and_reports_confirmation() -> None:
    hub = ScriptedHub()
    session, events = make_session(hub, interval_s=0.01)
    wake = threading.Event()
    beats = threading.Event()

    def emit_and_count(ev: dict[str, Any]) -> None:
        events.append(ev)
        if sum(e["event"] == "heartbeat" for e in events) >= 3:
            beats.set()
            wake.set()

    session._emit_cb = emit_and_count
    outcome = run_session(session, wake)
    assert outcome.error is None and outcome.confirmed is True
    assert names(events)[0] == "joined" and names(events)[-1] == "left"
    assert hub.requests[-1][0] == "DELETE"


def test_unconfirmed_leave_is_reported() -> None:
    hub = ScriptedHub()
    hub.leave_answer = (500, "<html>down</html>")
    session, events = make_session(hub)
    session.join()
    assert session.leave() is False


def test_invalid_password_at_join_does_not_leave() -> None:
    hub = ScriptedHub()
    hub.join = [(401, {"error": "Invalid password"})]
    session, events = make_session(hub)
    outcome = run_session(session, threading.Event())
    assert isinstance(outcome.error, InvalidPassword)
    assert [m for m, _, _ in hub.requests] == ["POST"]


def test_stable_id_is_stable_per_share_and_key_file_is_private() -> None:
    a1 = stable_participant_id("http://hub:3000", "ABC123", "http://127.0.0.1:11434")
    a2 = stable_participant_id("http://hub:3000", "abc123", "http://127.0.0.1:11434")
    b = stable_participant_id("http://hub:3000", "ABC123", "http://127.0.0.1:1234")
    assert a1 == a2 and a1 != b
    key = config_dir() / "key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_stable_id_falls_back_to_random_when_config_dir_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    notes: list[str] = []
    debug: Callable[[str], None] = notes.append
    one = stable_participant_id("h", "ABC123", "e", debug)
    two = stable_participant_id("h", "ABC123", "e", debug)
    assert one != two and notes


_ID_SCRIPT = (
    "import sys\n"
    "from llmroom_cli.identity import stable_participant_id\n"
    "sys.stdin.read()  # the start gate: all of them go at once\n"
    "print(stable_participant_id('http://h:3000', 'ABC123', 'http://e'))\n"
)


def test_twelve_agents_started_at_once_share_one_key() -> None:
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ID_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for _ in range(12)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    results = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        results.append((p.stdout.read(), p.stderr.read()))
        p.wait(timeout=60)
        p.stdout.close()
        p.stderr.close()
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 1, ids
    key = config_dir() / "key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert [p.name for p in key.parent.iterdir()] == ["key"]  # no temporary file left behind
    assert stable_participant_id("http://h:3000", "ABC123", "http://e") in ids


def test_an_unwritable_config_dir_is_said_once_on_stderr(tmp_path: Path) -> None:
    from llmroom_cli.server import start_hub
    from llmroom_cli.standin import StandIn
    from tests.helpers import Agent

    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    env = dict(os.environ, XDG_CONFIG_HOME=str(blocker))
    with start_hub(port=0) as hub, StandIn() as llm:
        room = hub.state.create_room("r")["code"]
        a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", "0.05", env=env)
        a.wait_event("heartbeat", count=2)
        a.signal()
        assert a.finish() == 0
    assert a.stderr.count("warning: cannot keep the participant key in") == 1, a.stderr
    assert "--id ID" in a.stderr


def test_a_key_created_by_another_agent_meanwhile_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race, made deterministic: another agent creates the key between our look and our write.
    Ours must not replace theirs (they already use it): we use theirs."""
    import secrets

    from llmroom_cli import identity

    path = config_dir() / "key"
    theirs = "f" * 64
    real = secrets.token_hex

    def token_hex_after_the_other_agent(n: int | None = None) -> str:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(theirs)
        return real(n)

    monkeypatch.setattr(identity.secrets, "token_hex", token_hex_after_the_other_agent)
    mine = stable_participant_id("http://h:3000", "ABC123", "http://e")
    assert path.read_text() == theirs
    monkeypatch.setattr(identity.secrets, "token_hex", real)
    assert stable_participant_id("http://h:3000", "ABC123", "http://e") == mine
