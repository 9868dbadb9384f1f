"""Shared helpers for the benchmark scripts: timing subprocesses and printing figure/baseline/ratio."""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# LLMROOM_BENCH_ROOT measures another checkout (a scratch copy with a prototyped change) with these scripts.
ROOT = os.environ.get("LLMROOM_BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PY = sys.executable


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("TYPER_USE_RICH", None)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        e.pop(k, None)
    e["NO_PROXY"] = "*"
    return e


def time_cmd(
    argv: Sequence[str], runs: int = 15, warmup: int = 2, environ: dict[str, str] | None = None
) -> float:
    """Median wall time of a command with stdout/stderr to pipes (not a terminal)."""
    samples = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        subprocess.run(list(argv), capture_output=True, env=environ or env(), check=True)
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def row(name: str, value: float, unit: str, baseline_name: str, baseline: float, target: str = "") -> str:
    ratio = value / baseline if baseline else float("nan")
    line = (
        f"{name:<44} {value:9.3f} {unit:<4} | {baseline_name:<28} {baseline:9.3f} {unit:<4} | x{ratio:6.2f}"
    )
    if target:
        line += f" | target {target}"
    print(line, flush=True)
    return line


def cached_env(prefix: str) -> dict[str, str]:
    """env() with bytecode cached under `prefix`, as an installed package runs (this environment sets
    PYTHONDONTWRITEBYTECODE=1, so otherwise every module is compiled from source on each start)."""
    e = env()
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPYCACHEPREFIX"] = prefix
    return e


_TICK = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MiB, VmRSS), CPU seconds (utime + stime), threads and open fds of a live process."""
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()  # fields after the command name; utime is the 12th
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "cpu_s": (int(stat[11]) + int(stat[12])) / _TICK,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class Proc:
    """A subprocess whose stdout lines (JSON where they parse) are read by a thread and stamped with
    perf_counter, so every wait is bounded: `wait_for` raises TimeoutError instead of hanging."""

    def __init__(
        self, argv: Sequence[str], environ: dict[str, str] | None = None, stdin: bool = False
    ) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ or env(),
            cwd=ROOT,
        )
        self.lines: queue.Queue[tuple[float, Any] | None] = queue.Queue()
        self.seen: list[tuple[float, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.perf_counter()
            try:
                item: Any = json.loads(line)
            except ValueError:
                item = line.rstrip("\n")
            self.lines.put((t, item))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pred: Callable[[Any], bool], timeout_s: float) -> tuple[float, Any]:
        """The first (time, line) from now on that satisfies `pred`; TimeoutError after timeout_s."""
        deadline = time.perf_counter() + timeout_s
        while True:
            left = deadline - time.perf_counter()
            try:
                got = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise TimeoutError(f"no matching line in {timeout_s} s; stderr: {self.stderr[-3:]}") from None
            if got is None:
                self.lines.put(None)
                raise TimeoutError(f"process exited ({self.proc.poll()}); stderr: {self.stderr[-3:]}")
            self.seen.append(got)
            if pred(got[1]):
                return got

    def drain(self, timeout_s: float = 2.0) -> list[Any]:
        """Every line left, up to EOF (or timeout_s)."""
        out = []
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            try:
                got = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if got is None:
                self.lines.put(None)
                break
            self.seen.append(got)
            out.append(got[1])
        return out

    def close(self, sig: int = signal.SIGINT, timeout_s: float = 5.0) -> int:
        """Signal (if still running), wait up to timeout_s, then kill; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.proc.returncode


def event(name: str, **fields: Any) -> Callable[[Any], bool]:
    """A wait_for predicate: a JSON line with this event name (and fields >= the given values)."""

    def pred(item: Any) -> bool:
        if not isinstance(item, dict) or item.get("event") != name:
            return False
        return all(isinstance(item.get(k), (int, float)) and item[k] >= v for k, v in fields.items())

    return pred


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
