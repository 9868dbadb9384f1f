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
