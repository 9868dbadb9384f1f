"""Closed and full standard streams: `llmroom ... >&-`, `2>&-`, `2>/dev/full`. The shell does the
redirection, so the fds really are closed (DEVNULL would be an open file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmroom_cli.server import RunningHub
from llmroom_cli.standin import StandIn
from tests.helpers import WAIT_S, wait_for


@pytest.fixture
def llm() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


def _sh(redirect: str, *args: str) -> subprocess.Popen[str]:
    """`python -m llmroom_cli ARGS REDIRECT` through sh; stdin closed unless the redirect says."""
    return subprocess.Popen(
        ["sh", "-c", f'exec "$0" -m llmroom_cli "$@" {redirect}', sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


@pytest.mark.parametrize("redirect", [">&-", "2>&-", ">&- 2>&-", "<&- >&-"])
def test_commands_start_with_closed_streams(hub: RunningHub, redirect: str) -> None:
    code = hub.state.create_room("r")["code"]
    for args in (["--version"], ["list", "--hub", hub.url], ["list", code, "--hub", hub.url], ["--help"]):
        p = _sh(redirect, *args)
        out, err = p.communicate(timeout=WAIT_S)
        assert p.returncode == 0, (args, redirect, err)
        assert "Traceback" not in err and "unexpected" not in err


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full", ">&- 2>/dev/full"])
def test_join_with_a_closed_or_full_stderr_still_leaves_and_exits_zero(
    hub: RunningHub, llm: StandIn, redirect: str
) -> None:
    code = hub.state.create_room("r")["code"]
    # --password warns on stderr at start: the write fails, the join goes on.
    p = _sh(redirect, "join", code, "--hub", hub.url, "-e", llm.url, "--interval", "0.05", "--password", "x")
    try:
        wait_for(lambda: hub.state.participants(code), "the join to reach the hub")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=WAIT_S)
        assert p.returncode == 0
        assert hub.state.participants(code) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
