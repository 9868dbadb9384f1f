"""The agent under hub faults: time to `reconnecting` and leave time against a trickling hub, and
memory after a 200 MiB (or gzip-bomb) answer to a heartbeat.

Run alone: python benchmarks/faults.py [--quick]
(LLMROOM_BENCH_ROOT=/path/to/other/checkout measures another checkout with the same script.)

Loopback only: the hostile hub is tests/hostile_hubs.HostileHub in this process (a thread), the LLM
server the stand-in. Agents are real `python -m llmroom_cli join --json` subprocesses.

- to reconnecting: the heartbeat route starts trickling (headers, then one byte every 0.1 s: faster
  than any per-read timeout); from the moment the trickled heartbeat arrived at the hub
  (perf_counter, this process) to the `reconnecting` line read on our side. Intervals 1 s and 2 s.
- leave time: SIGINT while both heartbeat and leave trickle (a heartbeat is in flight when the
  signal lands), and while only the heartbeat trickles (the leave is answered): signal -> exit.
  Bounded at 15 s (then killed, reported as > 15 s).
- memory: VmRSS and VmHWM (peak) of the agent before, and after three heartbeats answered with a
  200 MiB body (`huge`) or a 200 KiB gzip body that inflates to 200 MiB (`gzip-bomb`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time

from _common import PY, Proc, env, event, median, proc_stats

from llmroom_cli.standin import StandIn
from tests.hostile_hubs import HostileHub

ROOM = "ABC123"
BOUND_S = 15.0


def _agent(hub: HostileHub, llm: StandIn, interval: float, home: str) -> Proc:
    e = env()
    e["XDG_CONFIG_HOME"] = home
    argv = [PY, "-m", "llmroom_cli", "join", ROOM, "--hub", hub.url, "-e", llm.url, "--json", "--no-specs"]
    return Proc([*argv, "--interval", str(interval)], e)


def _peak_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def to_reconnecting(llm: StandIn, home: str, interval: float, runs: int) -> None:
    samples = []
    for _ in range(runs):
        with HostileHub(trickle_s=0.1) as hub:
            a = _agent(hub, llm, interval, home)
            try:
                a.wait_for(event("heartbeat"), 30)
                hub.faults["beat"] = "trickle"
                seen = len(hub.arrivals.get("beat", []))
                t, _ = a.wait_for(event("reconnecting"), BOUND_S + interval)
                arrived = hub.arrivals["beat"][seen]
                samples.append(t - arrived)
            except TimeoutError:
                samples.append(float("inf"))
            finally:
                a.close(signal.SIGKILL)
    shown = ", ".join(f"{s:.2f}" for s in samples)
    print(f"to reconnecting, interval {interval:g} s: median {median(samples):.2f} s [{shown}]", flush=True)


def leave_time(llm: StandIn, home: str, leave_trickles: bool, runs: int) -> None:
    samples = []
    codes = []
    for _ in range(runs):
        with HostileHub(trickle_s=0.1) as hub:
            a = _agent(hub, llm, 0.5, home)
            try:
                a.wait_for(event("heartbeat"), 30)
                hub.faults["beat"] = "trickle"
                if leave_trickles:
                    hub.faults["leave"] = "trickle"
                try:
                    a.wait_for(event("reconnecting"), BOUND_S)
                    n = len(hub.arrivals.get("beat", []))
                    until = time.perf_counter() + 5
                    while len(hub.arrivals.get("beat", [])) == n and time.perf_counter() < until:
                        time.sleep(0.005)  # the next beat is in flight
                except TimeoutError:
                    pass  # an agent that never says reconnecting: its trickled beat is in flight anyway
                t = time.perf_counter()
                a.proc.send_signal(signal.SIGINT)
                try:
                    a.proc.wait(BOUND_S)
                    samples.append(time.perf_counter() - t)
                except Exception:
                    samples.append(float("inf"))
                codes.append(a.proc.poll())
            finally:
                a.close(signal.SIGKILL)
    what = "heartbeat and leave trickle" if leave_trickles else "heartbeat trickles, leave answered"
    shown = ", ".join(f"{s:.2f}" if s != float("inf") else f">{BOUND_S:g}" for s in samples)
    print(f"SIGINT -> exit, {what}: median {median(samples):.2f} s [{shown}] exit codes {codes}", flush=True)


def memory(llm: StandIn, home: str, fault: str) -> None:
    with HostileHub() as hub:
        a = _agent(hub, llm, 0.3, home)
        try:
            a.wait_for(event("heartbeat", seq=3), 30)
            before = proc_stats(a.pid)["rss_mib"]
            hub.faults["beat"] = fault
            got = 0
            try:
                for _ in range(3):
                    a.wait_for(event("reconnecting"), 60)
                    got += 1
            except TimeoutError:
                pass
            stats = proc_stats(a.pid) if a.proc.poll() is None else {"rss_mib": float("nan")}
            peak = _peak_mib(a.pid) if a.proc.poll() is None else float("nan")
            sent = hub.sent_bytes / 2**20
            print(
                f"memory, 200 MiB answer ({fault}) to {got} heartbeats: VmRSS {before:.1f} -> "
                f"{stats['rss_mib']:.1f} MiB, peak {peak:.1f} MiB; body the hub got out: {sent:.1f} MiB;"
                f" still running: {a.proc.poll() is None}",
                flush=True,
            )
        finally:
            a.close(signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="reconnecting,leave,memory")
    args = parser.parse_args()
    runs = 2 if args.quick else 5
    only = set(args.only.split(","))
    with StandIn() as llm, tempfile.TemporaryDirectory() as home:
        print(f"# faults: {runs} runs each, python {sys.version.split()[0]}", flush=True)
        if "reconnecting" in only:
            for interval in (1.0, 2.0):
                to_reconnecting(llm, home, interval, runs)
        if "leave" in only:
            leave_time(llm, home, leave_trickles=True, runs=runs)
            leave_time(llm, home, leave_trickles=False, runs=runs)
        if "memory" in only:
            memory(llm, home, "huge")
            memory(llm, home, "gzip-bomb")


if __name__ == "__main__":
    main()
