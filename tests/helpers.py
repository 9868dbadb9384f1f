"""Shared test helpers: run the real CLI as a subprocess and wait on its output lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# A hang guard for waits on a condition (not a speed assertion: they return as soon as it holds).
WAIT_S = 30.0


def cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m llmroom_cli ARGS` to completion (`prefix`: say, `ip netns exec NS`)."""
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "llmroom_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=WAIT_S * 2,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def wait_for(cond: Callable[[], Any], what: str, timeout: float = WAIT_S, poll: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


class Agent:
    """`llmroom join ... --json` running in the background; stdout lines are read as JSON events."""

    running: list[Agent] = []

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "llmroom_cli", "join", *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or dict(os.environ),
        )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr = ""
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Agent.running.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain(self, block_s: float) -> bool:
        """Take one line if one comes within block_s; False once stdout has closed."""
        if self._eof:
            return False
        try:
            line = self.lines.get(timeout=block_s)
        except queue.Empty:
            return True
        if line is None:
            self._eof = True
            return False
        self.raw.append(line)
        try:
            self.events.append(json.loads(line))
        except ValueError:
            pass
        return True

    def wait_event(self, name: str, count: int = 1, timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if e.get("event") == name]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {name!r} event (x{count}); got {self.names()}; stderr: {self.stderr}"
                )
            if not self._drain(0.05) and self.proc.poll() is not None:
                self._finish_stderr()
                raise AssertionError(f"agent exited {self.proc.returncode} before {name!r}: {self.stderr}")

    def names(self) -> list[str]:
        return [e.get("event", "?") for e in self.events]

    def signal(self, sig: int = signal.SIGINT) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = WAIT_S) -> int:
        code = self.proc.wait(timeout=timeout)
        while self._drain(WAIT_S):
            pass
        self._finish_stderr()
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(timeout=WAIT_S)
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()
        if self in Agent.running:
            Agent.running.remove(self)

    def _finish_stderr(self) -> None:
        if self.proc.stderr is not None and not self.proc.stderr.closed and not self.stderr:
            self.stderr = self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._finish_stderr()
        self._close()

    @classmethod
    def kill_all(cls) -> None:
        for agent in list(cls.running):
            agent.kill()
