"""Shared helpers for the benchmark scripts: timing subprocesses and printing figure/baseline/ratio."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def time_cmd(argv: Sequence[str], runs: int = 15, warmup: int = 2) -> float:
    """Median wall time of a command with stdout/stderr to pipes (not a terminal)."""
    samples = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        subprocess.run(list(argv), capture_output=True, env=env(), check=True)
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
