"""A joined agent (`llmroom join CODE --json`): start-up, memory, CPU, leaving, schedule, soak.

Run alone: python benchmarks/join_agent.py [--quick] [--only start,beats,leave,schedule,soak]

Everything talks to 127.0.0.1 only: a hub started in this process (`start_hub(port=0)`) and the
stand-in LLM server (`StandIn`). Agents are real `python -m llmroom_cli join` subprocesses with stdout
on a pipe, an explicit `--id` and `--nickname`, and XDG_CONFIG_HOME in a temporary directory.

- start -> joined: from Popen to the `joined` JSON line read on our side; baselines `python -c pass` and
  `python -c "import httpx"` (start to exit), all in this run.
- after 200 beats at 0.01 s: VmRSS and utime+stime (/proc/PID) of the agent, next to a bare loop
  (`http.client`, keep-alive, same join body, same schedule, JSON line per beat) against the same hub.
- SIGINT -> exit: from the signal to the process's exit, with `left confirmed` printed and the hub's
  room empty; baseline one keep-alive loopback round trip (GET /health) measured here. Frozen hub:
  `hub.fault = "freeze"`, both with a heartbeat held by the hub when the signal lands and idle.
- schedule: measured in process, because `ts` in the events is wall-clock milliseconds and is stamped
  after the round trip. A `Session` (the product's) runs against the hub through a HubClient subclass
  that records time.monotonic() as each heartbeat leaves; each send is matched to its deadline
  joined_at + k * interval (k by rounding); lateness = send - deadline.
- soak: one agent, beats at 0.01 s; RSS, fds and threads at beat 1, 100, every 10 % and at the end.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from _common import PY, ROOT, Proc, cached_env, env, event, median, proc_stats, row

BARE_LOOP = r"""
import http.client, json, sys, time
port, code, pid = int(sys.argv[1]), sys.argv[2], sys.argv[3]
interval, beats = float(sys.argv[4]), int(sys.argv[5])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
def call(method, path, body):
    conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    return json.loads(conn.getresponse().read())
body = {"id": pid, "nickname": "bare", "model": "llmroom-demo:latest", "endpoint": "http://127.0.0.1:9"}
call("POST", f"/rooms/{code}/join", body)
start = time.monotonic()
print(json.dumps({"event": "joined"}), flush=True)
for seq in range(1, beats + 1):
    time.sleep(max(0.0, start + seq * interval - time.monotonic()))
    t = time.monotonic()
    call("POST", f"/rooms/{code}/health", {"id": pid})
    print(json.dumps({"event": "heartbeat", "seq": seq, "rtt_ms": (time.monotonic() - t) * 1000}), flush=True)
sys.stdin.read()  # hold still until the benchmark has read /proc and closes stdin
"""


class Rig:
    """The hub and the stand-in LLM server, in this process, and a room."""

    def __init__(self) -> None:
        sys.path.insert(0, ROOT)
        from llmroom_cli.hub import start_hub
        from llmroom_cli.standin import StandIn

        self.hub = start_hub(port=0, test_hooks=True)
        self.llm = StandIn()
        self.code: str = self.hub.state.create_room("bench")["code"]
        self.cfg = tempfile.TemporaryDirectory(prefix="llmroom-bench-cfg-")
        self.n = 0

    def agent(
        self, interval_s: float, environ: dict[str, str] | None = None, python: str = PY
    ) -> tuple[Proc, str]:
        self.n += 1
        pid = f"bench-{self.n}"
        e = dict(environ or env(), XDG_CONFIG_HOME=self.cfg.name)
        argv = [python, "-m", "llmroom_cli", "join", self.code, "--hub", self.hub.url, "-e", self.llm.url]
        argv += ["--json", "--interval", str(interval_s), "--id", pid, "--nickname", "bench"]
        argv += ["--hub-api", "v0.1"]  # the v0.1 agent, as the bare loop is (our hub speaks both)
        return Proc(argv, e), pid

    def bare(self, interval_s: float, beats: int) -> tuple[Proc, str]:
        self.n += 1
        pid = f"bare-{self.n}"
        argv = [PY, "-c", BARE_LOOP, str(self.hub.port), self.code, pid, str(interval_s), str(beats)]
        return Proc(argv, stdin=True), pid

    def ids(self) -> set[str]:
        return {p["id"] for p in self.hub.state.participants(self.code)}

    def close(self) -> None:
        self.hub.fault = None
        self.hub.stop()
        self.llm.stop()
        self.cfg.cleanup()


def rtt_s(rig: Rig, n: int = 200) -> float:
    """Median keep-alive loopback round trip (GET /health) to the same hub."""
    conn = http.client.HTTPConnection("127.0.0.1", rig.hub.port, timeout=5)
    samples = []
    for i in range(n + 20):
        t = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        if i >= 20:
            samples.append(time.perf_counter() - t)
    conn.close()
    return statistics.median(samples)


# -- start -> joined ----------------------------------------------------------------------------------


def bench_start(rig: Rig, runs: int) -> None:
    print(f"-- start -> joined (median of {runs}; baselines: start to exit, same run)")
    with tempfile.TemporaryDirectory(prefix="llmroom-pycache-") as prefix:
        for label, e in (("no bytecode cache", env()), ("bytecode cached", cached_env(prefix))):
            samples = []
            for i in range(runs + 1):
                agent, _ = rig.agent(10.0, e)
                try:
                    t, _ = agent.wait_for(event("joined"), 20)
                    if i:  # the first run fills the bytecode cache
                        samples.append(t - agent.started)
                finally:
                    agent.close()
            joined = median(samples)
            base = _time(["-c", "pass"], e, runs)
            httpx = _time(["-c", "import httpx"], e, runs)
            row(f"start -> joined ({label})", joined, "s", "python -c pass", base, "<= 0.25 s")
            row(f"start -> joined ({label})", joined, "s", "python -c 'import httpx'", httpx, "<= 0.25 s")


def _time(args: list[str], e: dict[str, str], runs: int) -> float:
    import subprocess

    samples = []
    for i in range(runs + 2):
        t = time.perf_counter()
        subprocess.run([PY, *args], capture_output=True, env=e, check=True)
        if i >= 2:
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


# -- 200 beats: RSS and CPU -------------------------------------------------------------------------------


def bench_beats(rig: Rig, runs: int, beats: int = 200, interval_s: float = 0.01) -> None:
    print(f"-- after {beats} beats at {interval_s} s (median of {runs}; start-up included in CPU)")
    got: dict[str, list[dict[str, float]]] = {"agent": [], "bare": []}
    for _ in range(runs):
        for kind in ("agent", "bare"):
            proc, _ = rig.agent(interval_s) if kind == "agent" else rig.bare(interval_s, beats)
            try:
                proc.wait_for(event("heartbeat", seq=beats), 10 + beats * interval_s * 5)
                got[kind].append(proc_stats(proc.pid))
            finally:
                proc.close()
    a = {k: median([s[k] for s in got["agent"]]) for k in ("rss_mib", "cpu_s")}
    b = {k: median([s[k] for s in got["bare"]]) for k in ("rss_mib", "cpu_s")}
    row(f"RSS after {beats} beats", a["rss_mib"], "MiB", "bare http.client loop", b["rss_mib"], "<= 35 MiB")
    row(
        f"CPU per beat, start-up incl., {beats} beats",
        a["cpu_s"] * 1000 / beats,
        "ms",
        "bare http.client loop",
        b["cpu_s"] * 1000 / beats,
        "<= 3 ms",
    )
    print(f"   (total CPU: agent {a['cpu_s']:.2f} s, bare loop {b['cpu_s']:.2f} s; /proc ticks are 10 ms)")


# -- SIGINT -> exit ---------------------------------------------------------------------------------------


def _leave_once(rig: Rig, frozen: str | None) -> tuple[float, bool, bool]:
    """(signal -> exit seconds, `left confirmed` printed, our id gone from the hub)."""
    agent, pid = rig.agent(0.5 if frozen is None else 1.0)
    try:
        agent.wait_for(event("heartbeat", seq=2 if frozen is None else 1), 20)
        if frozen:
            rig.hub.fault = "freeze"
            if frozen == "in flight":  # wait until the hub holds our next heartbeat
                deadline = time.perf_counter() + 3
                while rig.hub.frozen_requests() < 1 and time.perf_counter() < deadline:
                    time.sleep(0.002)
        t = time.perf_counter()
        agent.proc.send_signal(signal.SIGINT)
        agent.proc.wait(10)
        took = time.perf_counter() - t
        rest = agent.drain()
        confirmed = any(isinstance(x, dict) and x.get("event") == "left" and x.get("confirmed") for x in rest)
    finally:
        rig.hub.fault = None
        agent.close()
    gone = pid not in rig.ids()
    if not gone:
        rig.hub.state.forget_participant(rig.code, pid)
    return took, confirmed, gone


def bench_leave(rig: Rig, runs: int) -> None:
    print(f"-- SIGINT -> process exit (median of {runs}; frozen: worst of {max(2, runs // 2)})")
    base = rtt_s(rig) * 1000
    outs = [_leave_once(rig, None) for _ in range(runs)]
    ok = sum(1 for _, c, g in outs if c and g)
    took = median([o[0] for o in outs]) * 1000
    row("SIGINT -> exit, leave confirmed", took, "ms", "loopback round trip", base, "<= 100 ms")
    print(
        f"   leave confirmed and gone from the hub in {ok}/{runs} runs; max {max(o[0] for o in outs):.3f} s"
    )
    for mode in ("in flight", "idle"):
        fro = [_leave_once(rig, mode) for _ in range(max(2, runs // 2))]
        row(
            f"SIGINT -> exit, hub frozen ({mode})",
            max(o[0] for o in fro) * 1000,
            "ms",
            "loopback round trip",
            base,
            "<= 3000 ms",
        )
        print(f"   (confirmed: {sum(1 for o in fro if o[1])}/{len(fro)}, expected 0: the hub never answers)")


# -- schedule accuracy ------------------------------------------------------------------------------------


def bench_schedule(rig: Rig, beats: int, interval_s: float = 0.05) -> None:
    print(f"-- schedule: {beats} beats at {interval_s} s, in process, send times vs ideal deadlines")
    from llmroom_cli.client import HubClient
    from llmroom_cli.http import make_http
    from llmroom_cli.session import JoinPlan, Session

    sent: list[float] = []

    class Recording(HubClient):
        def heartbeat(self, code: str, participant_id: str, timeout_s: float | None = None) -> None:
            sent.append(time.monotonic())
            super().heartbeat(code, participant_id, timeout_s)

    events: list[dict[str, Any]] = []
    client = Recording(make_http(rig.hub.url), rig.hub.url)
    plan = JoinPlan(
        rig.hub.url, rig.code, "bench-schedule", "bench", "m", "http://127.0.0.1:9", interval_s=interval_s
    )
    session = Session(client, plan, events.append)
    session.join()
    worker = threading.Thread(target=session.heartbeat_loop, daemon=True)
    worker.start()
    deadline = time.monotonic() + beats * interval_s * 1.5 + 10
    while len(sent) < beats and time.monotonic() < deadline:
        time.sleep(0.05)
    session.stop.set()
    worker.join(5)
    session.leave()
    client.http.close()
    assert session.status.joined_at is not None
    start = session.status.joined_at
    sent = sent[:beats]
    ks = [round((t - start) / interval_s) for t in sent]
    late_ms = [(t - (start + k * interval_s)) * 1000 for t, k in zip(sent, ks, strict=True)]
    absl = sorted(abs(x) for x in late_ms)
    n = len(late_ms)
    med = statistics.median(absl)
    row(
        f"beat lateness, median |send - deadline|, {n}",
        med,
        "ms",
        "ideal deadline (interval)",
        interval_s * 1000,
    )
    print(f"   = {med / (interval_s * 10):.2f} % of the interval (target <= 1 %)")
    print(
        f"   p90 {absl[int(n * 0.9)]:.3f} ms, p99 {absl[min(n - 1, int(n * 0.99))]:.3f} ms,"
        f" max {absl[-1]:.3f} ms; within 1 %: {sum(1 for x in absl if x <= interval_s * 10)}/{n}"
    )
    tenth = max(1, n // 10)
    first, last = statistics.median(late_ms[:tenth]), statistics.median(late_ms[-tenth:])
    slope = statistics.linear_regression(list(range(n)), late_ms).slope if n > 2 else 0.0
    print(
        f"   drift: median lateness first {tenth} beats {first:.3f} ms, last {tenth} {last:.3f} ms;"
        f" slope {slope * 1000:.4f} ms per 1000 beats; deadline index of beat {n}: {ks[-1] if ks else 0}"
        f" ({(ks[-1] if ks else 0) - n} deadlines skipped);"
        f" heartbeat events {sum(1 for e in events if e['event'] == 'heartbeat')}"
    )


# -- soak ---------------------------------------------------------------------------------------------------


def bench_soak(rig: Rig, beats: int, interval_s: float = 0.01) -> None:
    print(f"-- soak: one agent, {beats} beats at {interval_s} s")
    agent, _ = rig.agent(interval_s)
    marks = sorted({1, 100, *(beats * i // 10 for i in range(1, 11))})
    samples: list[tuple[int, dict[str, float]]] = []
    t0 = time.perf_counter()
    try:
        for m in marks:
            agent.wait_for(event("heartbeat", seq=m), 30 + beats * interval_s * 3)
            samples.append((m, proc_stats(agent.pid)))
    finally:
        agent.close()
    took = time.perf_counter() - t0
    trouble = sum(1 for _, x in agent.seen if isinstance(x, dict) and x.get("event") == "reconnecting")
    for m, s in samples:
        print(
            f"   beat {m:6d}: RSS {s['rss_mib']:6.2f} MiB  fds {s['fds']:3.0f}"
            f"  threads {s['threads']:3.0f}  CPU {s['cpu_s']:6.2f} s"
        )
    first, warm, end = samples[0][1], samples[1][1], samples[-1][1]
    row(
        f"soak RSS growth, beat 1 -> {beats}",
        end["rss_mib"] - first["rss_mib"],
        "MiB",
        "RSS at beat 1",
        first["rss_mib"],
        "<= 1 MiB",
    )
    row(
        f"soak RSS growth, beat 100 -> {beats}",
        end["rss_mib"] - warm["rss_mib"],
        "MiB",
        "RSS at beat 100",
        warm["rss_mib"],
        "<= 1 MiB",
    )
    row(f"soak open fds at beat {beats}", end["fds"], "fds", "fds at beat 1", first["fds"], "constant")
    row(
        f"soak threads at beat {beats}",
        end["threads"],
        "thr",
        "threads at beat 1",
        first["threads"],
        "constant",
    )
    print(
        f"   {took:.1f} s wall; reconnecting events: {trouble};"
        f" CPU per beat {end['cpu_s'] * 1000 / beats:.3f} ms"
    )


STEPS = ("start", "beats", "leave", "schedule", "soak")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs, 200 schedule beats, 1,000 soak beats"
    )
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated: " + ", ".join(STEPS))
    args = parser.parse_args()
    wanted = args.only.split(",")
    runs = 3 if args.quick else 7
    print(f"# join_agent: python {sys.version.split()[0]}, {'quick' if args.quick else 'full'} run")
    rig = Rig()
    try:
        if "start" in wanted:
            bench_start(rig, runs)
        if "beats" in wanted:
            bench_beats(rig, 2 if args.quick else 3)
        if "leave" in wanted:
            bench_leave(rig, runs)
        if "schedule" in wanted:
            bench_schedule(rig, 200 if args.quick else 1000)
        if "soak" in wanted:
            bench_soak(rig, 1000 if args.quick else 10000)
    finally:
        rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
