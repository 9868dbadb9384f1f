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


def test_numbered_model_pick_on_a_terminal(
    hub: RunningHub, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    from tests.hostile_hubs import HostileHub

    with HostileHub() as several:
        several.models = ["alpha-chat", "beta-chat", "gamma-chat"]
        p = PtyProcess("join", room, "--hub", hub.url, "-e", several.url, "--no-specs", env=clean_env)
        ptys.append(p)
        p.expect(r"Share which one\? \[1-3\]")
        screen = plain(p.text)
        assert "1. alpha-chat" in screen and "2. beta-chat" in screen and "3. gamma-chat" in screen
        p.send("7\r")
        p.expect(r"please type a number from 1 to 3")
        p.send("2\r")
        p.expect(r"Ctrl-C to leave")
        wait_for(lambda: hub.state.participants(room), "the join")
        assert hub.state.participants(room)[0]["model"] == "beta-chat"
        p.proc.send_signal(signal.SIGINT)
        assert p.wait() == 0


def test_password_prompt_and_its_three_tries(
    hub: RunningHub, llm: StandIn, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    room = hub.state.create_room("locked", password="hunter22")["code"]
    p = _join_on_pty(ptys, hub, llm, room, env=clean_env)
    p.expect(f"room {room} is protected")
    for n in range(3):
        p.expect(r"Room password: " + r"(.|\n)*Room password: " * n)
        p.send("wrong\r")
    assert p.wait() == 4
    screen = plain(p.text)
    assert screen.count("wrong password") == 2 and "invalid password" in screen
    assert screen.count("wrong") == 2  # what was typed is never echoed
    assert hub.state.participants(room) == []
    # The right one on the second try joins.
    q = _join_on_pty(ptys, hub, llm, room, env=clean_env)
    q.expect(r"Room password: ")
    q.send("nope\r")
    q.expect(r"wrong password(.|\n)*Room password: ")
    q.send("hunter22\r")
    q.expect(r"Ctrl-C to leave")
    wait_for(lambda: hub.state.participants(room), "the join")
    q.proc.send_signal(signal.SIGINT)
    assert q.wait() == 0
    assert "hunter22" not in q.text


def test_create_on_a_terminal_says_how_to_join(
    hub: RunningHub, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    p = PtyProcess("create", "Hack night", "--hub", hub.url, env=clean_env)
    ptys.append(p)
    assert p.wait() == 0
    screen = plain(p.text)
    import re

    found = re.search(r"created room (\S{6}) ", screen)
    assert found, screen
    code = found.group(1)
    assert hub.state.participants(code) == []  # the hub has it (KeyError otherwise)
    assert f"created room {code} (Hack night) on {hub.url}" in screen
    assert f"join it with: llmroom join {code} --hub {hub.url}" in screen


@pytest.mark.parametrize("no_color", [True, False])
def test_no_color_on_a_terminal(
    hub: RunningHub,
    llm: StandIn,
    room: str,
    ptys: list[PtyProcess],
    clean_env: dict[str, str],
    no_color: bool,
) -> None:
    import re

    env = dict(clean_env)
    env.pop("NO_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    p = _join_on_pty(ptys, hub, llm, room, env=env)
    p.expect(r"beats\s+2")
    p.proc.send_signal(signal.SIGINT)
    assert p.wait() == 0
    colours = re.findall(r"\x1b\[[0-9;]*3[0-7](;[0-9]+)*m", p.text)
    assert bool(colours) is not no_color  # "online" is green unless NO_COLOR is set


def test_list_watch_on_a_terminal_follows_the_room(
    hub: RunningHub, llm: StandIn, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    w = PtyProcess("list", room, "--hub", hub.url, "--watch", env=clean_env)
    ptys.append(w)
    w.expect(rf"room {room} · .* · Ctrl-C to stop")
    j = _join_on_pty(ptys, hub, llm, room, "--nickname", "carol", env=clean_env)
    w.expect(r"carol\s+llmroom-demo:latest\s+online")
    j.proc.send_signal(signal.SIGINT)
    assert j.wait() == 0
    w.raw = b""
    w.expect(r"NICKNAME")  # redrawn without carol
    w.expect(r"Ctrl-C to stop")
    w.proc.send_signal(signal.SIGINT)
    assert w.wait() == 0


def test_closing_the_terminal_of_list_watch_exits_zero(
    hub: RunningHub, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    w = PtyProcess("list", room, "--hub", hub.url, "--watch", env=clean_env)
    ptys.append(w)
    w.expect(r"Ctrl-C to stop")
    w.hang_up()
    assert w.wait() == 0


def test_a_dumb_terminal_gets_plain_lines_while_joined(
    hub: RunningHub, llm: StandIn, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    p = _join_on_pty(ptys, hub, llm, room, "--nickname", "dora", env={**clean_env, "TERM": "dumb"})
    # Said while joined, not held back until Ctrl-C (rich draws nothing live on TERM=dumb).
    p.expect(rf"joined room {room} on {hub.url} as dora sharing {MODEL}")
    wait_for(lambda: hub.state.participants(room), "the join")
    assert "╭" not in p.text and "\x1b[?25l" not in p.text
    p.proc.send_signal(signal.SIGINT)
    assert p.wait() == 0
    assert "left the room" in plain(p.text) and "╭" not in p.text


def test_typed_keys_do_not_reach_the_panel_and_sigterm_restores_echo(
    hub: RunningHub, llm: StandIn, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    import termios

    p = _join_on_pty(ptys, hub, llm, room, "--nickname", "erin", env=clean_env)
    assert termios.tcgetattr(p.master)[3] & termios.ECHO
    p.expect(r"beats\s+[1-9]")
    assert not termios.tcgetattr(p.master)[3] & termios.ECHO
    p.send("typed-over-the-panel")
    p.raw = b""
    p.expect(r"beats\s+[1-9]\d*\s")  # a later frame
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait() == 0
    assert "typed-over-the-panel" not in plain(p.text)
    assert termios.tcgetattr(p.master)[3] & termios.ECHO
    assert hub.state.participants(room) == []


def test_list_watch_redraws_one_clean_table_after_a_resize(
    hub: RunningHub, room: str, ptys: list[PtyProcess], clean_env: dict[str, str]
) -> None:
    import fcntl
    import struct
    import termios

    import pyte

    from tests.test_panel import reflow

    w = PtyProcess("list", room, "--hub", hub.url, "--watch", env=clean_env, cols=120)
    ptys.append(w)
    w.expect(r"Ctrl-C to stop")
    screen = pyte.Screen(120, 40)
    stream = pyte.ByteStream(screen)
    stream.feed(w.raw)
    screen, stream = reflow(screen, 40, 40)  # the terminal re-wraps what it shows, then tells us
    fcntl.ioctl(w.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 40, 0, 0))
    w.raw = b""
    w.expect(r"Ctrl-C to stop")  # the next refresh (every 2 s)
    stream.feed(w.raw)
    lines = [line.rstrip() for line in screen.display]
    assert sum("NICKNAME" in line for line in lines) == 1, "\n".join(lines)
    assert sum("Ctrl-C to stop" in line for line in lines) == 1, "\n".join(lines)
    w.proc.send_signal(signal.SIGINT)
    assert w.wait() == 0


@pytest.mark.parametrize("cols", [40, 60, 120])
def test_a_hub_gone_is_said_in_words_in_a_panel_of_the_same_width(
    llm: StandIn, ptys: list[PtyProcess], clean_env: dict[str, str], cols: int
) -> None:
    import pyte

    from llmroom_cli.server import start_hub
    from tests.test_panel import flat, panel_box

    def screen() -> list[str]:
        s = pyte.Screen(cols, 60)
        pyte.ByteStream(s).feed(p.raw)
        return [line.rstrip() for line in s.display]

    with start_hub(port=0) as hub:
        room = hub.state.create_room("r")["code"]
        args = ("join", room, "--hub", hub.url, "-e", llm.url, "--interval", "0.1")
        p = PtyProcess(*args, env=clean_env, rows=60, cols=cols)
        ptys.append(p)
        p.expect(r"beats\s+2")
        width = len(panel_box(screen())[0])
        port = hub.url.rsplit(":", 1)[1]
    p.expect(r"reconnecting")
    words = f"nothing listens on 127.0.0.1:{port}"

    def shown() -> bool:
        p._read(0.1)  # keep reading what the agent draws (the first reason may be the tunnel's close)
        try:
            return words in flat(panel_box(screen()))
        except AssertionError:  # read in the middle of a frame: look again after the next read
            return False

    wait_for(shown, "the reason in words in the panel")
    box = panel_box(screen())
    assert len(box[0]) == width <= cols
    assert "Errno" not in plain(p.text) and "Connection refused" not in plain(p.text)
    p.proc.send_signal(signal.SIGINT)
    assert p.wait() == 0  # the leave is unconfirmed (a warning), the run itself went well
