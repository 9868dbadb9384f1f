"""The rebuilt hub's own figures (issue 11): RSS idle and with 10,000 participants, a 100 MiB streamed
relay with the hub's RSS sampled throughout (v0.1 over HTTP and v0.6 through the tunnel), and import
times (`llmroom_cli.hub` for `llmroom serve`; the agent's modules and `--help` import no server library).

Runs alone: `python benchmarks/hub_figures.py [--participants 10000] [--mib 100]`. The hub is
`llmroom_cli.hub.serve` in its own process; load, the fake LLM and the tunnel participant run here.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_load import _free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PIECE = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"  # one 64 KiB SSE event


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """The hub's RSS every 50 ms while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.samples: list[float]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(_rss_mib(self.pid))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *args: Any) -> None:
        self.stop.set()
        self.thread.join()


def _call(port: int, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return data


def _streaming_llm(mib: int) -> ThreadingHTTPServer:
    count = mib * 16  # 64 KiB pieces

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(count):
                self.wfile.write(PIECE)
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


def _read_stream(port: int, code: str, model: str) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request(
        "POST", f"/rooms/{code}/v1/chat/completions", body=json.dumps({"model": model, "stream": True})
    )
    resp = conn.getresponse()
    total = 0
    while True:
        piece = resp.read1(1 << 20)
        if not piece:
            break
        total += len(piece)
    conn.close()
    return total, time.perf_counter() - started


def _tunnel_participant(port: int, code: str, mib: int) -> threading.Thread:
    from websockets.sync.client import connect

    reg = _call(
        port,
        "PUT",
        f"/v1/rooms/{code}/participants/tun",
        {"nickname": "t", "model": "m", "endpoint": "http://127.0.0.1:1"},
    )
    tunnel = reg["data"]["tunnel"]
    ready = threading.Event()

    def run() -> None:
        with connect(f"{tunnel['url']}?token={tunnel['token']}", max_size=None) as ws:
            ready.set()
            request = json.loads(ws.recv())
            rid = request["requestId"]
            ws.send(
                json.dumps({"type": "tunnel.response.start", "requestId": rid, "status": 200, "headers": {}})
            )
            chunk = base64.b64encode(PIECE).decode()
            for _ in range(mib * 16):
                ws.send(json.dumps({"type": "tunnel.response.chunk", "requestId": rid, "chunk": chunk}))
            ws.send(json.dumps({"type": "tunnel.response.end", "requestId": rid}))
            time.sleep(0.5)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(30)
    time.sleep(0.2)
    return t


def _import_s(code: str) -> float:
    samples = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code_line = f"from llmroom_cli.hub import serve; serve('127.0.0.1', {port}, 30.0, True)"
    proc = subprocess.Popen([sys.executable, "-c", code_line], stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    proc.stderr.readline()
    llm = _streaming_llm(args.mib)
    try:
        time.sleep(0.5)
        print(f"RSS idle: {_rss_mib(proc.pid):.1f} MiB")
        room = _call(port, "POST", "/rooms", {"name": "big"})["room"]["code"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        for i in range(args.participants):
            body = {"id": f"p{i}", "nickname": f"nick{i}", "model": "m", "endpoint": "http://127.0.0.1:9",
                    "specs": {"gpu": "NVIDIA H200", "vram": 141, "ram": 128, "cpu": "Xeon"}}  # fmt: skip
            conn.request("POST", f"/rooms/{room}/join", body=json.dumps(body))
            conn.getresponse().read()
        conn.close()
        joins_s = time.perf_counter() - started
        rate = args.participants / joins_s
        print(
            f"{args.participants} joins in {joins_s:.1f} s ({rate:.0f}/s); RSS {_rss_mib(proc.pid):.1f} MiB"
        )
        code = _call(port, "POST", "/rooms", {"name": "stream"})["room"]["code"]
        _call(
            port,
            "POST",
            f"/rooms/{code}/join",
            {
                "id": "llm",
                "nickname": "l",
                "model": "m",
                "endpoint": f"http://127.0.0.1:{llm.server_address[1]}",
            },
        )
        for name, model in (("v0.1 HTTP relay", "llm"), ("v0.6 tunnel", "tun")):
            if model == "tun":
                _tunnel_participant(port, code, args.mib)
            before = _rss_mib(proc.pid)
            with Sampler(proc.pid) as s:
                total, took = _read_stream(port, code, model)
            print(
                f"{name}: {total / (1 << 20):.0f} MiB streamed in {took:.1f} s"
                f" ({total / (1 << 20) / took:.0f} MiB/s);"
                f" hub RSS before {before:.1f}, during min {min(s.samples):.1f} max {max(s.samples):.1f} MiB"
            )
    finally:
        proc.terminate()
        proc.wait(15)
        llm.shutdown()
    print(f"import llmroom_cli.hub (llmroom serve): {_import_s('import llmroom_cli.hub'):.3f} s")
    print(f"import aiohttp.web alone: {_import_s('import aiohttp.web'):.3f} s")
    check = (
        "import sys, llmroom_cli.cli, llmroom_cli.session, llmroom_cli.client; "
        "print(sorted(m for m in ('aiohttp', 'llmroom_cli.hub', 'uvicorn', 'websockets')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=env, check=True
    ).stdout
    print(f"server modules imported by the agent and --help: {out.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
