"""Load on the embedded hub's hot path: participant health checks (`POST /rooms/CODE/health`).

Runs alone: `python benchmarks/hub_load.py [--seconds 3]`. Each server runs in its own process:
`llmroom_cli.hub.serve` (quiet), and two baselines measured in the same run:

- `stdlib`: `http.server.ThreadingHTTPServer` + `BaseHTTPRequestHandler` with HTTP/1.1 (so keep-alive
  works at all) and logging off, reading the body and answering the same `{"success":true}` JSON;
  otherwise untuned (headers and body leave in two writes, Nagle on).
- `stdlib+nodelay`: the same with TCP_NODELAY, the one tuning anyone would add first.

The load comes from several client processes (one Python client saturates at a few thousand req/s),
each driving its share of the connections with non-blocking sockets and a selector, closed loop (the
next request leaves when the answer is in). Scenarios: 8 and 64 keep-alive connections, and 8
concurrent clients with `Connection: close` (a new TCP connection per request).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"id":"bench"}'


# -- servers --------------------------------------------------------------------------------------


def _baseline_server(port: int, nodelay: bool) -> None:
    answer = b'{"success":true}'

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def setup(self) -> None:
            super().setup()
            if nodelay:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    print("ready", file=sys.stderr, flush=True)
    httpd.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the start line: wait for it, never a fixed sleep
    if not line:
        raise SystemExit(f"server did not start: {cmd}")
    return proc


def _call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def start_hub_process() -> tuple[subprocess.Popen[str], int, str]:
    port = _free_port()
    code = f"from llmroom_cli.hub import serve; serve('127.0.0.1', {port}, 30.0, True)"
    proc = _start([sys.executable, "-c", code])
    room = _call(port, "POST", "/rooms", {"name": "bench"})["room"]["code"]
    member = {"id": "bench", "nickname": "bench", "model": "m", "endpoint": "http://127.0.0.1:9"}
    _call(port, "POST", f"/rooms/{room}/join", member)
    return proc, port, room


def start_baseline_process(nodelay: bool) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    cmd = [sys.executable, __file__, "--baseline-server", str(port)] + (["--nodelay"] if nodelay else [])
    return _start(cmd), port


# -- load -----------------------------------------------------------------------------------------


def _request(room: str, close: bool) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return (
        b"POST /rooms/%s/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (room.encode(), extra, len(BODY), BODY)
    )


def _complete(buf: bytes) -> int:
    """Length of the first complete response in buf (Content-Length framed), or 0."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = buf[:end].lower()
    i = head.find(b"content-length:")
    length = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
    total = end + 4 + length
    return total if len(buf) >= total else 0


def _worker(
    port: int, request: bytes, conns: int, close: bool, start_at: float, measure_from: float, stop_at: float
) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    lat: list[float] = []
    errors = done = 0
    state: dict[socket.socket, list[Any]] = {}  # sock -> [buffer, sent_at, connected]

    def open_one() -> None:
        # Non-blocking connect: a server with a short listen backlog stalls its own clients only.
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        state[s] = [b"", time.perf_counter(), False]
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE)

    def send(s: socket.socket) -> None:
        state[s][1] = time.perf_counter()
        s.send(request)  # tiny: always fits the send buffer

    while time.perf_counter() < start_at:
        time.sleep(0.001)
    for _ in range(conns):
        open_one()
    while time.perf_counter() < stop_at:
        for key, _ in sel.select(timeout=0.1):
            s: socket.socket = key.fileobj  # type: ignore[assignment]
            st = state[s]
            if not st[2]:  # connected (or failed): the clock for this request started at connect()
                st[2] = True
                sel.modify(s, selectors.EVENT_READ)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    s.send(request)
                continue
            try:
                data = s.recv(65536)
            except ConnectionError:
                data = b""
            st[0] += data
            n = _complete(st[0])
            if n:
                now = time.perf_counter()
                done += 1
                if not st[0].startswith(b"HTTP/1.1 200"):
                    errors += 1
                elif now >= measure_from:  # answers during the warm-up are not counted
                    lat.append((now - st[1]) * 1000)
                st[0] = st[0][n:]
                if close:
                    sel.unregister(s)
                    s.close()
                    del state[s]
                    if now < stop_at:
                        open_one()
                elif now < stop_at:
                    send(s)
            elif not data:
                errors += 1
                sel.unregister(s)
                s.close()
                del state[s]
                if time.perf_counter() < stop_at:
                    open_one()
    for s in state:
        s.close()
    return {"lat": lat, "errors": errors, "done": done}


@dataclass
class Result:
    rps: float
    p50: float
    p99: float
    errors: int
    cpu_us: float  # server CPU time (user + system, all threads) per answered request


def _cpu_s(pid: int) -> float:
    import importlib

    psutil: Any = importlib.import_module("psutil")  # a project dependency; no stubs needed
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def run_load(port: int, room: str, conns: int, close: bool, seconds: float, procs: int, pid: int) -> Result:
    request = _request(room, close)
    cpu_before = _cpu_s(pid)
    warmup = 0.3
    start_at = time.perf_counter() + 0.5  # let every process reach the line together
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    shares = [s for s in shares if s]
    measure_from = start_at + warmup
    with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(len(shares)) as pool:
        jobs = [
            pool.apply_async(
                _worker, (port, request, n, close, start_at, measure_from, measure_from + seconds)
            )
            for n in shares
        ]
        outs = [j.get(timeout=seconds + 60) for j in jobs]
    cpu_us = (_cpu_s(pid) - cpu_before) * 1e6 / max(1, sum(o["done"] for o in outs))
    measured = sorted(x for o in outs for x in o["lat"])
    n = len(measured)
    if n == 0:
        return Result(0.0, float("nan"), float("nan"), sum(o["errors"] for o in outs), cpu_us)
    return Result(
        rps=n / seconds,
        p50=measured[n // 2],
        p99=measured[min(n - 1, int(n * 0.99))],
        errors=sum(o["errors"] for o in outs),
        cpu_us=cpu_us,
    )


SCENARIOS = [("8 keep-alive", 8, False), ("64 keep-alive", 64, False), ("Connection: close x8", 8, True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per scenario")
    parser.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2), help="client processes")
    parser.add_argument(
        "--servers", default="hub,stdlib,stdlib+nodelay", help="comma-separated: hub, stdlib, stdlib+nodelay"
    )
    parser.add_argument("--baseline-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nodelay", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        _baseline_server(args.baseline_server, args.nodelay)
        return 0

    print(
        f"# hub_load: {os.cpu_count()} CPUs, {args.procs} client processes, {args.seconds:.0f} s per scenario"
    )
    servers: dict[str, tuple[subprocess.Popen[str], int, str]] = {}
    try:
        wanted = args.servers.split(",")
        hub, port, room = start_hub_process()
        servers["llmroom hub"] = (hub, port, room)
        for name, nodelay in (("stdlib", False), ("stdlib+nodelay", True)):
            if name in wanted:
                proc, bport = start_baseline_process(nodelay)
                servers[name] = (proc, bport, room)
        rows: list[tuple[str, str, Result]] = []
        for label, conns, close in SCENARIOS:
            for name, (sproc, sport, sroom) in servers.items():
                r = run_load(sport, sroom, conns, close, args.seconds, args.procs, sproc.pid)
                rows.append((label, name, r))
                print(
                    f"{label:22} {name:15} {r.rps:9.0f} req/s  p50 {r.p50:7.2f} ms  p99 {r.p99:7.2f} ms"
                    f"  server CPU {r.cpu_us:5.0f} us/req  errors {r.errors}",
                    flush=True,
                )
        print()
        print(
            "| scenario | server | req/s | p50 ms | p99 ms | server CPU us/req | req/s vs stdlib"
            " | req/s vs stdlib+nodelay |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, _, _ in SCENARIOS:
            group = {name: r for lab, name, r in rows if lab == label}
            base, tuned = group.get("stdlib"), group.get("stdlib+nodelay")
            for name, r in group.items():
                ratio = f"{r.rps / base.rps:.1f}x" if base and base.rps else "-"
                ratio2 = f"{r.rps / tuned.rps:.1f}x" if tuned and tuned.rps else "-"
                print(
                    f"| {label} | {name} | {r.rps:.0f} | {r.p50:.2f} | {r.p99:.2f} | {r.cpu_us:.0f}"
                    f" | {ratio} | {ratio2} |"
                )
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stderr is not None:
                proc.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
