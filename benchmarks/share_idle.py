"""A sharing agent at rest: start -> joined, RSS after 3 s idle and SIGINT -> exit, for each way the
room reaches it.

Run alone: python benchmarks/share_idle.py [runs]

A hub started in this process (`start_hub(port=0)`, it speaks both generations) and the stand-in LLM
server, on 127.0.0.1. Each run is a real `python -m llmroom_cli join CODE --json --interval 1`
subprocess with bytecode cached (as an installed package runs): through the share relay (`--hub-api
v0.1`), publishing the server itself (`--hub-api v0.1 --direct`), and through the tunnel (no option:
our hub speaks both). VmRSS is read from /proc 3 s after the `joined` line; the first run of each
mode fills the bytecode cache and is dropped; medians of the rest.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _common import PY, cached_env

MODES = (
    ("share relay (v0.1)", ["--hub-api", "v0.1"]),
    ("--direct (v0.1)", ["--hub-api", "v0.1", "--direct"]),
    ("tunnel (v0.6)", []),
)
IDLE_S = 3.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(
    hub_url: str, room: str, endpoint: str, extra: list[str], i: int, prefix: str
) -> tuple[float, float, float]:
    """(start -> joined in s, RSS in MiB after IDLE_S, SIGINT -> exit in s) of one agent."""
    argv = [PY, "-m", "llmroom_cli", "join", room, "--hub", hub_url, "-e", endpoint]
    argv += ["--json", "--interval", "1", "--id", f"bench{i}", *extra]
    t0 = time.monotonic()
    out, quiet = subprocess.PIPE, subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=out, stderr=quiet, text=True, env=cached_env(prefix))
    assert proc.stdout is not None
    while json.loads(proc.stdout.readline())["event"] != "joined":
        pass
    took = time.monotonic() - t0
    time.sleep(IDLE_S)
    rss = rss_mib(proc.pid)
    t1 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    return took, rss, time.monotonic() - t1


def main() -> None:
    from llmroom_cli.hub import start_hub
    from llmroom_cli.standin import StandIn

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    tmp = tempfile.TemporaryDirectory(prefix="llmroom-pycache-")
    with tmp as prefix, start_hub(port=0, quiet=True) as hub, StandIn() as llm:
        for label, extra in MODES:
            got = [
                measure(hub.url, hub.state.create_room("b")["code"], llm.url, extra, i, prefix)
                for i in range(runs)
            ]
            start_s = statistics.median(g[0] for g in got[1:])
            rss = statistics.median(g[1] for g in got[1:])
            leave_s = statistics.median(g[2] for g in got[1:])
            took = f"start -> joined {start_s * 1000:6.0f} ms"
            print(
                f"{label:20s} {took}   idle RSS {rss:5.1f} MiB (target <= 35)"
                f"   SIGINT -> exit {leave_s * 1000:5.0f} ms"
            )


if __name__ == "__main__":
    main()
