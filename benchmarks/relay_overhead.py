"""What the share relay adds: latency, streamed throughput, time to first byte, idle memory.

Run alone: python benchmarks/relay_overhead.py [--quick] [--llama]

Three processes on 127.0.0.1, so that no two of them share a GIL: this one (the client, stdlib
http.client on keep-alive connections, the cheapest client there is), a fast fake OpenAI server
(ThreadingHTTPServer, answers from memory), and a relay process (RelayCore + ShareRelay, as `join`
will run them, with an httpx.Client to the fake). Every figure is measured side by side in this run,
direct to the fake and through the relay, with the samples interleaved (direct, relay, direct ...)
so that load from other processes on the machine falls on both alike.

- latency: a small non-streamed POST /v1/chat/completions (a 330-byte JSON answer with usage);
  p50 of N round trips each way; added = relay p50 - direct p50 (target <= 1 ms).
- throughput: a streamed answer of CHUNKS SSE chunks (~110 bytes each, as a chat stream sends them)
  written as fast as the fake can; MB/s through the relay / direct (target >= 0.9x).
  The same at a fast LLM's pace (200 chunks, 1 ms apart: 1000 tokens/s, several times what a
  local GPU streams to one request), and the relay's CPU time per chunk (utime+stime / chunks).
- TTFB: from the request sent to the first body byte of a short streamed answer (3 chunks, so the
  bulk of a long stream does not compete for the CPU); p50 added (<= 2 ms).
- RSS: VmRSS of the relay process idle after start-up and after the runs, next to a process that
  only imports httpx and builds a client (the agent's heaviest import), in this run.
- --llama: the same latency pair against the real llama.cpp server (tests/llamacpp_real.py, tiny
  model, max_tokens 1), where the generation itself dominates.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import PY, ROOT, Proc, env, proc_stats, row

FAKE = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}}).encode()
CHUNK = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'
CHUNKS = int(sys.argv[1])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not body.get("stream"):
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(ANSWER))); self.end_headers(); self.wfile.write(ANSWER)
            return
        self.send_response(200); self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
        pace_s = body.get("pace_ms", 0) / 1000.0
        for _ in range(body.get("chunks", CHUNKS)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
            if pace_s:
                time.sleep(pace_s)
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
class S(ThreadingHTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
print(json.dumps({"port": s.server_address[1]}), flush=True)
s.serve_forever()
"""

RELAY = r"""
import json, sys, threading
from llmroom_cli.http import make_http
from llmroom_cli.relay import RelayCore, ShareRelay
endpoint = sys.argv[1]
http = make_http(endpoint)
core = RelayCore(endpoint, http)
relay = ShareRelay(core, "127.0.0.1", ["127.0.0.1"])
print(json.dumps({"url": relay.start()}), flush=True)
threading.Event().wait()
"""

BASELINE = r"""
import json, threading, httpx
client = httpx.Client()
print(json.dumps({"ready": True}), flush=True)
threading.Event().wait()
"""

SMALL = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps(
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()
SHORT = json.dumps(
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, "chunks": 3}
).encode()
PACED = json.dumps(
    {
        "model": "fake",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "chunks": 200,
        "pace_ms": 1,
    }
).encode()
HEADERS = {"Content-Type": "application/json"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def post(
    conn: http.client.HTTPConnection, body: bytes, path: str = "/v1/chat/completions"
) -> tuple[float, float, int]:
    """(seconds to the first body byte, seconds to the end, body bytes) of one POST on `conn`."""
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers=HEADERS)
    resp = conn.getresponse()
    first = resp.read1(65536) if resp.status == 200 else b""
    t1 = time.perf_counter()
    size = len(first) + len(resp.read())  # read() ends the response, so the connection is reused
    t2 = time.perf_counter()
    assert resp.status == 200, resp.status
    return t1 - t0, t2 - t0, size


def pair(
    direct_port: int, relay_port: int, body: bytes, n: int
) -> tuple[list[tuple[float, float, int]], ...]:
    d_conn = http.client.HTTPConnection("127.0.0.1", direct_port, timeout=30)
    r_conn = http.client.HTTPConnection("127.0.0.1", relay_port, timeout=30)
    d: list[tuple[float, float, int]] = []
    r: list[tuple[float, float, int]] = []
    for _ in range(max(3, n // 20)):  # warm-up: connections, caches
        post(d_conn, body)
        post(r_conn, body)
    for _ in range(n):
        d.append(post(d_conn, body))
        r.append(post(r_conn, body))
    d_conn.close()
    r_conn.close()
    return d, r


def p50_ms(samples: list[tuple[float, float, int]], index: int) -> float:
    return statistics.median(s[index] for s in samples) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llama", action="store_true", help="also against the real llama.cpp server")
    args = ap.parse_args()
    n_small = 200 if args.quick else 1000
    n_stream = 10 if args.quick else 40
    chunks = 2000 if args.quick else 5000

    fake = Proc([PY, "-c", FAKE, str(chunks)], env())
    fake_port = int(fake.wait_for(lambda e: isinstance(e, dict) and "port" in e, 30)[1]["port"])
    relay = Proc([PY, "-c", RELAY, f"http://127.0.0.1:{fake_port}"], env())
    relay_port = _port(relay.wait_for(lambda e: isinstance(e, dict) and "url" in e, 30)[1]["url"])
    base = Proc([PY, "-c", BASELINE], env())
    base.wait_for(lambda e: isinstance(e, dict) and "ready" in e, 30)
    try:
        time.sleep(0.5)  # let start-up allocations settle before reading RSS
        rss_idle = proc_stats(relay.proc.pid)["rss_mib"]
        rss_base = proc_stats(base.proc.pid)["rss_mib"]
        print(f"relay overhead, {n_small} small requests and {n_stream} streams of {chunks} chunks each way")

        d, r = pair(fake_port, relay_port, SMALL, n_small)
        d50, r50 = p50_ms(d, 1), p50_ms(r, 1)
        row("small request p50 through the relay", r50, "ms", "direct", d50)
        print(
            f"  added p50 {r50 - d50:.3f} ms (target <= 1 ms); p90 direct "
            f"{statistics.quantiles([s[1] for s in d], n=10)[-1] * 1000:.3f} ms, relay "
            f"{statistics.quantiles([s[1] for s in r], n=10)[-1] * 1000:.3f} ms"
        )

        cpu0 = proc_stats(relay.proc.pid)["cpu_s"]
        d, r = pair(fake_port, relay_port, STREAM, n_stream)
        cpu_s = proc_stats(relay.proc.pid)["cpu_s"] - cpu0
        relayed_chunks = (n_stream + max(3, n_stream // 20)) * (chunks + 1)
        assert d[0][2] == r[0][2], (d[0][2], r[0][2])  # the same bytes came through
        mb_d = statistics.median(s[2] / s[1] for s in d) / 1e6
        mb_r = statistics.median(s[2] / s[1] for s in r) / 1e6
        row("streamed throughput, saturated, relay", mb_r, "MB/s", "direct", mb_d, ">= 0.9x")
        print(
            f"  relay CPU per relayed chunk {cpu_s / relayed_chunks * 1e6:.1f} us "
            f"(a ceiling of ~{relayed_chunks / cpu_s:,.0f} chunks/s on one core)"
        )
        d, r = pair(fake_port, relay_port, PACED, max(5, n_stream // 2))
        mb_d = statistics.median(s[2] / s[1] for s in d) / 1e6
        mb_r = statistics.median(s[2] / s[1] for s in r) / 1e6
        row("streamed throughput, 1000 chunks/s, relay", mb_r, "MB/s", "direct", mb_d, ">= 0.9x")
        d, r = pair(fake_port, relay_port, SHORT, n_small // 2)
        t_d, t_r = p50_ms(d, 0), p50_ms(r, 0)
        row("stream TTFB p50 through the relay", t_r, "ms", "direct", t_d)
        print(f"  added TTFB p50 {t_r - t_d:.3f} ms (target <= 2 ms)")

        rss_after = proc_stats(relay.proc.pid)["rss_mib"]
        row("relay process RSS, idle", rss_idle, "MiB", "python + httpx client", rss_base)
        print(
            f"  relay RSS after the runs {rss_after:.1f} MiB; the relay's own cost over httpx "
            f"{rss_idle - rss_base:.1f} MiB (agent target <= 35 MiB in all, 28.5 today without a relay)"
        )

        if args.llama:
            llama_pair(relay, n=20 if args.quick else 60)
    finally:
        for p in (relay, fake, base):
            p.close()


def llama_pair(relay_proc: Proc, n: int) -> None:
    sys.path.insert(0, ROOT)
    from tests.llamacpp_real import LlamaServer, make_tiny_gguf, xllamacpp_missing

    if xllamacpp_missing():
        print("llama.cpp: skipped (xllamacpp not installed)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_gguf(Path(tmp) / "tiny.gguf")
        with LlamaServer(model) as server:
            relay = Proc([PY, "-c", RELAY, server.url], env())
            try:
                port = _port(relay.wait_for(lambda e: isinstance(e, dict) and "url" in e, 30)[1]["url"])
                body = json.dumps(
                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "ignore_eos": True}
                ).encode()
                d, r = pair(server.port, port, body, n)
                row("llama.cpp 1-token request p50, relay", p50_ms(r, 1), "ms", "direct", p50_ms(d, 1))
            finally:
                relay.close()


if __name__ == "__main__":
    main()
