"""The join panel on a real pseudo-terminal, driven with synthetic session events.

A child process (`drive()` below) builds a real `JoinOutput` on a pty of a given size and obeys
commands the test appends to a control file (emit an event, change the status or the traffic counters,
close, crash); it acknowledges each one in a second file, so the test knows what has been written to
the terminal by then. What the terminal shows is computed by pyte (a VT100 emulator) from the bytes
the child wrote; `reflow()` re-wraps the screen on a resize the way tmux and VTE do, which is what
tore the old frame."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyte
import pytest

from tests.helpers import WAIT_S
from tests.pty_helpers import _WRAPPER, PtyProcess, plain

INFO = {
    "room": "ABC123",
    "hub": "http://127.0.0.1:3000",
    "nickname": "alice",
    "model": "llama3.2:latest",
    "endpoint": "http://127.0.0.1:11434",
    "id": "3f2a9c1e-6b7d-4e8f-9a0b-1c2d3e4f5a6b",
}
ROOT = Path(__file__).resolve().parent.parent
LONG_ERROR = "cannot reach the hub at http://127.0.0.1:3000: " + "nothing listens on 127.0.0.1:3000 " * 8


def drive() -> None:
    """The child: a JoinOutput on this terminal, obeying the control file's commands one by one."""
    from llmroom_cli.relay import Traffic
    from llmroom_cli.render import JoinOutput
    from llmroom_cli.session import Status

    if os.environ.get("PANEL_BACKGROUND") == "1":
        _become_a_background_job()
    ctl = Path(os.environ["PANEL_CTL"])
    ack = Path(os.environ["PANEL_CTL"] + ".ack")
    traffic = Traffic()
    with_traffic = os.environ.get("PANEL_TRAFFIC") == "1"
    source = (lambda: traffic) if with_traffic else None
    out = JoinOutput(os.environ.get("PANEL_MODE", "live"), INFO, traffic=source)
    status = Status()
    out.status = status
    done = 0
    while True:
        lines = ctl.read_text().splitlines() if ctl.exists() else []
        if len(lines) <= done:
            time.sleep(0.01)
            continue
        cmd: dict[str, Any] = json.loads(lines[done])
        done += 1
        if "status" in cmd:
            for key, value in cmd["status"].items():
                if key in ("joined_at", "last_beat_at"):
                    value = time.monotonic() - value  # given as seconds ago
                setattr(status, key, value)
        if "traffic" in cmd:
            for key, value in cmd["traffic"].items():
                setattr(traffic, key, value)
        if "emit" in cmd:
            out({"ts": 0, **cmd["emit"]})
        if "retrying" in cmd:
            out.retrying(*cmd["retrying"])
        if "waiting" in cmd:
            from llmroom_cli.render import waiting

            with waiting(cmd["waiting"][0]):
                time.sleep(cmd["waiting"][1])
        if cmd.get("end_retry"):
            out.end_retry()
        if "raise" in cmd:
            raise RuntimeError(cmd["raise"])  # an unexpected error: the interpreter exits 1
        if cmd.get("close"):
            out.close()
        with ack.open("a") as f:
            f.write(f"{done}\n")
        if cmd.get("exit"):
            return


def _become_a_background_job() -> None:
    """As after `llmroom join CODE &`: this process forks; the parent stays in the foreground, as the
    shell does, and waits; the child goes on in a process group of its own, in the background (not
    orphaned: its parent is in the same session, so touching the terminal would stop it, SIGTTOU)."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    os.setpgid(0, 0)


class PanelPty(PtyProcess):
    """`drive()` on a pty of `rows` x `cols`, with a pyte screen following what it writes."""

    def __init__(self, tmp: Path, *, cols: int, rows: int = 40, env: dict[str, str] | None = None) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.ctl = tmp / "ctl"
        self.ack = tmp / "ctl.ack"
        full = {**os.environ, "TERM": "xterm-256color", "PANEL_CTL": str(self.ctl), **(env or {})}
        full.pop("COLUMNS", None)
        full.pop("LINES", None)
        script = "from tests.test_panel import drive; drive()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, "-c", script],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=full,
            cwd=ROOT,
        )
        os.close(slave)
        self.raw = b""
        self.closed = False
        self.sent = 0
        self.fed = 0
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)

    def do(self, **cmd: Any) -> None:
        """Send one command and wait until the child has carried it out; then read what it wrote."""
        self.order(**cmd)
        self.done(cmd)

    def order(self, **cmd: Any) -> None:
        """Send one command without waiting for it."""
        with self.ctl.open("a") as f:
            f.write(json.dumps(cmd) + "\n")
        self.sent += 1

    def done(self, cmd: Any = None) -> None:
        """Wait until the child has carried out every command sent so far."""
        deadline = time.monotonic() + WAIT_S
        while not (self.ack.exists() and len(self.ack.read_text().splitlines()) >= self.sent):
            if self.proc.poll() is not None:
                shown = plain(self.text)[-2000:]
                raise AssertionError(f"the driver exited {self.proc.returncode}: {shown!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"command {cmd} not done; terminal: {plain(self.text)[-2000:]!r}")
            self._read(0.01)
        self.drain()

    def drain(self, quiet_s: float = 0.05) -> None:
        """Read until nothing more arrives for `quiet_s`, and feed it all to the screen."""
        while self._read(quiet_s):
            if len(self.raw) == self.fed:
                break
            self.feed()
        self.feed()

    def feed(self) -> None:
        self.stream.feed(self.raw[self.fed :])
        self.fed = len(self.raw)

    def lines(self) -> list[str]:
        self.feed()
        return [line.rstrip() for line in self.screen.display]

    def wait_screen(self, text: str, timeout: float = WAIT_S) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.lines()
            if any(text in line for line in shown):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} on the screen: {shown}")
            self._read(0.05)

    def resize(self, cols: int, rows: int) -> None:
        """Resize the window as a reflowing terminal does: what was drawn is re-wrapped at the new
        width first, then the program is told (SIGWINCH from the kernel)."""
        self.drain()
        self.screen, self.stream = reflow(self.screen, cols, rows)
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def echo_on(self) -> bool:
        return bool(termios.tcgetattr(self.master)[3] & termios.ECHO)


def reflow(screen: pyte.Screen, cols: int, rows: int) -> tuple[pyte.Screen, pyte.ByteStream]:
    """A new screen of `cols` x `rows` showing `screen` re-wrapped (as tmux, VTE and iTerm2 do):
    each row longer than `cols` continues on the next rows, the rows above scroll away, and the
    cursor stays on the character it was on."""
    old = [line.rstrip() for line in screen.display]
    cy, cx = screen.cursor.y, screen.cursor.x
    new: list[str] = []
    cursor = (0, 0)
    for y, line in enumerate(old):
        chunks = [line[i : i + cols] for i in range(0, len(line), cols)] or [""]
        if y == cy:
            part = min(cx // cols, len(chunks))
            cursor = (len(new) + part, cx - part * cols)
        new.extend(chunks)
    while len(new) > cursor[0] + 1 and not new[-1]:
        new.pop()  # blank rows under the cursor absorb the growth first
    drop = max(0, len(new) - rows)
    new = new[drop:]
    fresh = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(fresh)
    data = "".join(f"\x1b[{y + 1};1H{line}" for y, line in enumerate(new))
    data += f"\x1b[{cursor[0] - drop + 1};{min(cursor[1], cols - 1) + 1}H"
    stream.feed(data.encode())
    return fresh, stream


def panel_box(lines: list[str]) -> list[str]:
    """The panel's rows, checked to be one whole frame: one top and one bottom border, every row
    between them framed at the same two columns."""
    tops = [i for i, line in enumerate(lines) if "╭" in line]
    bottoms = [i for i, line in enumerate(lines) if "╰" in line]
    assert len(tops) == 1 and len(bottoms) == 1, "\n".join(lines)
    box = lines[tops[0] : bottoms[0] + 1]
    width = len(box[0])
    for row in box[1:-1]:
        assert len(row) == width and row[0] == "│" and row[-1] == "│", "\n".join(lines)
    assert len(box[-1]) == width, "\n".join(lines)
    stray = [line for line in lines[: tops[0]] if "│" in line or "─" in line]
    assert not stray, "\n".join(lines)  # nothing of an old frame is left above the panel
    return box


def flat(box: list[str]) -> str:
    """The panel's text with its frame removed and wrapped values joined up again."""
    return " ".join(" ".join(row.strip("│╭╮╰╯─ ").split()) for row in box)


@pytest.fixture
def ptys() -> Iterator[list[PanelPty]]:
    made: list[PanelPty] = []
    yield made
    for p in made:
        p.close()


def _panel(ptys: list[PanelPty], tmp_path: Path, cols: int, **env: str) -> PanelPty:
    p = PanelPty(tmp_path, cols=cols, env=env)
    ptys.append(p)
    return p


JOINED = {"event": "joined", **INFO, "specs": None}
ONLINE = {"state": "online", "joined_at": 5, "last_beat_at": 1, "last_rtt_ms": 1.5, "beats": 3}


@pytest.mark.parametrize("cols", [40, 60, 120])
def test_the_panel_is_drawn_as_soon_as_the_join_is_done(
    ptys: list[PanelPty], tmp_path: Path, cols: int
) -> None:
    p = _panel(ptys, tmp_path, cols)
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    # Read at once after the event: the frame is there, not one refresh tick later.
    box = panel_box(p.lines())
    assert len(box[0]) <= cols
    text = "\n".join(box)
    assert "online" in text and "Ctrl-C to leave" in text and "alice" in text
    p.do(close=True, exit=True)
    assert p.wait() == 0


@pytest.mark.parametrize("cols", [40, 60, 120])
def test_traffic_in_the_panel_dashes_then_figures(ptys: list[PanelPty], tmp_path: Path, cols: int) -> None:
    p = _panel(ptys, tmp_path, cols, PANEL_TRAFFIC="1")
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    text = flat(panel_box(p.lines()))
    assert "requests 0 served · 0 in flight · 0 failed" in text and "last request TTFT - · - tokens/s" in text
    width = len(panel_box(p.lines())[0])
    figures = {"served": 3, "in_flight": 1, "failed": 2, "last_ttft_ms": 123.4, "last_tokens_per_s": 35.21}
    p.do(traffic=figures)
    request = {"event": "request", "route": "chat", "status": 200, "duration_ms": 812.0, "ttft_ms": 123.4}
    p.do(emit={**request, "tokens": 28, "tokens_per_s": 35.21})
    box = panel_box(p.lines())
    text = flat(box)
    assert "3 served · 1 in flight · 2 failed" in text
    assert "TTFT 123 ms · 35.2 tokens/s" in text
    assert len(box[0]) == width  # counters do not resize the frame
    assert not any(line.startswith("request chat") for line in p.lines())  # no extra line in panel mode
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_paused_and_resumed_in_the_panel(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 120)
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    reason = "the LLM server at http://127.0.0.1:11434 stopped answering"
    p.do(emit={"event": "paused", "reason": reason, "cause": "server_down"})
    text = flat(panel_box(p.lines()))
    assert "status paused the LLM server at" in text and reason in text and "online" not in text
    p.do(emit={"event": "resumed"})
    text = flat(panel_box(p.lines()))
    assert "status online" in text and "paused" not in text and reason not in text
    p.do(close=True, exit=True)
    assert p.wait() == 0


@pytest.mark.parametrize("cols", [40, 60, 120])
def test_a_long_error_wraps_inside_a_panel_of_the_same_width(
    ptys: list[PanelPty], tmp_path: Path, cols: int
) -> None:
    p = _panel(ptys, tmp_path, cols)
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    width = len(panel_box(p.lines())[0])
    assert width <= cols
    p.do(status={"state": "reconnecting", "last_error": LONG_ERROR})
    p.do(emit={"event": "reconnecting", "reason": LONG_ERROR, "attempt": 1})
    box = panel_box(p.lines())
    assert len(box[0]) == width, "\n".join(box)
    text = "\n".join(box)
    assert "reconnecting" in text and "nothing" in text and "…" in text  # wrapped, then cut
    p.do(close=True, exit=True)
    assert p.wait() == 0


@pytest.mark.parametrize(("start", "end"), [(120, 40), (120, 60), (60, 40), (40, 120)])
def test_resizing_the_window_redraws_one_clean_frame(
    ptys: list[PanelPty], tmp_path: Path, start: int, end: int
) -> None:
    p = _panel(ptys, tmp_path, start, PANEL_TRAFFIC="1")
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    panel_box(p.lines())
    p.resize(end, 40)
    # The next frame after the resize: the refresher is woken by SIGWINCH (or sees the new size).
    deadline = time.monotonic() + WAIT_S
    while True:
        p.drain(0.1)
        lines = p.lines()
        try:
            box = panel_box(lines)
            if len(box[0]) <= end and any("Ctrl-C to leave" in row for row in box):
                break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    p.do(emit={"event": "heartbeat", "seq": 4, "rtt_ms": 1.0})  # later frames stay clean too
    box = panel_box(p.lines())
    assert len(box[0]) <= end
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_typed_keys_are_not_echoed_and_echo_comes_back(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80)
    assert p.echo_on()
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    assert not p.echo_on()
    p.send("typed-while-live")
    p.do(emit={"event": "heartbeat", "seq": 4, "rtt_ms": 1.0})
    assert not any("typed-while-live" in line for line in p.lines())
    panel_box(p.lines())
    p.do(close=True)
    assert p.echo_on()
    p.do(exit=True)
    assert p.wait() == 0


def test_a_background_job_leaves_the_terminal_alone(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80, PANEL_BACKGROUND="1")
    p.do(status=ONLINE)
    p.do(emit=JOINED)  # not stopped by SIGTTOU: it did not touch the terminal's settings
    assert p.echo_on()
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_echo_comes_back_when_the_process_dies_of_an_error(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80)
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    assert not p.echo_on()
    with open(p.ctl, "a") as f:
        f.write(json.dumps({"raise": "boom"}) + "\n")
    assert p.wait() == 1
    assert "boom" in plain(p.text)
    assert p.echo_on()


def test_a_dumb_terminal_gets_plain_lines_while_joined(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80, TERM="dumb")
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    p.do(emit={"event": "paused", "reason": "the GPU is busy", "cause": "gpu_busy"})
    text = plain(p.text)
    assert "joined room ABC123 on http://127.0.0.1:3000 as alice" in text
    assert "paused: the GPU is busy" in text
    assert "╭" not in text and "\x1b[?25l" not in p.text  # no panel, the cursor is never hidden
    assert p.echo_on()
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_the_start_up_retry_counts_down_then_gives_way_to_the_panel(
    ptys: list[PanelPty], tmp_path: Path
) -> None:
    p = _panel(ptys, tmp_path, 100)
    reason = "cannot reach the hub at http://127.0.0.1:3000: nothing listens on 127.0.0.1:3000"
    p.do(retrying=[reason, 9.0])
    first = p.wait_screen("s left")
    at = next(i for i, row in enumerate(first) if "s left" in row)
    assert reason in first[at - 1] and "retrying: " in first[at] and "Ctrl-C to stop" in first[at]
    # A live line: later frames count down (a spinner and seconds left), in place on one row.
    p.wait_screen("8 s left")
    assert sum("s left" in row for row in p.lines()) == 1
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    lines = p.lines()
    assert not any("s left" in row for row in lines)
    panel_box(lines)
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_a_retrying_event_with_the_next_try_is_counted_down_too(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 120)
    reason = "cannot reach the hub at http://127.0.0.1:3000: no such host: hubb.local"
    p.do(emit={"event": "retrying", "reason": reason, "remaining_s": 9.0, "next_s": 2.0})
    shown = p.wait_screen("next try in")
    at = next(i for i, row in enumerate(shown) if "next try in" in row)
    assert reason in shown[at - 1] and "s left" in shown[at]
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_a_retry_that_ends_leaves_no_spinner_and_restores_echo(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 60)
    p.do(retrying=["cannot reach the hub at http://127.0.0.1:3000: nothing listens on 127.0.0.1:3000", 5.0])
    p.wait_screen("s left")
    assert not p.echo_on()
    p.do(close=True)
    assert not any("s left" in row for row in p.lines())
    assert p.echo_on()
    p.do(exit=True)
    assert p.wait() == 0


def test_a_retry_ended_before_a_prompt_then_a_join_draws_a_live_panel(
    ptys: list[PanelPty], tmp_path: Path
) -> None:
    p = _panel(ptys, tmp_path, 80)
    p.do(retrying=["cannot reach the hub at http://127.0.0.1:3000: nothing listens on 127.0.0.1:3000", 5.0])
    p.wait_screen("s left")
    p.do(end_retry=True)  # the room wants a password: the CLI asks for it now
    assert not any("s left" in row for row in p.lines())
    assert p.echo_on()
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    panel_box(p.lines())
    p.wait_screen("uptime          0m06s")  # the new panel has its own refresher, ticking
    panel_box(p.lines())
    p.do(close=True, exit=True)
    assert p.wait() == 0


def test_a_wait_is_said_on_the_terminal_and_erased_after(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80)
    message = "looking for hubs on the local network for 1.5 s ..."
    p.order(waiting=[message, 1.5])
    p.wait_screen(message)
    p.done()
    assert not any(message in row for row in p.lines())
    p.do(exit=True)
    assert p.wait() == 0


def test_a_wait_is_not_drawn_on_a_dumb_terminal(ptys: list[PanelPty], tmp_path: Path) -> None:
    p = _panel(ptys, tmp_path, 80, TERM="dumb")
    p.do(waiting=["looking for hubs", 0.2])
    assert "looking for hubs" not in p.text
    p.do(exit=True)
    assert p.wait() == 0


def test_requests_in_quick_succession_still_show_the_latest_count(
    ptys: list[PanelPty], tmp_path: Path
) -> None:
    p = _panel(ptys, tmp_path, 80, PANEL_TRAFFIC="1")
    p.do(status=ONLINE)
    p.do(emit=JOINED)
    request = {"event": "request", "route": "chat", "status": 200, "duration_ms": 5.0}
    for n in range(1, 6):
        p.order(traffic={"served": n})
        p.order(emit=request)
    p.done()
    p.wait_screen("5 served")  # drawn by the refresher when events came faster than frames
    panel_box(p.lines())
    p.do(close=True, exit=True)
    assert p.wait() == 0


# -- plain and JSON lines (no terminal needed) -------------------------------------------------------


def _output(mode: str) -> Any:
    from llmroom_cli.render import JoinOutput

    return JoinOutput(mode, INFO)


def test_plain_lines_for_pause_resume_and_requests(capsys: pytest.CaptureFixture[str]) -> None:
    out = _output("plain")
    out({"event": "paused", "ts": 1, "reason": "the LLM server stopped answering", "cause": "server_down"})
    out({"event": "resumed", "ts": 2})
    out(
        {"event": "request", "ts": 3, "route": "chat", "status": 200, "duration_ms": 812.3}
        | {"ttft_ms": 123.4, "tokens": 28, "tokens_per_s": 35.21}
    )
    out({"event": "request", "ts": 4, "route": "models", "status": 503, "duration_ms": 2.0})
    assert capsys.readouterr().out.splitlines() == [
        "paused: the LLM server stopped answering",
        "resumed: sharing again",
        "request chat 200 in 812 ms (TTFT 123 ms, 28 tokens, 35.2 tokens/s)",
        "request models 503 in 2.0 ms",
    ]


def test_json_lines_carry_every_event_as_it_came(capsys: pytest.CaptureFixture[str]) -> None:
    out = _output("json")
    events = [
        {"event": "paused", "ts": 1, "reason": "r", "cause": "gpu_busy"},
        {"event": "resumed", "ts": 2},
        {"event": "request", "ts": 3, "route": "chat", "status": 200, "duration_ms": 1.0},
    ]
    for e in events:
        out(e)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == events


def test_retrying_is_left_to_the_caller_outside_the_live_panel() -> None:
    for mode in ("plain", "json", "quiet"):
        assert _output(mode).retrying("cannot reach the hub", 5.0) is False


def test_a_failing_traffic_source_shows_dashes_not_a_crash() -> None:
    import io

    from rich.console import Console

    from llmroom_cli.render import JoinOutput
    from llmroom_cli.session import Status

    def broken() -> Any:
        raise RuntimeError("gone")

    out = JoinOutput("plain", INFO, traffic=broken)
    out.status = Status(state="online")
    console = Console(file=io.StringIO(), width=100)
    console.print(out._panel())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "- served · - in flight · - failed" in text and "TTFT - · - tokens/s" in text
