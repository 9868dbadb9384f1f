"""`serve` holding 10,000 participants: health checks at 8 keep-alive connections, next to 10 participants.

Run alone: python benchmarks/hub_big.py [--seconds 3] [--participants 10000]

Reuses hub_load.py's machinery: each hub is `llmroom_cli.hub.serve(..., quiet=True)` in its own
process (what `llmroom serve -q` runs), and the load is `POST /rooms/CODE/health` from several client
processes, closed loop, non-blocking sockets (see hub_load.py). The big room is filled through the HTTP
API (`POST /rooms/CODE/join` on one keep-alive connection) with join bodies shaped like the CLI's, so
the hub holds what it would; the small room, the baseline, gets 10 participants the same way. Both
hubs are measured in the same run, alternately, twice each; the figures are the medians.
The health checks name one participant (`bench`), as one agent does; with 30 s without a check,
the others are swept offline during the run, as idle participants would be.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time

from _common import row
from hub_load import Result, run_load, start_hub_process
from list_big import body


def fill(port: int, room: str, n: int) -> float:
    """Join n participants (besides `bench`) over one keep-alive connection; returns seconds taken."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t = time.perf_counter()
    for i in range(n):
        conn.request("POST", f"/rooms/{room}/join", json.dumps(body(i)), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 201), resp.status
    conn.close()
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per hub, alternating")
    args = parser.parse_args()
    print(f"# hub_big: {os.cpu_count()} CPUs, {args.procs} client processes, 8 keep-alive connections")
    hubs = {}
    try:
        for label, n in (("10 participants", 10), (f"{args.participants} participants", args.participants)):
            proc, port, room = start_hub_process()
            hubs[label] = (proc, port, room)
            took = fill(port, room, n - 1)
            print(f"   {label}: joined over HTTP in {took:.1f} s")
        got: dict[str, list[Result]] = {label: [] for label in hubs}
        for _ in range(args.rounds):
            for label, (proc, port, room) in hubs.items():
                r = run_load(port, room, 8, False, args.seconds, args.procs, proc.pid)
                got[label].append(r)
                print(
                    f"   {label:22} {r.rps:9.0f} req/s  p50 {r.p50:6.2f} ms  p99 {r.p99:6.2f} ms"
                    f"  server CPU {r.cpu_us:4.0f} us/req  errors {r.errors}",
                    flush=True,
                )
        small, big = (got[label] for label in hubs)

        def med(rs: list[Result], attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in rs)

        big_label = f"serve, {args.participants} participants"
        row(
            f"{big_label}: req/s",
            med(big, "rps"),
            "r/s",
            "serve, 10 participants",
            med(small, "rps"),
            ">= 1000",
        )
        row(
            f"{big_label}: p99",
            med(big, "p99"),
            "ms",
            "serve, 10 participants",
            med(small, "p99"),
            "<= 20 ms",
        )
        row(f"{big_label}: CPU/req", med(big, "cpu_us"), "us", "serve, 10 participants", med(small, "cpu_us"))
    finally:
        for proc, _, _ in hubs.values():
            proc.terminate()
            try:
                proc.wait(10)
            except Exception:
                proc.kill()
                proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
