"""One incoming request -> the local LLM server -> a stream of chunks back; counts the traffic.

Two layers. `RelayCore` is the one place that turns a request from the room into a call to the local
server: the share relay below (v0.1 hubs, which connect to us) and the v0.6 tunnel (which hands us
`tunnel.request` frames) both call it, from one thread per request:

    core = RelayCore("http://127.0.0.1:11434", http, credentials=parse_headers([], [], key),
                     on_request=events.put, on_server_down=session.pause)
    with core.open("POST", "/v1/chat/completions", headers, body) as up:  # returns at the head
        send_start(up.status, up.headers)       # the server's status and safe headers (or ours: 404 ...)
        try:
            for chunk in up:                    # raw bytes as the server sends them, never held back
                send(chunk)
        except StreamBroken as exc:             # the server died or stalled mid-answer
            send_error(exc.message)
    core.traffic                                # a copy: served, in_flight, failed, last_ttft_ms ...

`open()` never raises for a request's failure (a refused route, a full relay, a dead server: an
Upstream with the JSON error), so a tunnel worker needs no other error path. While it blocks waiting
for the head (or `for chunk in up` waits for the next chunk), the tunnel's own timer may send its
`: keepalive` comments; when the tunnel is gone, `up.abort()` from any thread cuts the request (the
server stops generating) and the worker's loop ends with StreamBroken.

What the core guarantees for every request:
- only the OpenAI-compatible inference routes are forwarded (ROUTES); anything else is a 404 JSON
  error, so the server's admin API (Ollama's /api/pull, /api/delete ...) is never reachable;
- at most `max_concurrent` requests at once; beyond that a 429 JSON error at once (the hub can send
  the request to another participant instead of queueing it here);
- hop-by-hop headers and any Authorization / Cookie / Proxy-Authorization from the room are dropped;
  the local server's credentials are added here and only here, and never logged or reported;
- deadlines (RelayLimits): connect, first byte (the response head), idle between body chunks, total;
- a connect failure calls `on_server_down()` (the session pauses the participant) and answers 502;
- when each request ends, `on_request(event)` gets route, status, duration, ttft, tokens, tokens/s
  (never prompt or answer text);
- `stop_accepting()` then `drain(timeout_s)`: new requests get 503 while those in flight finish.

`ShareRelay` is the small HTTP server a v0.1 hub connects to (stdlib ThreadingHTTPServer: the HTTP
layer is the standard library's). It accepts connections only from the hub's address and serves
through the core, writing each chunk to the hub as soon as it arrives.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llmroom_cli.errors import EndpointError

if TYPE_CHECKING:
    import socket

    import httpx

# Four requests at once: llama-server's default number of parallel slots (-np auto = 4) and the most
# Ollama runs at once by default (OLLAMA_NUM_PARALLEL: 4 or 1 by memory); past that the local server
# queues them anyway, slower for everyone, while a quick 429 lets the hub pick another participant.
DEFAULT_MAX_CONCURRENT = 4

_ID = r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,255}"
# (path regex, methods, the route name reported in events). Only what the hub uses; ids are opaque.
ROUTES: tuple[tuple[re.Pattern[str], frozenset[str], str], ...] = (
    (re.compile(r"/v1/chat/completions"), frozenset({"POST"}), "/v1/chat/completions"),
    (re.compile(r"/v1/completions"), frozenset({"POST"}), "/v1/completions"),
    (re.compile(r"/v1/responses"), frozenset({"POST"}), "/v1/responses"),
    (re.compile(rf"/v1/responses/{_ID}"), frozenset({"GET", "DELETE"}), "/v1/responses/{id}"),
    (re.compile(rf"/v1/responses/{_ID}/cancel"), frozenset({"POST"}), "/v1/responses/{id}/cancel"),
    (re.compile(rf"/v1/responses/{_ID}/input_items"), frozenset({"GET"}), "/v1/responses/{id}/input_items"),
    (re.compile(r"/v1/models"), frozenset({"GET"}), "/v1/models"),
    (re.compile(rf"/v1/models/{_ID}(?:/{_ID})?"), frozenset({"GET"}), "/v1/models/{id}"),
    (re.compile(r"/v1/embeddings"), frozenset({"POST"}), "/v1/embeddings"),
)

# RFC 9110 7.6.1 hop-by-hop headers, plus what must not cross the relay in either direction: the
# room's credentials and cookies (the local server's are ours to add), Host and Content-Length (set
# for the new connection), Accept-Encoding (loopback needs no compression, and usage is read from
# the plain body: `identity` is asked for, else httpx would offer gzip).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "accept-encoding",
    # A browser's Origin reaching Ollama is refused (403) unless listed in OLLAMA_ORIGINS; the
    # relay is the server's client here, not the browser.
    "origin",
    "referer",
}
_RESPONSE_DROP = _HOP_BY_HOP | {"set-cookie", "date", "server"}

# How much of a non-streamed answer is kept aside (a copy: forwarding is not held up) to read its
# usage block; an answer larger than this is still forwarded whole, only its tokens go uncounted.
_USAGE_PEEK_BYTES = 1 << 20
# An SSE line longer than this stops the token count for that request (the bytes still go through).
_SSE_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class RelayLimits:
    """The per-request bounds, each a named setting with its reason.

    connect_s       connecting to the local server: it is on this machine or this LAN, so a server
                    that does not accept within 2 s is down (502, and `on_server_down`).
    first_byte_s    from the request sent to the response head: for a non-streamed answer that is
                    the whole generation, which on a CPU with a long prompt can take minutes (504).
    idle_s          the longest silence between two body chunks (also before the first one): a
                    server that stops mid-answer is cut (StreamBroken) instead of holding a slot.
    total_s         the whole exchange; checked as chunks arrive, so a silent server can overrun it
                    by at most idle_s.
    max_body_bytes  the request body (413 beyond): prompts with long contexts and images fit.
    """

    connect_s: float = 2.0
    first_byte_s: float = 300.0
    idle_s: float = 120.0
    total_s: float = 1800.0
    max_body_bytes: int = 32 << 20


class StreamBroken(EndpointError):
    """The local server died, stalled past a deadline or sent garbage in the middle of an answer."""


# A model list is a few KiB; a ping reads at most this much of it.
PING_READ_MAX_BYTES = 256 * 1024


@dataclass
class Traffic:
    """Counters for the panel and `status`: a snapshot is a copy, safe to read from any thread.

    served: requests the local server answered to the end (any status it chose); failed: requests
    the relay could not complete (server down, deadline, broken stream, or a 5xx from the server);
    rejected: answered by the relay itself (404 route, 413, 429 busy, 503 leaving).
    """

    served: int = 0
    in_flight: int = 0
    failed: int = 0
    rejected: int = 0
    last_ttft_ms: float | None = None
    last_tokens_per_s: float | None = None
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _json_error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


# A query string is passed on as it came, so it must be plain URL text: visible ASCII, no fragment.
_QUERY_RE = re.compile(r"[\x21-\x22\x24-\x7e]*")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def match_route(method: str, path: str) -> tuple[str | None, bool]:
    """(the route name, method allowed) for a request path; (None, False) when it is not served.

    The query string is not part of the route, but one that is not plain URL text is refused too.
    """
    bare, _, query = path.partition("?")
    if not _QUERY_RE.fullmatch(query):
        return None, False
    for pattern, methods, name in ROUTES:
        if pattern.fullmatch(bare):
            return name, method.upper() in methods
    return None, False


def forward_headers(
    incoming: Mapping[str, str] | Iterable[tuple[str, str]], credentials: Mapping[str, str]
) -> dict[str, str]:
    """The headers sent to the local server: the room's, cleaned, then our credentials on top.

    A header that is not valid HTTP (a bad name, a line break or a non-Latin-1 character in the
    value, a value that is not a string: the tunnel's frames are JSON from the hub) is dropped.
    """
    pairs = incoming.items() if isinstance(incoming, Mapping) else incoming
    named_in_connection: set[str] = set()
    kept: list[tuple[str, str]] = []
    for name, value in pairs:
        if not (isinstance(name, str) and isinstance(value, str)):
            continue
        if not (_HEADER_NAME_RE.fullmatch(name) and _HEADER_VALUE_RE.fullmatch(value)):
            continue
        low = name.lower()
        if low == "connection":
            named_in_connection.update(t.strip().lower() for t in value.split(","))
        kept.append((name, value))
    override = {k.lower() for k in credentials}
    out: dict[str, str] = {}
    for name, value in kept:
        low = name.lower()
        if low in _REQUEST_DROP or low in named_in_connection or low in override:
            continue
        out[name] = value
    out["Accept-Encoding"] = "identity"
    out.update(credentials)
    return out


class _Meter:
    """Reads the chunks as they pass, for ttft and tokens, without holding them up."""

    def __init__(self, stream: bool, started: float) -> None:
        self.stream = stream
        self.started = started
        self.first_content: float | None = None
        self.last_content: float | None = None
        self.deltas = 0
        self.usage_tokens: int | None = None
        self._line = bytearray()
        self._peek = bytearray()
        self._counting = True

    def feed(self, chunk: bytes, now: float) -> None:
        if not self.stream:
            if self.first_content is None:
                self.first_content = now
            self.last_content = now
            if self._counting:
                if len(self._peek) + len(chunk) > _USAGE_PEEK_BYTES:
                    self._counting = False
                    self._peek.clear()
                else:
                    self._peek += chunk
            return
        if not self._counting:
            return
        lines = (bytes(self._line) + chunk if self._line else chunk).split(b"\n")
        self._line = bytearray(lines.pop())  # an unfinished line waits for the next chunk
        for line in lines:
            if line.startswith(b"data:"):
                self._sse_data(line[5:].strip(), now)
        if len(self._line) > _SSE_LINE_BYTES:
            self._counting = False

    def _sse_data(self, data: bytes, now: float) -> None:
        if not data or data == b"[DONE]":
            return
        # Parsing every chunk's JSON costs more than the rest of the relay's work on it; only a chunk
        # that mentions usage is parsed, the others are tested for generated text with one regex.
        if b'"usage"' in data:
            try:
                event = json.loads(data)
            except ValueError:
                return
            event = _dict(event)
            tokens = _usage_tokens(event.get("usage")) or _usage_tokens(
                _dict(event.get("response")).get("usage")
            )
            if tokens is not None:
                self.usage_tokens = tokens
            content = _has_content(event)
        else:
            content = _CONTENT_RE.search(data) is not None
        if content:
            self.deltas += 1
            if self.first_content is None:
                self.first_content = now
            self.last_content = now

    def tokens(self) -> int | None:
        if not self.stream and self._counting and self._peek:
            try:
                body = json.loads(bytes(self._peek))
            except ValueError:
                return None
            return _usage_tokens(_dict(body).get("usage"))
        if self.usage_tokens is not None:
            return self.usage_tokens
        return self.deltas if self.stream and self.deltas else None


# A non-empty string for a chat delta's content / reasoning_content, a completion's text or a
# Responses text delta, or a tool-call list: a chunk that carries generated output.
_CONTENT_RE = re.compile(
    rb'"(?:content|reasoning_content|text|delta)"\s*:\s*"(?!")|"tool_calls"\s*:\s*\[\s*\{'
)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _usage_tokens(usage: Any) -> int | None:
    """completion_tokens (chat, completions) or output_tokens (Responses)."""
    usage = _dict(usage)
    for key in ("completion_tokens", "output_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _has_content(event: dict[str, Any]) -> bool:
    """A stream chunk that carries generated text: a chat delta, a completion's text, a Responses delta."""
    if event.get("type") in ("response.output_text.delta", "response.reasoning_text.delta"):
        return bool(event.get("delta"))
    choices = event.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        choice = _dict(choice)
        delta = _dict(choice.get("delta"))
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
        if choice.get("text"):
            return True
    return False


# The most a burst of already-arrived chunks is joined into (then sent at once): the reads are 64 KiB.
COALESCE_BYTES = 64 << 10


def _upstream_socket(response: httpx.Response) -> socket.socket | None:
    """The socket to the server, from httpx's documented `network_stream` response extension."""
    import socket

    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


def _more_waiting(response: httpx.Response) -> Callable[[], bool]:
    """A check that the server's next bytes are already in this machine's socket buffer.

    More than a chunk's closing CRLF must be there (MSG_PEEK of 3 bytes): reading on after a lone
    CRLF would wait for the server's next chunk. The socket comes from httpx's documented
    `network_stream` response extension; without one, nothing is ever joined.
    """
    import select
    import socket

    sock = _upstream_socket(response)
    if sock is None or sock.fileno() < 0 or not hasattr(select, "poll"):
        return lambda: False
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def more() -> bool:
        # poll(0) first: a socket with a timeout would make recv() itself wait for data.
        if not poller.poll(0):
            return False
        try:
            return len(sock.recv(3, socket.MSG_PEEK)) >= 3
        except OSError:  # the socket is gone: send what we have
            return False

    return more


class Upstream:
    """One request's answer: `status` and `headers` at once, then iterate for the raw body chunks.

    Iterating raises StreamBroken when the server dies or stalls mid-answer (forward what came, then
    cut the connection so the room sees a truncated answer, not a complete one). `close()` ends the
    request (frees its slot, reports it) and is idempotent; use it as a context manager. Iterate and
    close from one thread; `abort()` is the one call meant for another thread.

    Chunks are under 128 KiB (httpx reads 64 KiB at a time; a joined burst stops past
    COALESCE_BYTES), so a tunnel frame of one base64 chunk stays far below 1 MiB.
    """

    def __init__(
        self,
        core: RelayCore,
        route: str,
        method: str,
        status: int,
        headers: list[tuple[str, str]],
        started: float,
        *,
        body: bytes | None = None,
        response: httpx.Response | None = None,
        slot: bool = False,
        error: str | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.route = route
        self.method = method
        self.stream = response is not None and "text/event-stream" in response.headers.get("content-type", "")
        self._core = core
        self._started = started
        self._body = body
        self._response = response
        self._slot = slot
        self._error = error
        self._complete = response is None
        self._closed = False
        self._aborted = False
        self._chunks: Iterator[bytes] | None = None
        self._meter = _Meter(self.stream, started)

    def __iter__(self) -> Iterator[bytes]:
        """The one iterator over the body: iterating again goes on where the last one stopped."""
        if self._chunks is None:
            self._chunks = self._read()
        return self._chunks

    def _read(self) -> Iterator[bytes]:
        if self._body is not None:
            body, self._body = self._body, None
            self._meter.feed(body, self._core.clock())
            yield body
            return
        if self._response is None or self._closed:
            return
        import httpx

        limits = self._core.limits
        deadline = self._started + limits.total_s
        more_waiting = _more_waiting(self._response)
        pending: list[bytes] = []
        size = 0
        try:
            for chunk in self._response.iter_raw():
                now = self._core.clock()
                if chunk:
                    self._meter.feed(chunk, now)
                    pending.append(chunk)
                    size += len(chunk)
                    # Bytes the server has already sent are read before this chunk goes out, so a
                    # burst leaves as one write instead of one per SSE event; a chunk never waits
                    # for bytes that have not arrived yet.
                    if size < COALESCE_BYTES and more_waiting():
                        continue
                    yield pending[0] if len(pending) == 1 else b"".join(pending)
                    pending, size = [], 0
                if now > deadline:
                    raise StreamBroken(f"the answer took longer than {limits.total_s:g} s")
            if pending:
                yield b"".join(pending)
            if self._aborted:  # the shutdown can read as a clean end of a close-delimited body
                self._error = "the request was cut by the relay (its room connection is gone)"
                raise StreamBroken(self._error)
            self._complete = True
        except httpx.TimeoutException:
            self._error = f"the server sent nothing for {limits.idle_s:g} s in the middle of an answer"
            raise StreamBroken(self._error) from None
        except httpx.HTTPError as exc:
            self._error = f"the server broke off the answer ({type(exc).__name__})"
            if self._aborted:
                self._error = "the request was cut by the relay (its room connection is gone)"
            raise StreamBroken(self._error) from None
        except StreamBroken as exc:
            self._error = exc.message
            raise

    def abort(self) -> None:
        """Cut the request from another thread (the tunnel it answers is gone): the server's
        connection is shut down, so the server stops generating and the iterating thread gets
        StreamBroken at once; that thread still calls `close()`. Idempotent."""
        sock = _upstream_socket(self._response) if self._response is not None else None
        if sock is None:
            return
        self._aborted = True
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        """End the request: release the server connection and the slot, count it, report it."""
        if self._closed:
            return
        self._closed = True
        if self._response is not None:
            self._response.close()
        if self._response is not None and not self._complete and self._error is None:
            self._error = "the answer was not read to the end (the room went away)"
        self._core._finish(self, self._meter, self._error, self._slot)

    def __enter__(self) -> Upstream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RelayCore:
    """Serves requests from the room through the local server at `endpoint`; thread-safe.

    `http` is the caller's httpx.Client for the local server only, never shared with the hub's (a
    pool full of long streams would hold up heartbeats): give it `max_concurrent + 1` connections,
    one more for `ping()`, and trust_env=False for a loopback server (no proxy in the path);
    `credentials` are headers added to every request (Authorization: Bearer KEY and --header ones).
    `on_request(event)` and `on_server_down()` are called on the request's thread: keep them quick.
    """

    def __init__(
        self,
        endpoint: str,
        http: httpx.Client,
        credentials: Mapping[str, str] | None = None,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        limits: RelayLimits | None = None,
        on_request: Callable[[dict[str, Any]], None] | None = None,
        on_server_down: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.endpoint = endpoint.rstrip("/")
        self.http = http
        self.max_concurrent = max_concurrent
        self.limits = limits or RelayLimits()
        self.on_request = on_request
        self.on_server_down = on_server_down
        self.clock = clock
        self._credentials = dict(credentials or {})
        self._lock = threading.Condition()
        self._traffic = Traffic()
        self._busy = 0
        self._accepting = True

    def __repr__(self) -> str:  # never the credentials
        return f"RelayCore({self.endpoint!r}, max_concurrent={self.max_concurrent})"

    @property
    def traffic(self) -> Traffic:
        """A copy of the counters."""
        with self._lock:
            return Traffic(**asdict(self._traffic))

    @property
    def accepting(self) -> bool:
        return self._accepting

    def open(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> Upstream:
        """Send one request from the room to the local server; returns once the response head is in.

        Never raises for a request's failure: a refused route, a full relay or a dead server come back
        as an Upstream with the JSON error (404, 405, 413, 429, 503 leaving, 502 down, 504 deadline).
        `path` includes any query string; `headers` are the room's, cleaned here.
        """
        started = self.clock()
        method = method.upper()
        route, allowed = match_route(method, path)
        if route is None:
            return self._refuse(
                404, "this participant serves only the OpenAI inference routes", path, started
            )
        if not allowed:
            return self._refuse(405, f"{method} is not allowed on {route}", route, started, method)
        if body is not None and len(body) > self.limits.max_body_bytes:
            limit_mib = self.limits.max_body_bytes >> 20
            return self._refuse(413, f"the request body is over {limit_mib} MiB", route, started, method)
        with self._lock:
            if not self._accepting:
                refused = (503, "this participant is leaving the room")
            elif self._busy >= self.max_concurrent:
                refused = (429, f"this participant is busy ({self.max_concurrent} requests at once)")
            else:
                refused = None
                self._busy += 1
                self._traffic.in_flight = self._busy
        if refused is not None:
            kind = "rate_limit" if refused[0] == 429 else "unavailable"
            return self._refuse(refused[0], refused[1], route, started, method, kind)
        try:
            return self._send(method, path, route, headers, body, started)
        except BaseException:
            with self._lock:
                self._release()
            raise

    def _send(
        self,
        method: str,
        path: str,
        route: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        body: bytes | None,
        started: float,
    ) -> Upstream:
        import httpx

        lim = self.limits
        timeout = httpx.Timeout(
            connect=lim.connect_s, read=lim.first_byte_s, write=lim.idle_s, pool=lim.idle_s
        )
        request = self.http.build_request(
            method,
            self.endpoint + path,
            headers=forward_headers(headers, self._credentials),
            content=body,
            timeout=timeout,
        )
        error: tuple[int, str, str] | None = None
        try:
            response = self.http.send(request, stream=True)
        except httpx.ConnectError:
            error = (502, f"the local LLM server at {self.endpoint} is not answering", "server_down")
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                error = (502, f"the local LLM server at {self.endpoint} is not answering", "server_down")
            else:
                error = (504, f"the local LLM server did not answer within {lim.first_byte_s:g} s", "timeout")
        except httpx.HTTPError as exc:
            error = (502, f"the local LLM server broke the connection ({type(exc).__name__})", "bad_gateway")
        if error is not None:
            status, message, kind = error
            if kind == "server_down":
                self._call(self.on_server_down)
            body_out = _json_error(status, message, kind)
            return Upstream(
                self,
                route,
                method,
                status,
                _json_headers(body_out),
                started,
                body=body_out,
                slot=True,
                error=message,
            )
        # The head is in: from now on the wait is between body chunks. httpcore reads the request's
        # "timeout" extension when the body read starts, so this sets the idle deadline for the body.
        timeouts = request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            timeouts["read"] = lim.idle_s
        out_headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _RESPONSE_DROP]
        return Upstream(
            self, route, method, response.status_code, out_headers, started, response=response, slot=True
        )

    def _refuse(
        self,
        status: int,
        message: str,
        route: str,
        started: float,
        method: str = "",
        kind: str = "invalid_request_error",
    ) -> Upstream:
        body = _json_error(status, message, kind)
        with self._lock:
            self._traffic.rejected += 1
        return Upstream(
            self, route if status != 404 else "other", method, status, _json_headers(body), started, body=body
        )

    def _release(self) -> None:
        self._busy -= 1
        self._traffic.in_flight = self._busy
        self._lock.notify_all()

    def _finish(self, up: Upstream, meter: _Meter, error: str | None, slot: bool) -> None:
        now = self.clock()
        tokens = meter.tokens()
        ttft_ms = None if meter.first_content is None else (meter.first_content - up._started) * 1000.0
        tps: float | None = None
        if tokens:
            # Streamed: the decode rate after the first token; else tokens over the whole answer.
            span = (meter.last_content or now) - (meter.first_content or up._started)
            if up.stream and tokens > 1 and span > 0:
                tps = (tokens - 1) / span
            elif now > up._started:
                tps = tokens / (now - up._started)
        failed = error is not None or (slot and up.status >= 500)
        with self._lock:
            if slot:
                self._release()
                if failed:
                    self._traffic.failed += 1
                    self._traffic.last_error = error or f"the local server answered HTTP {up.status}"
                else:
                    self._traffic.served += 1
                if ttft_ms is not None and not failed:
                    self._traffic.last_ttft_ms = round(ttft_ms, 1)
                if tps is not None and not failed:
                    self._traffic.last_tokens_per_s = round(tps, 1)
        if self.on_request is None:
            return
        event: dict[str, Any] = {
            "route": up.route,
            "method": up.method,
            "status": up.status,
            "stream": up.stream,
            "duration_ms": round((now - up._started) * 1000.0, 1),
            "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
            "tokens": tokens,
            "tokens_per_s": None if tps is None else round(tps, 1),
        }
        if error is not None:
            event["error"] = error
        self._call(self.on_request, event)

    def _call(self, callback: Callable[..., None] | None, *args: Any) -> None:
        """Run a callback; its failure must not cut a request, so it becomes `last_error`."""
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001
            with self._lock:
                self._traffic.last_error = f"a relay callback failed: {type(exc).__name__}: {exc}"

    def ping(self, timeout_s: float = 1.0) -> bool:
        """A cheap check that the local server answers (GET /v1/models with our credentials); not counted."""
        import httpx

        try:
            with self.http.stream(
                "GET",
                self.endpoint + "/v1/models",
                headers=dict(self._credentials),
                timeout=httpx.Timeout(timeout_s),
            ) as response:
                # Any answer but a 5xx (llama.cpp's 503 while loading) is a live server; a 401
                # is a wrong key, which pausing would not fix. The (small) answer is read, bounded,
                # so the connection goes back to the pool instead of being reset under the server.
                read = 0
                for piece in response.iter_raw():
                    read += len(piece)
                    if read > PING_READ_MAX_BYTES:
                        break
                return response.status_code < 500
        except httpx.PoolTimeout:
            # Every connection of the pool is one of our requests in flight: the server took them.
            return self.traffic.in_flight > 0
        except httpx.HTTPError:
            return False

    def stop_accepting(self) -> None:
        """From now on every new request is answered 503 (leaving); those in flight go on."""
        with self._lock:
            self._accepting = False

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the requests in flight to end; True when none is left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True


def _json_headers(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]


# -- the share relay: the HTTP server a v0.1 hub connects to ------------------------------------------

# A hub that opens a connection and sends nothing (or reads nothing) loses it after this.
SOCKET_TIMEOUT_S = 60.0


def _canonical_ip(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Several agents, or one restarted at once, must never share a port by accident.
    allow_reuse_address = False
    relay: ShareRelay
    conns: set[Any]
    conns_lock: threading.Lock

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silent: a hub that hangs up mid-answer is normal (the core counts it), never a traceback."""

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up every hub connection (idle keep-alive ones would otherwise serve on)."""
        import socket

        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive with the hub's connection pool
    server_version = "llmroom-relay"
    sys_version = ""
    disable_nagle_algorithm = True  # each chunk leaves at once
    timeout = SOCKET_TIMEOUT_S
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silent: a request line or header is never logged (credentials, prompts)."""

    def do_GET(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        self._relay()

    def do_PATCH(self) -> None:
        self._relay()

    def _plain(self, status: int, message: str, kind: str) -> None:
        body = _json_error(status, message, kind)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _relay(self) -> None:
        relay = self.server.relay
        if _canonical_ip(self.client_address[0]) not in relay.allowed_peers:
            self._plain(403, "this relay serves only the room's hub", "forbidden")
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._plain(411, "send the request body with a Content-Length", "invalid_request_error")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._plain(400, "bad Content-Length", "invalid_request_error")
            return
        if length > relay.core.limits.max_body_bytes:
            # Not read: the connection is closed instead (the body may be huge).
            self._plain(413, "the request body is too large", "invalid_request_error")
            return
        body = self.rfile.read(length) if length else None
        if body is not None and len(body) < length:
            self.close_connection = True
            return
        with relay.core.open(self.command, self.path, self.headers.items(), body) as up:
            self.send_response(up.status)
            # 204, 304 and 1xx carry no body, hence no framing (RFC 9112 6.3).
            sized = up.status in (204, 304) or up.status < 200
            for name, value in up.headers:
                if name.lower() == "content-length":
                    sized = True
                self.send_header(name, value)
            if not sized:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in up:
                    # http.server has no chunked writer; the framing is one line of RFC 9112 7.1.
                    self.wfile.write(chunk if sized else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if not sized:
                    self.wfile.write(b"0\r\n\r\n")
            except StreamBroken:
                self.close_connection = True  # a truncated answer must not look complete
            except OSError:
                self.close_connection = True  # the hub went away; close() reports it


class ShareRelay:
    """The relay a v0.1 hub connects to: `start()` -> its URL (to publish), `stop()`.

    `allowed_peers`: the addresses the hub connects from (its IP; loopback when it is on this
    machine); anyone else gets 403 and the connection is closed.
    """

    def __init__(self, core: RelayCore, bind_host: str, allowed_peers: Iterable[str], port: int = 0) -> None:
        self.core = core
        self.bind_host = bind_host
        self.port = port
        self.allowed_peers = frozenset(_canonical_ip(p) for p in allowed_peers)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"http://{host}:{self.port}"

    def start(self) -> str:
        """Bind and serve on a thread; returns the URL. OSError when the address cannot be bound."""
        import socket

        class Server(_Server):
            address_family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET

        server = Server((self.bind_host, self.port), _Handler)
        server.relay = self
        server.conns = set()
        server.conns_lock = threading.Lock()
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="llmroom-relay", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop listening and hang up on the hub: drain the core first (`stop_accepting`, `drain`),
        as a request still in flight is cut here."""
        if self._server is None:
            return
        import socket

        # serve_forever looks at its shutdown flag between selects (every 0.2 s when idle): set the
        # flag, then wake the select with a connection of our own, so leaving does not wait a whole
        # poll interval (SIGINT -> exit went from ~0.24 s to a few ms). The poke is answered like
        # any stranger (403) or just closed.
        self._server._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind_host, self.bind_host)
        with contextlib.suppress(OSError):
            socket.create_connection((host, self.port), timeout=0.2).close()
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> ShareRelay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
