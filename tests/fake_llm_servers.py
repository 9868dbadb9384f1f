"""Fake local LLM servers built from the recorded answers in tests/fixtures/endpoints.

Each fake is a real HTTP server on 127.0.0.1 (port 0) in a thread, answering the routes a kind of
server answers with the recorded bodies, status codes and headers (see that folder's README.md):

    FakeLLMServer(kind, variant)      kind: ollama, lmstudio, llamacpp, vllm, localai, openai
        ollama     default (tags + ps + version), empty, no-ps (an Ollama without /api/ps)
        lmstudio   default (0.4: /api/v1 and /api/v0), 0.3 (/api/v0 only), old (/v1 only), auth
        llamacpp   default, loading (503 everywhere until set_ready()), ollama-compat, api-key
        vllm       default, auth
        localai    default (imitates Ollama's /, /api/version, /api/tags, /api/ps), starting, auth
        openai     default; `api_key=` makes any of them demand `Authorization: Bearer KEY`

    with FakeLLMServer("ollama") as server:
        probe(http, server.url)

`server.requests` lists the paths asked for. Fixtures are read from LLMROOM_FIXTURES when set, else
from tests/fixtures/endpoints (a copy of the project's shared recordings, with their README of sources).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


def fixtures_dir() -> Path:
    env = os.environ.get("LLMROOM_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parent / "fixtures" / "endpoints"


def fixture(name: str) -> bytes:
    path = fixtures_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"endpoint fixture {path} is missing: set LLMROOM_FIXTURES")
    return path.read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture(name))


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, data: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(data).encode(), JSON, dict(headers))


def _file(status: int, name: str, content_type: str | None = JSON, **headers: str) -> Reply:
    return Reply(status, fixture(name), content_type, dict(headers))


_Guard = Callable[[str, dict[str, str]], Reply | None]


@dataclass
class _Spec:
    routes: dict[str, Reply]
    unknown: Callable[[str], Reply]
    server_header: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Answers every request, routes included, while set (llama.cpp loading, auth on).
    guard: _Guard | None = None


def _ollama(variant: str) -> _Spec:
    not_found = Reply(404, b"404 page not found", TEXT)
    routes = {
        "/": _file(200, "ollama-root.txt", TEXT),
        "/api/version": _file(200, "ollama-api-version.json"),
        "/api/tags": _file(200, "ollama-api-tags.json"),
        "/api/ps": _file(200, "ollama-api-ps.json"),
        "/v1/models": _file(200, "ollama-v1-models.json"),
    }
    if variant == "empty":
        routes["/api/tags"] = _file(200, "ollama-api-tags-empty.json")
        routes["/api/ps"] = _json(200, {"models": []})
        routes["/v1/models"] = _file(200, "ollama-v1-models-empty.json")
    elif variant == "no-ps":
        del routes["/api/ps"]
    elif variant != "default":
        raise ValueError(f"unknown ollama variant {variant!r}")
    return _Spec(routes, lambda path: not_found)


def _lmstudio(variant: str) -> _Spec:
    express = {"X-Powered-By": "Express"}

    def unexpected(path: str) -> Reply:
        return _json(200, {"error": f"Unexpected endpoint or method. (GET {path})"})

    # The recorded body, for the route it was recorded on; the same shape for any other route.
    assert json.loads(fixture("lmstudio-error-unexpected-endpoint.json")) == {
        "error": "Unexpected endpoint or method. (GET /api/tags)"
    }
    routes = {
        "/v1/models": _file(200, "lmstudio-v1-models.json"),
        "/api/v0/models": _file(200, "lmstudio-api-v0-models.json"),
        "/api/v0/models/qwen2-vl-7b-instruct": _file(200, "lmstudio-api-v0-model.json"),
        "/api/v1/models": _file(200, "lmstudio-api-v1-models.json"),
    }
    guard = None
    if variant == "0.3":
        del routes["/api/v1/models"]
    elif variant == "old":
        del routes["/api/v1/models"], routes["/api/v0/models"], routes["/api/v0/models/qwen2-vl-7b-instruct"]
    elif variant == "auth":
        denied = _file(401, "lmstudio-error-auth-required.json")
        guard = _auth_guard(None, denied)
    elif variant != "default":
        raise ValueError(f"unknown lmstudio variant {variant!r}")
    return _Spec(routes, unexpected, extra_headers=express, guard=guard)


class _Flag:
    def __init__(self, value: bool) -> None:
        self.value = value


def _llamacpp(variant: str, loading: _Flag) -> _Spec:
    routes = {
        "/v1/models": _file(200, "llamacpp-v1-models.json"),
        "/models": _file(200, "llamacpp-v1-models.json"),
        "/props": _file(200, "llamacpp-props.json"),
        "/health": _file(200, "llamacpp-health-ok.json"),
        "/v1/health": _file(200, "llamacpp-health-ok.json"),
    }
    guard: _Guard | None = None
    if variant == "ollama-compat":
        for route in ("/v1/models", "/models", "/api/tags"):
            routes[route] = _file(200, "llamacpp-v1-models-with-ollama-compat.json")
    elif variant == "loading":
        loading.value = True
        busy = _file(503, "llamacpp-health-loading.json")

        def while_loading(path: str, headers: dict[str, str]) -> Reply | None:
            return busy if loading.value else None

        guard = while_loading

    elif variant == "api-key":
        # /health, /models, /v1/models and / are public: listing models works even without the key.
        denied = _file(401, "llamacpp-error-invalid-api-key.json")
        public = {"/", "/health", "/v1/health", "/models", "/v1/models"}
        guard = _auth_guard("secret", denied, public)
    elif variant != "default":
        raise ValueError(f"unknown llamacpp variant {variant!r}")
    not_found = _file(404, "llamacpp-error-not-found.json")
    return _Spec(routes, lambda path: not_found, server_header="llama.cpp", guard=guard)


def _vllm(variant: str) -> _Spec:
    routes = {
        "/v1/models": _file(200, "vllm-v1-models.json"),
        "/version": _file(200, "vllm-version.json"),
        "/health": Reply(200, b"", None),
    }
    guard = None
    if variant == "auth":
        denied = _file(401, "vllm-error-unauthorized.json")
        guard = _auth_guard("secret", denied, {"/health", "/version"}, only_prefix="/v1/")
    elif variant != "default":
        raise ValueError(f"unknown vllm variant {variant!r}")
    return _Spec(routes, lambda path: _json(404, {"detail": "Not Found"}), guard=guard)


def _localai(variant: str, loading: _Flag) -> _Spec:
    tags = fixture_json("localai-api-tags-ollama-compat.json")
    # Not recorded: /api/ps built from the imitation's handler (ListRunningEndpoint), one model loaded.
    running = dict(tags["models"][0], size_vram=0, expires_at="2026-08-23T21:03:11Z")
    routes = {
        "/v1/models": _file(200, "localai-v1-models.json"),
        "/models": _file(200, "localai-v1-models.json"),
        "/version": _file(200, "localai-version.json"),
        "/readyz": Reply(200, b"", None),
        "/healthz": Reply(200, b"", None),
        "/": _file(200, "ollama-root.txt", TEXT),
        "/api/version": _file(200, "localai-api-version-ollama-compat.json"),
        "/api/tags": _file(200, "localai-api-tags-ollama-compat.json"),
        "/api/ps": _json(200, {"models": [running]}),
    }
    if variant == "starting":
        loading.value = True
        starting = _file(503, "localai-readyz-starting.json")
        ready = routes["/readyz"]
        routes.pop("/readyz")

        def readyz(path: str, headers: dict[str, str]) -> Reply | None:
            return (starting if loading.value else ready) if path == "/readyz" else None

        return _Spec(routes, lambda path: _json(404, {"error": "not found"}), guard=readyz)
    guard = None
    if variant == "auth":
        denied = _file(401, "localai-error-auth-required.json", **{"WWW-Authenticate": "Bearer"})
        guard = _auth_guard("secret", denied, {"/readyz", "/healthz"})
    elif variant != "default":
        raise ValueError(f"unknown localai variant {variant!r}")
    return _Spec(routes, lambda path: _json(404, {"error": "not found"}), guard=guard)


def _openai(variant: str) -> _Spec:
    if variant != "default":
        raise ValueError(f"unknown openai variant {variant!r}")
    routes = {"/v1/models": _file(200, "openai-v1-models.json")}

    def unknown(path: str) -> Reply:
        return _json(
            404, {"error": {"message": f"Unknown request URL: GET {path}", "type": "invalid_request_error"}}
        )

    return _Spec(routes, unknown)


def _auth_guard(
    key: str | None, denied: Reply, public: set[str] | None = None, only_prefix: str = "/"
) -> _Guard:
    def guard(path: str, headers: dict[str, str]) -> Reply | None:
        if path in (public or set()) or not path.startswith(only_prefix):
            return None
        if key is not None and headers.get("authorization") == f"Bearer {key}":
            return None
        return denied

    return guard


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0]
        fake.requests.append(path)
        reply = fake.reply(path, {k.lower(): v for k, v in self.headers.items()})
        self.send_response_only(reply.status)
        self.send_header("Date", self.date_time_string())
        if fake.spec.server_header:
            self.send_header("Server", fake.spec.server_header)
        for name, value in {**fake.spec.extra_headers, **reply.headers}.items():
            self.send_header(name, value)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if send_body:
            self.wfile.write(reply.body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeLLMServer


class FakeLLMServer:
    """A fake LLM server of one kind on 127.0.0.1 (a free port); start()/stop() or `with`."""

    def __init__(self, kind: str, variant: str = "default", api_key: str | None = None) -> None:
        self.kind = kind
        self.variant = variant
        self.requests: list[str] = []
        self._loading = _Flag(False)
        builders: dict[str, Callable[[], _Spec]] = {
            "ollama": lambda: _ollama(variant),
            "lmstudio": lambda: _lmstudio(variant),
            "llamacpp": lambda: _llamacpp(variant, self._loading),
            "vllm": lambda: _vllm(variant),
            "localai": lambda: _localai(variant, self._loading),
            "openai": lambda: _openai(variant),
        }
        if kind not in builders:
            raise ValueError(f"unknown kind {kind!r}: one of {', '.join(builders)}")
        self.spec = builders[kind]()
        if api_key is not None:
            denied = _file(401, "openai-error-invalid-api-key.json")
            self.spec.guard = _auth_guard(api_key, denied)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def reply(self, path: str, headers: dict[str, str]) -> Reply:
        if self.spec.guard is not None:
            early = self.spec.guard(path, headers)
            if early is not None:
                return early
        route = self.spec.routes.get(path)
        return route if route is not None else self.spec.unknown(path)

    def set_ready(self) -> None:
        """End the loading phase (llama.cpp `loading`, LocalAI `starting`)."""
        self._loading.value = False

    def start(self) -> FakeLLMServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-{self.kind}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start() if self._httpd is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
