"""A test double of a hub that misbehaves on a chosen route and answers the rest like a hub.

`HostileHub` speaks just enough of the v0.1 API for `llmroom join` (health, join, heartbeat, leave,
participants). `hub.faults[route] = kind` makes one route misbehave, where route is one of "health",
"join", "beat", "leave", "participants", "rooms" and kind one of:

    trickle        headers at once, then one byte of the body per `trickle_s` (a slow proxy)
    gzip-garbage   `Content-Encoding: gzip` over bytes that are not gzip
    gzip-bomb      a small gzip body that inflates to 200 MiB of JSON-ish spaces
    deep-json      a JSON array nested 10,000 deep
    huge           a 200 MiB body, streamed as fast as the client reads
    401            `{"error": "Invalid password"}` with status 401
    body:TEXT      a 200 with TEXT as the JSON body (for hostile participant lists)

It records what arrived (`joins`, `beats`, `leaves`) so tests can assert that a leave reached it.
"""

from __future__ import annotations

import functools
import gzip
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HUGE_BYTES = 200 * 1024 * 1024


@functools.cache
def gzip_bomb() -> bytes:
    """About 200 KiB of gzip that inflates to 200 MiB of spaces (made once: it takes a second)."""
    return gzip.compress(b" " * HUGE_BYTES, 9)


class HostileHub:
    def __init__(self, trickle_s: float = 1.0, tls: ssl.SSLContext | None = None) -> None:
        self.faults: dict[str, str] = {}
        self.trickle_s = trickle_s
        self.joins: list[dict[str, Any]] = []
        self.beats = 0
        self.leaves: list[str] = []
        self.models: list[str] = ["model-a"]
        # When each request arrived, per route (time.perf_counter, for benchmarks in this process).
        self.arrivals: dict[str, list[float]] = {}
        self.sent_bytes = 0  # body bytes of "huge" answers that reached the socket
        self.participants: dict[str, dict[str, Any]] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

            def do_DELETE(self) -> None:
                hub._handle(self, "DELETE")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up on a misbehaving answer: expected, not worth a traceback

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        if tls is not None:  # https, with the certificate the test chose
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostileHub:
        gzip_bomb()  # ready before any test sets the fault, so it is answered at once
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # -- routing ------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        parts = h.path.strip("/").split("/")
        route, answer = "other", {"error": "Not found"}
        status = 404
        if method == "GET" and parts == ["health"]:
            route, status, answer = "health", 200, {"status": "ok", "timestamp": int(time.time() * 1000)}
        elif method == "GET" and parts == ["v1", "models"]:
            # Also an OpenAI-compatible "LLM server" whose model names are chosen by the test.
            route, status = "models", 200
            answer = {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        elif method == "GET" and parts == ["rooms"]:
            route, status, answer = "rooms", 200, {"rooms": []}
        elif len(parts) >= 3 and parts[0] == "rooms":
            if method == "POST" and parts[2] == "join":
                route, status = "join", 200
                with self.lock:
                    self.joins.append(body)
                    self.participants[body.get("id", "?")] = dict(body, status="online")
                answer = {"participant": dict(body, status="online"), "roomId": "r1"}
            elif method == "POST" and parts[2] == "health":
                route, status, answer = "beat", 200, {"success": True}
                with self.lock:
                    self.beats += 1
            elif method == "DELETE" and parts[2] == "leave" and len(parts) == 4:
                route, status, answer = "leave", 200, {"success": True}
                with self.lock:
                    self.leaves.append(parts[3])
                    self.participants.pop(parts[3], None)
            elif method == "GET" and parts[2] == "participants":
                route, status = "participants", 200
                with self.lock:
                    answer = {"participants": list(self.participants.values())}
        with self.lock:
            self.arrivals.setdefault(route, []).append(time.perf_counter())
        fault = self.faults.get(route)
        if fault is None:
            self._send(h, status, json.dumps(answer).encode())
        else:
            self._misbehave(h, fault)

    def _send(self, h: BaseHTTPRequestHandler, status: int, data: bytes, **headers: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.end_headers()
        h.wfile.write(data)

    def _misbehave(self, h: BaseHTTPRequestHandler, fault: str) -> None:
        try:
            if fault == "trickle":
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", "1000")
                h.end_headers()
                h.wfile.flush()
                for _ in range(1000):
                    if self.stopping.wait(self.trickle_s):
                        return
                    h.wfile.write(b" ")
                    h.wfile.flush()
            elif fault == "gzip-garbage":
                self._send(h, 200, b"\x1f\x8b this is not gzip at all", Content_Encoding="gzip")
            elif fault == "gzip-bomb":
                self._send(h, 200, gzip_bomb(), Content_Encoding="gzip")
            elif fault == "deep-json":
                self._send(h, 200, b"[" * 10_000 + b"]" * 10_000)
            elif fault == "huge":
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(HUGE_BYTES))
                h.end_headers()
                chunk = b" " * (1 << 20)
                for _ in range(HUGE_BYTES // len(chunk)):
                    if self.stopping.is_set():
                        return
                    h.wfile.write(chunk)
                    with self.lock:
                        self.sent_bytes += len(chunk)
            elif fault == "401":
                self._send(h, 401, b'{"error":"Invalid password"}')
            elif fault.startswith("body:"):
                self._send(h, 200, fault[5:].encode("utf-8", "surrogatepass"))
            else:
                raise ValueError(f"unknown fault {fault!r}")
        except OSError:
            pass  # the client gave up on us: that is the point
