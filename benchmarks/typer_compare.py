"""typer 0.29 against the pinned typer 0.28: start-up of `--help` and `specs --json`, RSS of `join`.

Run alone: python benchmarks/typer_compare.py [--venv /tmp/llmroom-typer029] [--runs 15]

The other interpreter is a scratch venv with typer==0.29.2 and the project's runtime dependencies;
create it with (it is skipped, with this hint, when absent):

    python -m venv /tmp/llmroom-typer029
    /tmp/llmroom-typer029/bin/pip install typer==0.29.2 'httpx>=0.27,<1' rich psutil nvidia-ml-py zeroconf

Both interpreters import llmroom_cli from this checkout (PYTHONPATH), and run in the same session,
alternating, so the machine's noise hits both. RSS is the agent's VmRSS after 20 beats at 0.05 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _common import PY, env, event, median, proc_stats, row, time_cmd
from join_agent import Rig


def version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import typer; print(typer.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip()


def pydantic_loaded(python: str, args: list[str]) -> bool:
    out = subprocess.run(
        [python, "-X", "importtime", "-m", "llmroom_cli", *args], capture_output=True, env=env()
    )
    return b"pydantic" in out.stderr


def join_rss(rig: Rig, python: str, runs: int) -> float:
    samples = []
    for _ in range(runs):
        agent, _ = rig.agent(0.05, python=python)
        try:
            agent.wait_for(event("heartbeat", seq=20), 30)
            samples.append(proc_stats(agent.pid)["rss_mib"])
        finally:
            agent.close()
    return median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--venv", default="/tmp/llmroom-typer029")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    other = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(other):
        print(f"typer_compare: skipped, no venv at {args.venv} (see this script's docstring)")
        return 0
    pythons = {f"typer {version(PY)}": PY, f"typer {version(other)}": other}
    (old, new), (old_py, new_py) = pythons.keys(), pythons.values()
    print(f"# typer_compare: {old} (pinned) vs {new}, median of {args.runs} runs, stdout not a terminal")
    for label, argv in (("--help", ["--help"]), ("specs --json", ["specs", "--json"])):
        t_old = time_cmd([old_py, "-m", "llmroom_cli", *argv], args.runs)
        t_new = time_cmd([new_py, "-m", "llmroom_cli", *argv], args.runs)
        row(f"llmroom {label}, {new}", t_new, "s", old, t_old)
        loaded = [pydantic_loaded(py, argv) for py in (old_py, new_py)]
        print(f"   pydantic imported: {old} {loaded[0]}, {new} {loaded[1]}")
    rig = Rig()
    try:
        runs = max(3, args.runs // 5)
        r_old = join_rss(rig, old_py, runs)
        r_new = join_rss(rig, new_py, runs)
    finally:
        rig.close()
    row(f"join RSS after 20 beats, {new}", r_new, "MiB", old, r_old, "<= 35 MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
