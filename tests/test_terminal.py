"""Terminal behaviour on a real pseudo-terminal (tests/pty_helpers.py): the live join panel, closing
the terminal window, `nohup`, and the interactive parts (prompts, numbered picks, list --watch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmroom_cli.server import RunningHub
from llmroom_cli.standin import MODEL, StandIn
from tests.helpers import WAIT_S, wait_for
from tests.pty_helpers import PtyProcess, plain


@pytest.fixture
def llm() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


@pytest.fixture
def room(hub: RunningHub) -> str:
    code: str = hub.state.create_room("tty room")["code"]
    return code


@pytest.fixture
def ptys() -> Iterator[list[PtyProcess]]:
    made: list[PtyProcess] = []
    yield made
    for p in made:
        p.close()


def _join_on_pty(
    ptys: list[PtyProcess], hub: RunningHub, llm: StandIn, room: str, *extra: str, env: dict[str, str]
) -> PtyProcess:
    p = PtyProcess("join", room, "--hub", hub.url, "-e", llm.url, "--interval", "0.1", *extra, env=env)
    ptys.append(p)
    return p


@pytest.mark.parametrize("attempt", range(3))
def test_closing_the_terminal_leaves_and_exits_zero(
    hub: RunningHub, llm: StandIn, room: str, ptys: list[PtyProcess], clean_env: dict[str, str], attempt: int
) -> None:
    p = _join_on_pty(ptys, hub, llm, room, "--nickname", "alice", env=clean_env)
    p.expect(r"Ctrl-C to leave")
    wait_for(lambda: hub.state.participants(room), "the join to reach the hub")
    p.expect(r"beats\s+[2-9]")  # the panel is live and redrawing
    p.hang_up()
    assert p.wait() == 0
    assert hub.state.participants(room) == []


def test_live_panel_shows_the_share_and_counts_beats(
    hub: RunningHub, llm: StandIn, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    p = _join_on_pty(ptys, hub, llm, room, "--nickname", "bob", env=clean_env)
    p.expect(r"beats\s+3")
    screen = plain(p.text)
    for text in (room, "bob", MODEL, llm.url, "online", "Ctrl-C to leave", "round trip"):
        assert text in screen
    p.proc.send_signal(signal.SIGINT)
    assert p.wait() == 0
    assert "left the room" in plain(p.text)
    assert hub.state.participants(room) == []


def test_nohup_keeps_a_hangup_ignored(hub: RunningHub, llm: StandIn, room: str, tmp_path: object) -> None:
    proc = subprocess.Popen(
        ["nohup", sys.executable, "-m", "llmroom_cli", "join", room, "--hub", hub.url, "-e", llm.url]
        + ["--interval", "0.05", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        wait_for(lambda: hub.state.participants(room), "the join")
        proc.send_signal(signal.SIGHUP)
        before = hub.state.participants(room)[0]["lastSeen"]
        wait_for(lambda: hub.state.participants(room)[0]["lastSeen"] > before, "a heartbeat after SIGHUP")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err
        assert '"event":"left"' in out.splitlines()[-1]
        assert hub.state.participants(room) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
