"""Rendering: tables on a terminal and piped, and the fast path for very large rooms."""

from __future__ import annotations

import io

import pytest

from llmroom_cli import render


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_table_is_tab_separated_without_header() -> None:
    out = io.StringIO()
    render.print_table(("A", "B"), [["x", "y"], ["z", "w"]], file=out)
    assert out.getvalue() == "x\ty\nz\tw\n"


def test_terminal_table_has_header_and_rows() -> None:
    out = Tty()
    render.print_table(("NICKNAME", "MODEL"), [["alice", "llama3.2"]], file=out)
    text = out.getvalue()
    assert "NICKNAME" in text and "alice" in text and "llama3.2" in text


def test_huge_table_on_a_terminal_is_aligned_and_dims_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    rows = [[f"user{i}", "online" if i % 2 else "offline"] for i in range(render.RICH_MAX_ROWS + 1)]
    dim = [r[1] == "offline" for r in rows]
    out = Tty()
    render.print_table(("NICKNAME", "STATUS"), rows, dim, file=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(rows) + 1
    assert lines[1] == "\x1b[2muser0     offline\x1b[0m"  # padded to the widest cell, dimmed
    assert lines[2] == "user1     online"


def test_huge_table_honours_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    rows = [["a", "b"]] * (render.RICH_MAX_ROWS + 1)
    out = Tty()
    render.print_table(("X", "Y"), rows, [True] * len(rows), file=out)
    assert "\x1b[" not in out.getvalue()


def test_ago() -> None:
    assert render.ago(1_000_000, now_ms=1_004_000) == "4s ago"
    assert render.ago(0, now_ms=3 * 3600 * 1000) == "3h ago"
    assert render.ago(None) == "-"


def _screen(raw: str, cols: int = 100, rows: int = 30) -> list[str]:
    import pyte

    screen = pyte.Screen(cols, rows)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display]


def test_watch_warning_goes_once_the_hub_answers_again(monkeypatch: pytest.MonkeyPatch) -> None:
    out = Tty()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "100")
    w = render.Watcher(("NICKNAME", "STATUS"), "room ABC123")
    w.show([["alice", "online"]], [False])
    w.warn("warning: the hub at http://127.0.0.1:3000 did not answer in time; still trying")
    shown = _screen(out.getvalue())
    assert any("did not answer in time; still trying" in line for line in shown)
    w.show([["alice", "online"], ["bob", "online"]], [False, False])
    shown = _screen(out.getvalue())
    assert any(line.startswith("bob") for line in shown)
    assert not any("still trying" in line for line in shown)  # the stale warning is gone
    w.close()


def test_watch_warning_when_piped_is_one_line_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = render.Watcher(("NICKNAME",), "room ABC123")
    w.warn("warning: the hub did not answer; still trying")
    w.show([["alice"]], [False])
    got = capsys.readouterr()
    assert got.err == "warning: the hub did not answer; still trying\n"
    assert got.out == "alice\n\n"


@pytest.mark.parametrize(("term", "live"), [("dumb", False), ("unknown", False), ("xterm-256color", True)])
def test_live_display_only_where_the_terminal_can_redraw(
    monkeypatch: pytest.MonkeyPatch, term: str, live: bool
) -> None:
    monkeypatch.setenv("TERM", term)
    assert render.live_capable(Tty()) is live
    assert render.live_capable(io.StringIO()) is False
    out = Tty()
    monkeypatch.setattr("sys.stdout", out)
    w = render.Watcher(("NICKNAME",), "room ABC123")
    w.show([["alice"]], [False])
    w.close()
    # A dumb terminal gets the rows as they come (rich would hold a live table back until the end).
    assert (out.getvalue() == "alice\n\n") is not live


def test_the_speed_column_shows_join_bench_figures_and_ignores_hostile_ones() -> None:
    from llmroom_cli.render import PARTICIPANT_COLUMNS, participant_rows

    assert PARTICIPANT_COLUMNS[-1] == "SPEED"  # appended: piped positions of the others unchanged
    fast = {"id": "a", "specs": {"llm": {"ttftMs": 81.2, "tokensPerSecond": 42.5}}}
    hostile = {"id": "b", "specs": {"llm": {"ttftMs": "1; rm -rf", "tokensPerSecond": float("nan")}}}
    none = {"id": "c", "specs": {}}
    shown = [r[-1] for r in participant_rows([fast, hostile, none])]
    assert shown == ["81 ms, 42.5 tok/s", "-", "-"]
    piped = [r[-1] for r in participant_rows([fast, hostile, none], plain=True)]
    assert piped == ["42.5", "-", "-"]
