"""State files behind `llmroom status`: atomic writes, rate limit, stale files of dead agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llmroom_cli import agents


def _state(pid: int, **kw: object) -> agents.AgentState:
    base: dict[str, object] = {"room": "ABC123", "hub": "http://127.0.0.1:3000", "state": "online"}
    base.update(kw)
    return agents.AgentState(pid=pid, started_at=time.time() - 5, **base)  # type: ignore[arg-type]


def test_state_dir_follows_xdg(tmp_path: Path) -> None:
    assert agents.state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "llmroom" / "agents"
    home = agents.state_dir({"HOME": str(tmp_path)})
    assert home == tmp_path / ".local" / "state" / "llmroom" / "agents"


def test_running_agent_listed_and_removed_on_exit(tmp_path: Path) -> None:
    sf = agents.StateFile(_state(os.getpid(), requests_served=3), directory=tmp_path)
    assert sf.update(force=True)
    listed = agents.list_agents(tmp_path)
    assert [(a.pid, a.room, a.requests_served) for a in listed] == [(os.getpid(), "ABC123", 3)]
    assert listed[0].uptime_s() >= 4
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file
    sf.remove()
    assert agents.list_agents(tmp_path) == []


def test_writes_rate_limited_and_flushed(tmp_path: Path) -> None:
    now = [100.0]
    sf = agents.StateFile(_state(os.getpid()), directory=tmp_path, clock=lambda: now[0])
    assert sf.update(requests_served=1)
    assert not sf.update(requests_served=2)  # under a second later: coalesced
    assert json.loads(sf.path.read_text())["requests_served"] == 1
    now[0] += 1.5
    assert sf.update(requests_served=3)
    assert json.loads(sf.path.read_text())["requests_served"] == 3
    sf.update(state="paused", last_error="server down")
    sf.flush()
    data = json.loads(sf.path.read_text())
    assert (data["state"], data["last_error"]) == ("paused", "server down")


def test_stale_file_of_dead_pid_ignored_and_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = agents.StateFile(_state(dead.pid), directory=tmp_path)
    stale.update(force=True)
    live = agents.StateFile(_state(os.getpid()), directory=tmp_path)
    live.update(force=True)
    assert [a.pid for a in agents.list_agents(tmp_path)] == [os.getpid()]
    assert not stale.path.exists()


def test_junk_and_oversized_files_skipped(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text("not json")
    (tmp_path / "2.json").write_text(json.dumps({"pid": "x"}))
    (tmp_path / "3.json").write_text(" " * (agents.MAX_STATE_BYTES + 10))
    assert agents.list_agents(tmp_path) == []
    assert agents.list_agents(tmp_path / "missing") == []


def test_status_command_lists_running_agent_json(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path))
    sf = agents.StateFile(_state(os.getpid(), requests_served=7), directory=agents.state_dir(env))
    sf.update(force=True)
    out = subprocess.run(
        [sys.executable, "-m", "llmroom_cli", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(a["pid"], a["room"], a["requests_served"]) for a in data] == [(os.getpid(), "ABC123", 7)]
    sf.remove()
    out = subprocess.run(
        [sys.executable, "-m", "llmroom_cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "no llmroom agents" in out.stdout


def test_a_running_join_is_listed_by_status_and_gone_when_it_leaves(tmp_path: Path) -> None:
    import signal

    from llmroom_cli.hub import start_hub
    from llmroom_cli.standin import StandIn
    from tests.helpers import Agent, cli, wait_for

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    with start_hub(port=0) as hub, StandIn() as llm:
        room = hub.state.create_room("r")["code"]
        a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", "0.2", env=env)
        joined = a.wait_event("joined")

        def listed() -> list[dict[str, object]]:
            r = cli("status", "--json", env=env)
            assert r.returncode == 0, r.stderr
            found: list[dict[str, object]] = json.loads(r.stdout)
            return [x for x in found if x.get("state") == "online"]

        (entry,) = wait_for(listed, "the agent online in `status`")
        assert entry["pid"] == a.proc.pid and entry["room"] == room and entry["hub"] == hub.url
        assert entry["participant_id"] == joined["id"]
        a.proc.send_signal(signal.SIGINT)
        assert a.proc.wait(timeout=30) == 0
        assert cli("status", "--json", env=env).stdout.strip() == "[]"
        assert not list((tmp_path / "state" / "llmroom" / "agents").glob("*.json"))
