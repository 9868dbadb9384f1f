"""The v0.6 tunnel agent against the fake reference hub: start -> tunnel connected, idle RSS, SIGINT -> exit,
and the overhead a request pays through the tunnel, each with the reference participant's figure
(gambi-v06-api.md section 8) as the ratio's base.

    python benchmarks/tunnel_agent.py [--quick]

The agent runs as its own process (this file with --child): it builds the httpx client, a V06Client and
a TunnelSession and calls run_tunnel_session, as `llmroom join` will. The CLI wiring is not part of this
branch, so the CLI's own start-up (typer, option parsing, the endpoint probe) is not in these figures.
Everything is on 127.0.0.1; loops are bounded in count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE = {"start_s": 0.162, "idle_rss_mib": 75.4, "sigint_s": 0.108}


class FakeLLM(BaseHTTPRequestHandler):
    """A fast local server: a fixed small chat completion."""

    protocol_version = "HTTP/1.1"
    # One write per answer and no Nagle: else delayed ACKs add ~40 ms to every keep-alive request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}).encode()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.ANSWER)))
        self.end_headers()
        self.wfile.write(self.ANSWER)

    def log_message(self, *args: Any) -> None:
        pass


def make_upstream(llm_url: str) -> Any:
    """An `open_upstream` over httpx (the relay core takes this place once merged)."""
    import httpx

    up = httpx.Client(trust_env=False, timeout=30.0)

    def open_upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        keep = {k: v for k, v in headers.items() if k.lower() in ("content-type", "accept")}
        resp = up.send(up.build_request(method, llm_url + path, headers=keep, content=body), stream=True)

        def chunks() -> Any:
            try:
                yield from resp.iter_raw()
            finally:
                resp.close()

        return resp.status_code, dict(resp.headers), chunks()

    return open_upstream


def child(hub_url: str, code: str, pid: str, llm_url: str, interval_s: float) -> int:
    from llmroom_cli.http import make_http
    from llmroom_cli.protocols.v06 import RelayHandler, TunnelSession, V06Client, run_tunnel_session
    from llmroom_cli.session import JoinPlan, capture_signals

    plan = JoinPlan(hub_url, code, pid, f"fake-model@{pid}", "fake-model", llm_url, interval_s=interval_s)

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    session = TunnelSession(
        V06Client(make_http(hub_url), hub_url), plan, RelayHandler(make_upstream(llm_url)), emit
    )
    wake = threading.Event()
    with capture_signals(wake, on_second=lambda: os._exit(130)):
        outcome = run_tunnel_session(session, wake)
    return 0 if outcome.error is None else 1


def spawn(
    hub_url: str, code: str, pid: str, llm_url: str, interval_s: float, pycache: str | None = None
) -> tuple[subprocess.Popen[str], float]:
    env = dict(os.environ, PYTHONPATH=ROOT, NO_PROXY="*")
    if pycache:  # bytecode cached, as an installed package runs (pip compiles on install)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    argv = [sys.executable, __file__, "--child", hub_url, code, pid, llm_url, str(interval_s)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "joined":
            return proc, time.perf_counter() - started
    raise RuntimeError(f"agent never joined: {proc.stderr.read() if proc.stderr else ''}")


def rss_mib(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["Threads"])


def main() -> None:
    import httpx

    from llmroom_cli.protocols.v06 import RelayHandler, TunnelSession, V06Client, run_tunnel_session
    from llmroom_cli.session import JoinPlan
    from tests.fake_gambi_v06 import FakeGambiV06

    quick = "--quick" in sys.argv
    runs = 5 if quick else 10
    llm = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=llm.serve_forever, daemon=True).start()
    llm_url = f"http://127.0.0.1:{llm.server_address[1]}"
    rows: list[tuple[str, str, str, str]] = []
    with FakeGambiV06(client_idle_timeout_s=None) as hub:
        code = hub.create_room("bench")
        starts, cached, exits, gone = [], [], [], 0
        pycache = tempfile.mkdtemp(prefix="llmroom-pyc-")
        spawn(hub.url, code, "warm", llm_url, 10.0, pycache)[0].send_signal(signal.SIGINT)  # fills the cache
        for i in range(runs):
            for where, cache in ((starts, None), (cached, pycache)):
                proc, start_s = spawn(hub.url, code, f"b{i}", llm_url, 10.0, cache)
                where.append(start_s)
                t = time.perf_counter()
                proc.send_signal(signal.SIGINT)
                rc = proc.wait(30)
                exits.append(time.perf_counter() - t)
                gone += rc == 0 and hub.participant(code, f"b{i}") is None
        shutil.rmtree(pycache, ignore_errors=True)

        # Same-run baselines: the interpreter, and the two libraries any tunnel agent in Python needs.
        def once(code_s: str) -> float:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code_s], check=True)
            return time.perf_counter() - t

        bare = statistics.median(once("pass") for _ in range(runs))
        libs = statistics.median(once("import httpx, websockets.sync.client") for _ in range(runs))
        rows.append(
            ("  baseline: python -c pass / import httpx + websockets", f"{bare:.3f} s / {libs:.3f} s", "", "")
        )
        for label, values in (("as is", starts), ("bytecode cached", cached)):
            med = statistics.median(values)
            rows.append(
                (
                    f"start -> tunnel connected, {label} (median)",
                    f"{med:.3f} s",
                    f"{REFERENCE['start_s']} s",
                    f"x{med / REFERENCE['start_s']:.2f} (target <= 0.16 s)",
                )
            )
        runs *= 2
        med = statistics.median(exits)
        rows.append(
            (
                "SIGINT -> exit, leave confirmed (median)",
                f"{med:.3f} s ({gone}/{runs} gone, exit 0)",
                f"{REFERENCE['sigint_s']} s",
                f"x{med / REFERENCE['sigint_s']:.2f} (target <= 0.1 s)",
            )
        )

        frozen = []
        for i in range(3):
            proc, _ = spawn(hub.url, code, f"f{i}", llm_url, 10.0)
            hub.freeze()
            t = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            frozen.append(time.perf_counter() - t)
            hub.unfreeze()
        rows.append(
            (
                "SIGINT -> exit, hub frozen (worst of 3)",
                f"{max(frozen):.3f} s",
                "reference: never notices",
                "target <= 3 s",
            )
        )

        idle_s = 3.0 if quick else 12.0
        proc, _ = spawn(hub.url, code, "idle", llm_url, 1.0)
        samples = []
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            samples.append(rss_mib(proc.pid))
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        steady = statistics.median(m for m, _ in samples[len(samples) // 2 :])
        threads = samples[-1][1]
        rows.append(
            (
                f"RSS idle ({idle_s:.0f} s, 1 s interval), median of 2nd half",
                f"{steady:.1f} MiB, {threads} threads",
                f"{REFERENCE['idle_rss_mib']} MiB",
                f"x{steady / REFERENCE['idle_rss_mib']:.2f} (target <= 0.5x)",
            )
        )

        # Overhead: the same small request direct to the local server and through hub + tunnel + agent.
        # The agent runs in this process so its own share (tunnel.request in -> end queued) can be timed.
        agent_s: list[float] = []
        relay = RelayHandler(make_upstream(llm_url))

        def timed(request: dict[str, Any], send: Any) -> None:
            t = time.perf_counter()
            relay(request, send)
            agent_s.append(time.perf_counter() - t)

        plan = JoinPlan(hub.url, code, "ovh", "ovh", "fake-model", llm_url, interval_s=10.0)
        session = TunnelSession(
            V06Client(httpx.Client(trust_env=False), hub.url), plan, timed, lambda e: None
        )
        wake = threading.Event()
        runner = threading.Thread(target=run_tunnel_session, args=(session, wake), daemon=True)
        runner.start()
        hub.wait_for(lambda: (hub.participant(code, "ovh") or {}).get("status") == "online", "online")
        body = {"model": "ovh", "messages": [{"role": "user", "content": "hi"}]}
        n = 100 if quick else 300
        with httpx.Client(trust_env=False, timeout=30.0) as c:
            direct, tunnel = [], []
            for _ in range(20):  # warm both paths
                c.post(llm_url + "/v1/chat/completions", json=body)
                c.post(f"{hub.url}/rooms/{code}/v1/chat/completions", json=body)
            agent_s.clear()
            for _ in range(n):
                t = time.perf_counter()
                c.post(llm_url + "/v1/chat/completions", json=body).raise_for_status()
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                c.post(f"{hub.url}/rooms/{code}/v1/chat/completions", json=body).raise_for_status()
                tunnel.append(time.perf_counter() - t)
        wake.set()
        runner.join(10)
        d, tn, a = (statistics.median(x) * 1000 for x in (direct, tunnel, agent_s))
        rows.append(
            (
                "request through fake hub + tunnel vs direct, p50",
                f"{tn:.2f} ms vs {d:.2f} ms",
                f"+{tn - d:.2f} ms",
                "(includes the fake hub's own aiohttp work)",
            )
        )
        rows.append(
            (
                "  of which the agent: tunnel.request -> end queued, p50",
                f"{a:.2f} ms",
                f"+{a - d:.2f} ms over direct",
                "target: overhead p50 <= 2 ms",
            )
        )
    llm.shutdown()
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}} | {r[1]} | ref {r[2]} | {r[3]}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        hub_url, code, pid, llm_url, interval = sys.argv[2:7]
        sys.exit(child(hub_url, code, pid, llm_url, float(interval)))
    main()
