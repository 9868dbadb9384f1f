"""Run the real CLI on a real pseudo-terminal: the child's stdin, stdout and stderr are the pty's
slave side, which is also its controlling terminal (so closing the master is a real hang-up: SIGHUP,
then EIO on every write). Output is read with select and a deadline; the window size is set with
TIOCSWINSZ. No faked isatty."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

from tests.helpers import WAIT_S

# Runs in the child before the CLI: a new session (start_new_session) makes the pty its controlling
# terminal, as a terminal emulator does for the shell it starts.
_WRAPPER = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\r")


def plain(text: str) -> str:
    """The text with terminal escape sequences and carriage returns removed."""
    return _ANSI.sub("", text)


class PtyProcess:
    """`python -m llmroom_cli ARGS` on a pty of `rows` x `cols`."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str],
        rows: int = 40,
        cols: int = 120,
        prefix: list[str] | None = None,
    ) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(env)
        env.setdefault("TERM", "xterm-256color")
        env.pop("COLUMNS", None)  # the window size decides
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", _WRAPPER, "-m", "llmroom_cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=env,
        )
        os.close(slave)
        self.raw = b""
        self.closed = False

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def _read(self, block_s: float) -> bool:
        """Read what is there within block_s; False at EOF (the child and its terminal are gone)."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.master], [], [], block_s)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the slave side has no process left
            return False
        if not data:
            return False
        self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = WAIT_S) -> str:
        """Wait until `pattern` (a regex) appears in the output with escapes removed; returns it all."""
        deadline = time.monotonic() + timeout
        while True:
            if re.search(pattern, plain(self.text)):
                return self.text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} on the terminal; it shows: {plain(self.text)[-2000:]!r}"
                )
            if not self._read(0.05) and self.proc.poll() is not None:
                shown = plain(self.text)[-2000:]
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}; terminal: {shown!r}")

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def hang_up(self) -> None:
        """Close the terminal window: the kernel sends SIGHUP and writes to the tty fail with EIO."""
        if not self.closed:
            os.close(self.master)
            self.closed = True

    def wait(self, timeout: float = WAIT_S) -> int:
        """The exit code, reading (and keeping) the output meanwhile so the child never blocks on it."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if not self._read(0.05):
                time.sleep(0.02)
        code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        while self._read(0.05):
            pass
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.hang_up()
