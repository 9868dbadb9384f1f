"""Every benchmark, one after the other, each in its own process with a time limit.

Run: python benchmarks/run_all.py [--quick] [--only startup,join_agent,...]

Full: about 8 minutes on 2 cores (the soak alone is 10,000 beats at 0.01 s). --quick: about 2 minutes,
with fewer runs, 200 schedule beats, a 1,000-beat soak and 1 s load rounds; its figures are for a
quick check, the full run's go into RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from _common import PY, env

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (full arguments, quick arguments, time limit in seconds)
SCRIPTS: dict[str, tuple[list[str], list[str], float]] = {
    "startup": ([], ["5"], 120),
    "specs_speed": ([], ["5"], 180),
    "join_agent": ([], ["--quick"], 420),
    "list_big": ([], ["--quick"], 300),
    "hub_big": ([], ["--seconds", "1", "--rounds", "1"], 180),
    "hub_load": ([], ["--seconds", "1"], 180),
    "typer_compare": ([], ["--runs", "5"], 240),
    "faults": ([], ["--quick"], 300),
    "relay_overhead": (["--llama"], ["--quick"], 300),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(SCRIPTS))
    args = parser.parse_args()
    failed = []
    t0 = time.perf_counter()
    for name in args.only.split(","):
        full, quick, limit = SCRIPTS[name]
        print(f"\n## {name}.py {' '.join(quick if args.quick else full)}", flush=True)
        t = time.perf_counter()
        cmd = [PY, os.path.join(HERE, f"{name}.py"), *(quick if args.quick else full)]
        # Its own process group, so that a script past its limit goes with the servers and agents it
        # started (its finally blocks do not run when it is killed).
        proc = subprocess.Popen(cmd, env=env(), start_new_session=True)
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            rc = 124
        print(f"## {name}: exit {rc}, {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"\n## all done in {time.perf_counter() - t0:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
