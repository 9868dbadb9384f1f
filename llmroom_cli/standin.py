"""A stand-in LLM server for `llmroom demo` and tests: answers like Ollama, with a canned chat reply.

Routes: `/` ("Ollama is running"), `/api/version`, `/api/tags`, `/api/ps`, `/v1/models`, and
`/v1/chat/completions` (plain JSON, or Server-Sent Events chunks when `"stream": true`). Standard
library only.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "llmroom-demo:latest"
REPLY = "Hello from the llmroom stand-in model! Your request went through the hub to this participant."


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llmroom-standin"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, body: bytes, ctype: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/") or "/"
        created = int(self.server.started)  # type: ignore[attr-defined]
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._json(200, {"version": "0.0.0-llmroom-standin"})
        elif path == "/api/tags":
            model = {
                "name": MODEL,
                "model": MODEL,
                "modified_at": "2026-11-29T00:00:00Z",
                "size": 1024,
                "digest": "0" * 64,
                "details": {
                    "format": "gguf",
                    "family": "llama",
                    "parameter_size": "0B",
                    "quantization_level": "Q4_0",
                },
            }
            self._json(200, {"models": [model]})
        elif path == "/api/ps":
            self._json(
                200, {"models": [{"name": MODEL, "model": MODEL, "size": 1024, "context_length": 4096}]}
            )
        elif path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": created, "owned_by": "library"}],
                },
            )
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 1 << 20)) if length > 0 else b""
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": "not found"})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            return
        model = body.get("model", MODEL) if isinstance(body, dict) else MODEL
        ident = f"chatcmpl-{int(time.time() * 1000)}"
        if isinstance(body, dict) and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for word in REPLY.split(" "):
                chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True
            return
        self._json(
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": len(REPLY.split()),
                    "total_tokens": 1 + len(REPLY.split()),
                },
            },
        )


class StandIn:
    """A running stand-in on 127.0.0.1 (port 0 picks a free one); `stop()` shuts it down."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.started = time.time()  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
