"""HTTP plumbing: the one httpx.Client a process uses, and `exchange`, a request with a deadline for
the whole exchange and a cap on what it reads.

httpx's timeouts are per socket operation: a server that sends one byte a second never trips them. So
`exchange` runs a watchdog that shuts the connection's socket down when the deadline passes (a blocked
read then returns at once), and checks the clock and a byte cap between body chunks. The body is
read undecoded and decompressed here with a bound, so a small gzip bomb cannot grow past the cap.
"""

from __future__ import annotations

import heapq
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx


def make_http(*urls: str, connect_s: float = 2.0, read_s: float = 5.0) -> httpx.Client:
    """One pooled client with short timeouts; trust_env stays on so proxies set by the user apply.

    Building httpx's default SSL context loads certifi's bundle (about 30 ms in a fresh process). When
    every URL we will talk to is plain http://, a bare client-side context is passed instead: it costs
    nothing and, holding no CA certificates, fails closed if an https:// URL ever reaches it. So every
    URL the process may call (hub, endpoint, --advertise) must be passed here: any https:// one gets
    the normal verification (certifi's bundle, hostname checked).
    """
    verify: ssl.SSLContext | bool = True
    if urls and all(u.strip().lower().startswith("http://") for u in urls):
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    timeout = httpx.Timeout(connect=connect_s, read=read_s, write=read_s, pool=connect_s)
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=60.0)
    return httpx.Client(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)


class ExchangeTimeout(httpx.TimeoutException):
    """The whole exchange (connect, send, headers, body) took longer than its deadline."""


class AnswerTooLarge(httpx.DecodingError):
    """The answer's body (after decompression) is larger than the cap for its route."""


@dataclass
class Answer:
    """A complete, bounded answer: status, headers and the decoded body."""

    status_code: int
    headers: httpx.Headers
    content: bytes


class _Decoder:
    """identity, gzip or deflate, decompressed with a bound on the output (never more than `cap` + 1
    bytes are produced, however small the input)."""

    def __init__(self, encoding: str, cap: int) -> None:
        self.cap = cap
        enc = encoding.strip().lower()
        self.z: Any = None
        if enc in ("", "identity"):
            return
        if enc in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self.z = zlib.decompressobj()
        else:
            raise httpx.DecodingError(f"unsupported content encoding {encoding!r}")

    def feed(self, chunk: bytes, room: int) -> bytes:
        if self.z is None:
            return chunk
        try:
            out: bytes = self.z.decompress(self.z.unconsumed_tail + chunk, room + 1)
        except zlib.error as exc:
            raise httpx.DecodingError(f"the body is not valid compressed data: {exc}") from None
        return out

    def end(self, room: int) -> bytes:
        if self.z is None:
            return b""
        try:
            out: bytes = self.z.decompress(self.z.unconsumed_tail, room + 1)
            if len(out) <= room:
                out += self.z.flush()
        except zlib.error as exc:
            raise httpx.DecodingError(f"the body is not valid compressed data: {exc}") from None
        return out


class _Watchdog:
    """One daemon thread for every exchange's deadline (a thread per request would cost more than
    the request): `arm(when, action)` returns a handle; `disarm(handle)` before `when` cancels it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Any]] = []
        self._live: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, when: float, action: Any) -> int:
        with self._cond:
            self._next += 1
            handle = self._next
            heapq.heappush(self._heap, (when, handle, action))
            self._live.add(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmroom-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return handle

    def disarm(self, handle: int) -> None:
        with self._cond:
            self._live.discard(handle)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # disarmed: drop it
                if not self._heap:
                    self._cond.wait()
                    continue
                when, handle, action = self._heap[0]
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(handle)
            try:
                action()
            except Exception:  # a deadline's action must never end the watchdog
                pass


_watchdog = _Watchdog()


def exchange(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    json: Any = None,
    total_s: float,
    max_bytes: int,
) -> Answer:
    """One request whose whole exchange ends within `total_s` (else ExchangeTimeout) and whose body
    is at most `max_bytes` once decoded (else AnswerTooLarge); other failures are httpx's errors.

    The request asks for a fresh connection (`Connection: close`): the watchdog can only shut down a
    socket it saw being opened, and a hub call every few seconds does not need keep-alive.
    """
    deadline = time.monotonic() + total_s
    streams: list[Any] = []
    expired = threading.Event()
    lock = threading.Lock()

    def trace(event: str, info: dict[str, Any]) -> None:
        # The TCP socket, not the TLS wrapper: shutting the plain socket down also ends a TLS read.
        if event == "connection.connect_tcp.complete":
            with lock:
                streams.append(info.get("return_value"))
                late = expired.is_set()
            if late:
                _shut(streams)

    def expire() -> None:
        with lock:
            expired.set()
        _shut(streams)

    per_op = min(total_s, http.timeout.read or total_s)
    timeout = httpx.Timeout(per_op, connect=min(total_s, http.timeout.connect or total_s))
    headers = {"Connection": "close", "Accept-Encoding": "gzip, deflate"}
    armed = _watchdog.arm(deadline, expire)
    try:
        request = http.build_request(
            method, url, json=json, headers=headers, timeout=timeout, extensions={"trace": trace}
        )
        resp = http.send(request, stream=True)
        try:
            if resp.is_stream_consumed:  # a test transport that answered with a body already read
                if len(resp.content) > max_bytes:
                    raise AnswerTooLarge(f"the answer is larger than {_size(max_bytes)}")
                return Answer(resp.status_code, resp.headers, resp.content)
            decoder = _Decoder(resp.headers.get("content-encoding", ""), max_bytes)
            body = bytearray()
            for chunk in resp.iter_raw():
                if time.monotonic() > deadline or expired.is_set():
                    raise ExchangeTimeout(f"no complete answer within {total_s:g} s")
                body += decoder.feed(chunk, max_bytes - len(body))
                if len(body) > max_bytes:
                    raise AnswerTooLarge(f"the answer is larger than {_size(max_bytes)}")
            body += decoder.end(max_bytes - len(body))
            if len(body) > max_bytes:
                raise AnswerTooLarge(f"the answer is larger than {_size(max_bytes)}")
            return Answer(resp.status_code, resp.headers, bytes(body))
        finally:
            resp.close()
    except (ExchangeTimeout, AnswerTooLarge):
        raise
    except httpx.HTTPError as exc:
        if expired.is_set() or time.monotonic() > deadline:
            raise ExchangeTimeout(f"no complete answer within {total_s:g} s") from exc
        if isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException):
            worded = in_words(exc)
            if worded is not exc:
                raise worded from exc
        raise
    finally:
        _watchdog.disarm(armed)


def in_words(exc: httpx.TransportError) -> httpx.TransportError:
    """The same kind of httpx error with the OS error said in words ("nothing listens on
    127.0.0.1:3000" for "[Errno 111] Connection refused"), naming the far end from the request. The
    original stays the cause (raise the new one `from exc`), which `--debug` shows."""
    from llmroom_cli.errors import describe_os_error

    host: str | None = None
    port: int | None = None
    try:
        url = exc.request.url
        host = url.host or None
        port = url.port or (443 if url.scheme == "https" else 80)
    except RuntimeError:  # an error raised without its request
        pass
    words = describe_os_error(exc, host, port)
    if words == str(exc):
        return exc
    try:
        return type(exc)(words, request=exc.request)
    except (RuntimeError, TypeError):
        return type(exc)(words)


def _shut(streams: list[Any]) -> None:
    """Shut down the sockets under `streams`: a read blocked on one of them returns at once."""
    for stream in streams:
        try:
            sock = stream.get_extra_info("socket")
        except Exception:  # a stream of an unknown kind (a test transport): nothing to shut
            continue
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _size(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n >= 1 << 20 else f"{n // 1024} KiB"
