"""Speed of spec detection: `detect_specs()` in process, in a fresh process, and `llmroom specs --json`.

Run alone: python benchmarks/specs_speed.py [runs]

Every figure is a median over `runs` (default 15) after 2 warm-ups, next to `python -c pass` measured in the
same run. Processes run twice: as this environment has them (PYTHONDONTWRITEBYTECODE=1 here, so every
module is compiled on each start) and with cached bytecode, as an installed package runs (the cache goes
to a temporary PYTHONPYCACHEPREFIX, not into the tree).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import PY, ROOT, env, row

DETECT = (
    "import time; t0 = time.perf_counter()\n"
    "from llmroom_cli.specs import detect_specs\n"
    "t1 = time.perf_counter(); d = detect_specs().data; t2 = time.perf_counter()\n"
    "import json, sys; json.dump({'import_s': t1 - t0, 'detect_s': t2 - t1, 'data': d}, sys.stdout)\n"
)
PRINT_JSON = "from llmroom_cli.specs import detect_specs; import json; print(json.dumps(detect_specs().data))"


def cached_env(prefix: str) -> dict[str, str]:
    e = env()
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPYCACHEPREFIX"] = prefix
    return e


def median_run(argv: list[str], e: dict[str, str], runs: int) -> tuple[float, int]:
    """Median wall time and the exit status of the last run (stdout and stderr to pipes)."""
    samples = []
    rc = 0
    for i in range(runs + 2):
        t = time.perf_counter()
        rc = subprocess.run(argv, capture_output=True, env=e, cwd=ROOT).returncode
        if i >= 2:
            samples.append(time.perf_counter() - t)
    return statistics.median(samples), rc


def inner(e: dict[str, str], runs: int) -> tuple[float, float, dict[str, object]]:
    """Median import and first-call detect time measured inside fresh processes."""
    imports, detects = [], []
    data: dict[str, object] = {}
    for _ in range(runs):
        out = subprocess.run([PY, "-c", DETECT], capture_output=True, text=True, env=e, cwd=ROOT, check=True)
        got = json.loads(out.stdout)
        imports.append(got["import_s"])
        detects.append(got["detect_s"])
        data = got["data"]
    return statistics.median(imports), statistics.median(detects), data


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    sys.path.insert(0, ROOT)
    from llmroom_cli.specs import detect_specs

    detect_specs()
    warm = []
    for _ in range(max(runs, 50)):
        t = time.perf_counter()
        detect_specs()
        warm.append(time.perf_counter() - t)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median of {runs} runs, 2 warm-ups")
    row("detect_specs() in process, warm", statistics.median(warm), "s", "budget", 0.050, "<= 0.050 s")

    with tempfile.TemporaryDirectory(prefix="llmroom-pycache-") as prefix:
        for label, e in (("no bytecode cache", env()), ("bytecode cached", cached_env(prefix))):
            print(f"-- processes, {label}")
            base, _ = median_run([PY, "-c", "pass"], e, runs)
            imp, det, data = inner(e, runs)
            row("import llmroom_cli.specs (in a fresh process)", imp, "s", "budget", 0.050)
            row("first detect_specs() (in a fresh process)", det, "s", "budget", 0.050, "<= 0.050 s")
            whole, _ = median_run([PY, "-c", PRINT_JSON], e, runs)
            row("python -c 'print(json.dumps(detect_specs()))'", whole, "s", "python -c pass", base)
            cli, rc = median_run([PY, "-m", "llmroom_cli", "specs", "--json"], e, runs)
            if rc == 0:
                row("llmroom specs --json", cli, "s", "python -c pass", base, "<= 0.35 s")
            else:
                print(f"llmroom specs --json: exit {rc} (command not available yet); not measured")
        print("specs:", json.dumps(data))


if __name__ == "__main__":
    main()
