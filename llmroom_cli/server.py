"""The embedded hub: the Gambiarra hub HTTP API on the standard library, a thread per connection.

`start_hub()` runs one in background threads (tests bind port 0); `serve()` runs one in the foreground
for `llmroom serve`. All state lives in a `HubState` behind one lock that is never held during I/O.

The HTTP/1.1 layer is a lean one written on plain sockets rather than `http.server`: it parses only
the headers it needs, answers each request with one `sendall`, keeps connections alive, and always
reads (or refuses and closes on) a request body before answering, so a reused connection never sees
the rest of an unread body. See benchmarks/hub_load.py for what that buys.
"""

from __future__ import annotations

import _thread
import contextlib
import copy
import errno
import hashlib
import hmac
import http.client
import json
import math
import os
import queue
import random
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from llmroom_cli.errors import LlmroomError

MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 64 << 10
MAX_FIELD_CHARS = 256
MAX_URL_CHARS = 2048
MAX_NESTING = 32
SSE_QUEUE_EVENTS = 1024
# A connection idle this long between requests is closed (it holds a thread).
IDLE_TIMEOUT_S = 120.0
UPSTREAM_CONNECT_S = 10.0
UPSTREAM_READ_S = 600.0

JSON_TYPE = "application/json;charset=utf-8"
CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
MISSING_JOIN_FIELDS = "Missing required fields: id, nickname, model, endpoint"
NO_PARTICIPANT = "No available participant for the requested model"

_REASONS = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
_CORS = (
    b"Access-Control-Allow-Origin: *\r\n"
    b"Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS\r\n"
    b"Access-Control-Allow-Headers: Content-Type, Authorization\r\n"
)


class ListenError(LlmroomError):
    """`llmroom serve` cannot listen on this host and port (bad address, no permission ...)."""


class PortInUse(ListenError):
    """Another process already listens on this port."""


# -- state ------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _nanoid(size: int = 21) -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(size))


def _hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)
    return salt, digest


class _Participant:
    __slots__ = ("id", "nickname", "model", "endpoint", "specs", "config", "status", "joined_at", "seen")

    def __init__(self, body: dict[str, Any], now_ms: int) -> None:
        self.id: str = body["id"]
        self.nickname: str = body["nickname"]
        self.model: str = body["model"]
        self.endpoint: str = body["endpoint"]
        self.specs: Any = body.get("specs")
        self.config: Any = body.get("config")
        self.status = "online"
        self.joined_at = now_ms
        self.seen = (now_ms, time.monotonic())  # (lastSeen on the wire, monotonic for the sweep)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "nickname": self.nickname,
            "model": self.model,
            "endpoint": self.endpoint,
        }
        if self.specs is not None:
            out["specs"] = self.specs
        if self.config is not None:
            out["config"] = self.config
        out["status"] = self.status
        out["joinedAt"] = self.joined_at
        out["lastSeen"] = self.seen[0]
        return out


class _Room:
    __slots__ = ("id", "code", "name", "host_id", "created_at", "secret", "participants")

    def __init__(self, code: str, name: str, secret: tuple[bytes, bytes] | None) -> None:
        self.id = _nanoid()
        self.code = code
        self.name = name
        self.host_id = _nanoid()
        self.created_at = _now_ms()
        self.secret = secret  # (salt, scrypt digest) or None; never leaves this object
        self.participants: dict[str, _Participant] = {}

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "name": self.name,
            "hostId": self.host_id,
            "createdAt": self.created_at,
        }


class _Listener:
    """One `GET /rooms/:code/events` client: a bounded queue of encoded events (None ends it)."""

    __slots__ = ("code", "queue")

    def __init__(self, code: str) -> None:
        self.code = code
        self.queue: queue.Queue[bytes | None] = queue.Queue(SSE_QUEUE_EVENTS)

    def offer(self, item: bytes | None) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            return False


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()


class HubState:
    """Every room, participant and event listener of a hub, behind one lock held only for bookkeeping."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._rooms: dict[str, _Room] = {}
        self._listeners: set[_Listener] = set()

    # -- the public API (the HTTP routes and tests call these) --------------------------------------

    def create_room(self, name: str, password: str | None = None) -> dict[str, Any]:
        """Create a room and return its public dict (`id, code, name, hostId, createdAt`)."""
        secret = _hash_password(password) if password else None  # slow on purpose: outside the lock
        with self.lock:
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))
            while code in self._rooms:
                code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))
            room = _Room(code, name, secret)
            self._rooms[code] = room
            public = room.wire()
            self._broadcast(None, _sse("room:created", public))
        return public

    def delete_room(self, code: str) -> bool:
        """Remove a room: its participants' next health check gets 404 `Room not found`."""
        with self.lock:
            room = self._rooms.pop(code.upper(), None)
            if room is None:
                return False
            for listener in [li for li in self._listeners if li.code == room.code]:
                self._drop(listener)
        return True

    def forget_participant(self, code: str, participant_id: str) -> bool:
        """Forget one participant silently: its next health check gets 404 `Participant not found`."""
        with self.lock:
            room = self._rooms.get(code.upper())
            return room is not None and room.participants.pop(participant_id, None) is not None

    def participants(self, code: str) -> list[dict[str, Any]]:
        """Copies of a room's participants in join order; KeyError when there is no such room."""
        with self.lock:
            listed = [p.wire() for p in self._rooms[code.upper()].participants.values()]
        return copy.deepcopy(listed)

    def clear(self) -> None:
        """Forget every room, like a restarted hub."""
        with self.lock:
            self._rooms.clear()
            for listener in list(self._listeners):
                self._drop(listener)

    # -- used by the routes ---------------------------------------------------------------------------

    def rooms(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{**r.wire(), "participantCount": len(r.participants)} for r in self._rooms.values()]

    def room_secret(self, code: str) -> tuple[bool, tuple[bytes, bytes] | None]:
        """(room exists, its password secret) without holding the lock while a caller hashes."""
        with self.lock:
            room = self._rooms.get(code)
            return (room is not None, room.secret if room is not None else None)

    def join(self, code: str, body: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
        """Add or replace (same `id`, same place in the list) a participant; None if no room."""
        with self.lock:
            room = self._rooms.get(code)
            if room is None:
                return None
            p = _Participant(body, _now_ms())
            room.participants[p.id] = p  # a dict keeps an existing key's position: the upsert rule
            wire = p.wire()
            self._broadcast(room.code, _sse("participant:joined", wire))
            return wire, room.id

    def leave(self, code: str, participant_id: str) -> str | None:
        """None when done, else the error message."""
        with self.lock:
            room = self._rooms.get(code)
            if room is None:
                return "Room not found"
            if room.participants.pop(participant_id, None) is None:
                return "Participant not found"
            self._broadcast(room.code, _sse("participant:left", {"participantId": participant_id}))
            return None

    def health(self, code: str, participant_id: str) -> str | None:
        """Record a health check (back online at once); None when done, else the error message."""
        with self.lock:
            room = self._rooms.get(code)
            if room is None:
                return "Room not found"
            p = room.participants.get(participant_id)
            if p is None:
                return "Participant not found"
            p.seen = (_now_ms(), time.monotonic())
            p.status = "online"
            return None

    def participants_wire(self, code: str) -> list[dict[str, Any]] | None:
        with self.lock:
            room = self._rooms.get(code)
            return None if room is None else [p.wire() for p in room.participants.values()]

    def models(self, code: str) -> list[dict[str, Any]] | None:
        with self.lock:
            room = self._rooms.get(code)
            if room is None:
                return None
            return [
                {
                    "id": p.id,
                    "object": "model",
                    "created": p.joined_at // 1000,
                    "owned_by": p.nickname,
                    "gambiarra": {"nickname": p.nickname, "model": p.model, "endpoint": p.endpoint},
                }
                for p in room.participants.values()
                if p.status == "online"
            ]

    def route(self, code: str, wanted: str) -> tuple[int, str, tuple[str, str, str] | None]:
        """Pick the participant for a chat request: (status, error, (id, model, endpoint))."""
        with self.lock:
            room = self._rooms.get(code)
            if room is None:
                return 404, "Room not found", None
            online = [p for p in room.participants.values() if p.status == "online"]
            chosen: _Participant | None = None
            if wanted in ("*", "any"):
                chosen = random.choice(online) if online else None
            elif wanted.startswith("model:"):
                chosen = next((p for p in online if p.model == wanted[6:]), None)
            else:
                by_id = room.participants.get(wanted)
                if by_id is not None and by_id.status != "online":
                    return 503, "Participant is offline", None
                chosen = by_id or next((p for p in online if p.model == wanted), None)
            if chosen is None:
                return 404, NO_PARTICIPANT, None
            return 200, "", (chosen.id, chosen.model, chosen.endpoint)

    def sweep(self, timeout_s: float) -> int:
        """Mark participants silent for more than `timeout_s` offline; returns how many."""
        now = time.monotonic()
        marked = 0
        with self.lock:
            for room in self._rooms.values():
                for p in room.participants.values():
                    if p.status == "online" and now - p.seen[1] > timeout_s:
                        p.status = "offline"
                        marked += 1
                        self._broadcast(room.code, _sse("participant:offline", {"participantId": p.id}))
        return marked

    def emit(self, code: str, event: str, data: Any) -> None:
        payload = _sse(event, data)
        with self.lock:
            self._broadcast(code, payload)

    def subscribe(self, code: str) -> _Listener | None:
        with self.lock:
            if code not in self._rooms:
                return None
            listener = _Listener(code)
            self._listeners.add(listener)
            return listener

    def unsubscribe(self, listener: _Listener) -> None:
        with self.lock:
            self._listeners.discard(listener)

    # -- under the lock -------------------------------------------------------------------------------

    def _broadcast(self, code: str | None, payload: bytes) -> None:
        for listener in list(self._listeners):
            if (code is None or listener.code == code) and not listener.offer(payload):
                self._drop(listener)  # too slow to follow: it is cut off rather than buffered forever

    def _drop(self, listener: _Listener) -> None:
        self._listeners.discard(listener)
        while not listener.offer(None):
            with contextlib.suppress(queue.Empty):
                listener.queue.get_nowait()


# -- request validation -----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads/dumps with keyword arguments build a new decoder/encoder on every call.
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)
# ensure_ascii keeps lone surrogates from the input encodable; compact separators like JSON.stringify.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _BadRequest(400, "Invalid JSON body") from None
    if not isinstance(data, dict):
        raise _BadRequest(400, "Request body must be a JSON object")
    return data


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_NESTING:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _string(data: dict[str, Any], key: str, limit: int = MAX_FIELD_CHARS) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadRequest(400, f"Field '{key}' must be a string")
    if len(value) > limit:
        raise _BadRequest(400, f"Field '{key}' is too long (at most {limit} characters)")
    return value


def _check_endpoint(url: str) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok or not url.isprintable() or any(c.isspace() for c in url):
        raise _BadRequest(400, "Field 'endpoint' must be an http:// or https:// URL")


def _validate_join(data: dict[str, Any]) -> None:
    fields = ("id", "nickname", "model", "endpoint")
    if any(data.get(k) is None or data.get(k) == "" for k in fields):
        raise _BadRequest(400, MISSING_JOIN_FIELDS)
    for key in fields:
        value = _string(data, key, MAX_URL_CHARS if key == "endpoint" else MAX_FIELD_CHARS)
        if value is not None and not value.strip():
            raise _BadRequest(400, MISSING_JOIN_FIELDS)
    _check_endpoint(data["endpoint"])
    for key in ("specs", "config"):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise _BadRequest(400, f"Field '{key}' must be an object")
        if value is not None and _depth(value) > MAX_NESTING:
            raise _BadRequest(400, f"Field '{key}' is nested too deeply")
    _string(data, "password", MAX_URL_CHARS)


# -- HTTP -------------------------------------------------------------------------------------------


def _dumps(data: Any) -> str:
    return _ENCODER.encode(data)


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        text = (
            f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
        )
        _date_cache = (now, b"Date: " + text.encode() + b"\r\n")
    return _date_cache[1]


def _head(status: int, headers: bytes) -> bytes:
    reason = _REASONS.get(status, b"Unknown")
    return b"HTTP/1.1 %d %s\r\n%s%s" % (status, reason, _http_date(), headers)


def _response(status: int, body: bytes, ctype: str = JSON_TYPE, close: bool = False) -> bytes:
    headers = b"Content-Type: %s\r\nContent-Length: %d\r\nAccess-Control-Allow-Origin: *\r\n%s\r\n" % (
        ctype.encode("latin-1"),
        len(body),
        b"Connection: close\r\n" if close else b"",
    )
    return _head(status, headers) + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Closed(Exception):
    """The peer went away, or the hub is stopping."""


class _Request:
    __slots__ = ("method", "target", "path", "keep_alive", "body", "started")

    def __init__(self, method: str, target: str, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.keep_alive = keep_alive
        self.body = b""
        self.started = time.perf_counter()


_ROUTES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("health",): ("GET",),
    ("rooms",): ("GET", "POST"),
    ("rooms", "*", "join"): ("POST",),
    ("rooms", "*", "leave", "*"): ("DELETE",),
    ("rooms", "*", "health"): ("POST",),
    ("rooms", "*", "participants"): ("GET",),
    ("rooms", "*", "v1", "models"): ("GET",),
    ("rooms", "*", "v1", "chat", "completions"): ("POST",),
    ("rooms", "*", "events"): ("GET",),
}


def _shape(segs: list[str]) -> tuple[str, ...]:
    if segs and segs[0] == "rooms" and len(segs) >= 3:
        shape = ["rooms", "*", *segs[2:]]
        if len(segs) == 4 and segs[2] == "leave":
            shape[3] = "*"
        return tuple(shape)
    return tuple(segs)


class _Connection:
    """One accepted socket, served by its own thread: requests in order until either side closes."""

    def __init__(self, hub: RunningHub, sock: socket.socket) -> None:
        self.hub = hub
        self.sock = sock
        self.buf = bytearray()
        self.upstream: socket.socket | None = None

    def run(self) -> None:
        try:
            self.sock.settimeout(IDLE_TIMEOUT_S)
            while not self.hub._stopping.is_set():
                if not self._one():
                    break
        except (_Closed, OSError):
            pass
        except Exception as exc:  # a bug outside any one request: log it, drop only this connection
            self.hub._log_line(f"connection error: {exc!r}")
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.hub._forget(self)

    # -- reading --------------------------------------------------------------------------------------

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        return data

    def _read_head(self) -> bytes | None:
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end > MAX_HEAD_BYTES:
                raise _BadRequest(431, "Request headers too large")
            if end >= 0:
                head = bytes(buf[:end])
                del buf[: end + 4]
                return head
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "Request headers too large")
            start = max(0, len(buf) - 3)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            buf += data

    def _read_exact(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            buf += self._recv()
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _read_line(self) -> bytes:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n")
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 2]
                return line
            if len(buf) > 4096:
                raise _BadRequest(400, "Malformed chunked body")
            buf += self._recv()

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(400, "Malformed chunked body") from None
            if size < 0 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                raise _BadRequest(400, "Malformed chunked body")
            if size == 0:
                while self._read_line():  # trailers, up to the blank line
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise _BadRequest(413, f"Request body too large (at most {MAX_BODY_BYTES} bytes)")
            body += self._read_exact(size)
            if self._read_line():
                raise _BadRequest(400, "Malformed chunked body")

    def _parse(self, head: bytes) -> tuple[_Request, int, bool]:
        """(request, content length or -1 for chunked, expects 100-continue)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
            raise _BadRequest(400, "Bad request")
        method = parts[0].decode("ascii")
        target = parts[1].decode("latin-1")
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        elif not target.startswith("/") and target != "*":
            raise _BadRequest(400, "Bad request")
        length = 0
        lengths: set[bytes] = set()
        chunked = expect = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "Bad request")
            key = name.lower()
            if key == b"content-length":
                lengths.add(value.strip())
            elif key == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    raise _BadRequest(501, "Unsupported transfer encoding")
                chunked = True
            elif key == b"connection":
                connection += b"," + value.lower()
            elif key == b"expect":
                expect = value.strip().lower() == b"100-continue"
        if lengths:
            text = lengths.pop()
            if lengths or chunked or not text.isdigit() or len(text) > 18:
                raise _BadRequest(400, "Bad Content-Length")
            length = int(text)
        tokens = {t.strip() for t in connection.split(b",")}
        keep = b"close" not in tokens if parts[2] == b"HTTP/1.1" else False
        return _Request(method, target, keep), (-1 if chunked else length), expect

    def _one(self) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            head = self._read_head()
        except _BadRequest as exc:
            self._send(_response(exc.status, _error(exc.message), close=True))
            return False
        if head is None:
            return False
        if not head:  # stray CRLFs between requests are allowed
            return True
        try:
            req, length, expect = self._parse(head)
        except _BadRequest as exc:
            self._send(_response(exc.status, _error(exc.message), close=True))
            return False
        with self.hub._guard:
            self.hub._seen += 1
        try:
            if length > MAX_BODY_BYTES:
                raise _BadRequest(413, f"Request body too large (at most {MAX_BODY_BYTES} bytes)")
            if expect and length != 0:
                self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.body = self._read_chunked() if length < 0 else self._read_exact(length) if length else b""
        except _BadRequest as exc:
            self._finish(req, exc.status, _response(exc.status, _error(exc.message), close=True), True)
            self._linger()
            return False
        except TimeoutError:
            return False
        self.hub._obey_fault()
        if self.hub._stopping.is_set():
            return False
        fault = self.hub.fault
        if fault == "500":
            return self._finish(req, 500, _response(500, b'{"error":"boom"}', close=not req.keep_alive))
        if fault == "html":
            page = b"<html><body><h1>It works!</h1></body></html>"
            return self._finish(req, 200, _response(200, page, "text/html", close=not req.keep_alive))
        try:
            return self._dispatch(req)
        except _BadRequest as exc:  # the body was read whole: the connection stays usable
            return self._err(req, exc.status, exc.message)
        except (_Closed, OSError):
            raise
        except Exception as exc:  # a bug: answer like a server, keep the hub up, say it in the log
            self.hub._log_line(f"internal error on {req.method} {_printable(req.path)}: {exc!r}")
            return self._finish(req, 500, _response(500, _error("Internal server error"), close=True), True)

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _finish(self, req: _Request, status: int, data: bytes, close: bool = False) -> bool:
        """Send one whole response; True when the connection stays open for the next request."""
        if req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        self._send(data)
        self.hub._log_request(req, status)
        return req.keep_alive and not close

    def _linger(self) -> None:
        """After refusing a body: stop writing, then discard what the client still sends (for a
        while), so closing does not reset the connection before the client has read the answer."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(1.0)
            budget = 8 * MAX_BODY_BYTES
            deadline = time.monotonic() + 2.0
            while budget > 0 and time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    break
                budget -= len(data)

    # -- routes ---------------------------------------------------------------------------------------

    def _json(self, req: _Request, status: int, data: Any) -> bool:
        body = _dumps(data).encode()
        return self._finish(req, status, _response(status, body, close=not req.keep_alive))

    def _err(self, req: _Request, status: int, message: str) -> bool:
        return self._finish(req, status, _response(status, _error(message), close=not req.keep_alive))

    def _dispatch(self, req: _Request) -> bool:
        state = self.hub.state
        if req.method == "OPTIONS":
            data = _head(204, _CORS + (b"Connection: close\r\n\r\n" if not req.keep_alive else b"\r\n"))
            return self._finish(req, 204, data)
        raw = req.path.split("/")[1:]
        if len(raw) > 1 and raw[-1] == "":
            raw.pop()  # one trailing slash is forgiven
        segs = [unquote(s, errors="replace") if "%" in s else s for s in raw]
        shape = _shape(segs)
        allowed = _ROUTES.get(shape)
        if allowed is None:
            return self._err(req, 404, "Not found")
        if req.method not in allowed:
            data = _response(405, _error("Method not allowed"), close=not req.keep_alive)
            allow = b"Allow: " + ", ".join((*allowed, "OPTIONS")).encode() + b"\r\n"
            return self._finish(req, 405, data.replace(b"\r\n", b"\r\n" + allow, 1))
        code = segs[1].upper() if len(segs) > 1 else ""
        route = shape[2:] if len(shape) > 2 else shape
        if shape == ("health",):
            return self._json(req, 200, {"status": "ok", "timestamp": _now_ms()})
        if shape == ("rooms",):
            if req.method == "GET":
                return self._json(req, 200, {"rooms": state.rooms()})
            return self._create_room(req)
        if route == ("health",):
            try:
                pid = _string(_json_object(req.body), "id")
                if not pid:
                    raise _BadRequest(400, "Participant ID is required")
            except _BadRequest:
                if not state.room_secret(code)[0]:  # the room is checked first, as on the reference
                    return self._err(req, 404, "Room not found")
                raise
            problem = state.health(code, pid)
            return self._err(req, 404, problem) if problem else self._json(req, 200, {"success": True})
        if route == ("join",):
            return self._join(req, code)
        if route[0] == "leave":
            problem = state.leave(code, segs[3])
            return self._err(req, 404, problem) if problem else self._json(req, 200, {"success": True})
        if route == ("participants",):
            parts = state.participants_wire(code)
            if parts is None:
                return self._err(req, 404, "Room not found")
            return self._json(req, 200, {"participants": parts})
        if route == ("v1", "models"):
            models = state.models(code)
            if models is None:
                return self._err(req, 404, "Room not found")
            return self._json(req, 200, {"object": "list", "data": models})
        if route == ("events",):
            return self._events(req, code)
        return self._chat(req, code)

    def _create_room(self, req: _Request) -> bool:
        data = _json_object(req.body)
        name = _string(data, "name")
        if not name or not name.strip():
            raise _BadRequest(400, "Name is required")
        password = _string(data, "password", MAX_URL_CHARS)
        room = self.hub.state.create_room(name, password or None)
        return self._json(req, 201, {"room": room, "hostId": room["hostId"]})

    def _join(self, req: _Request, code: str) -> bool:
        state = self.hub.state
        exists, secret = state.room_secret(code)
        if not exists:
            return self._err(req, 404, "Room not found")
        data = _json_object(req.body)
        _validate_join(data)
        if secret is not None:
            given = data.get("password")
            digest = _hash_password(given, secret[0])[1] if isinstance(given, str) and given else b""
            if not hmac.compare_digest(digest, secret[1]):
                return self._err(req, 401, "Invalid password")
        joined = state.join(code, data)
        if joined is None:  # deleted while the password was being checked
            return self._err(req, 404, "Room not found")
        participant, room_id = joined
        return self._json(req, 201, {"participant": participant, "roomId": room_id})

    def _events(self, req: _Request, code: str) -> bool:
        state = self.hub.state
        listener = state.subscribe(code)
        if listener is None:
            return self._err(req, 404, "Room not found")
        self.hub._add_listener(listener)
        status = 200
        try:
            headers = (
                b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Access-Control-Allow-Origin: *\r\nX-Accel-Buffering: no\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            self._send(_head(200, headers) + _chunk(_sse("connected", {"clientId": _nanoid()})))
            while True:
                try:
                    item = listener.queue.get(timeout=self.hub.keepalive_s)
                except queue.Empty:
                    item = b": keepalive\n\n"
                if item is None:
                    break
                self._send(_chunk(item))
            self._send(b"0\r\n\r\n")
        except OSError:
            status = 499
            raise
        finally:
            state.unsubscribe(listener)
            self.hub._remove_listener(listener)
            self.hub._log_request(req, status)
        return False

    def _chat(self, req: _Request, code: str) -> bool:
        state = self.hub.state
        exists, _ = state.room_secret(code)
        if not exists:
            return self._err(req, 404, "Room not found")
        data = _json_object(req.body)
        wanted = data.get("model")
        if wanted is not None and not isinstance(wanted, str):
            raise _BadRequest(400, "Field 'model' must be a string")
        status, message, target = state.route(code, wanted or "")
        if target is None:
            return self._err(req, status, message)
        pid, model, endpoint = target
        data["model"] = model
        stream = data.get("stream") is True
        state.emit(code, "llm:request", {"participantId": pid, "model": model})
        try:
            conn, resp = self._forward(endpoint, _dumps(data).encode(), stream)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            state.emit(code, "llm:error", {"participantId": pid, "error": reason})
            return self._err(req, 502, f"Failed to proxy request: {reason}")
        try:
            return self._relay(req, code, pid, resp, stream)
        finally:
            self.upstream = None
            conn.close()

    def _forward(
        self, endpoint: str, body: bytes, stream: bool
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        url = urlsplit(endpoint)
        host, port = url.hostname or "", url.port
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            import ssl

            context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=UPSTREAM_CONNECT_S, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=UPSTREAM_CONNECT_S)
        try:
            conn.connect()
            assert conn.sock is not None
            self.upstream = conn.sock
            if self.hub._stopping.is_set():
                raise ConnectionAbortedError("the hub is stopping")
            conn.sock.settimeout(UPSTREAM_READ_S)
            path = url.path.rstrip("/") + "/v1/chat/completions"
            headers = {
                "Content-Type": "application/json",
                "Accept": "text/event-stream" if stream else "application/json",
            }
            conn.request("POST", path, body=body, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            self.upstream = None
            conn.close()
            raise

    def _relay(
        self, req: _Request, code: str, pid: str, resp: http.client.HTTPResponse, stream: bool
    ) -> bool:
        state = self.hub.state
        status = resp.status if 200 <= resp.status <= 599 else 502
        if not (stream and 200 <= status < 300):
            try:
                payload = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                reason = str(exc) or type(exc).__name__
                state.emit(code, "llm:error", {"participantId": pid, "error": reason})
                return self._err(req, 502, f"Failed to proxy request: {reason}")
            ctype = resp.getheader("Content-Type") or JSON_TYPE
            return self._finish(req, status, _response(status, payload, ctype, close=not req.keep_alive))
        headers = (
            b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Access-Control-Allow-Origin: *\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n"
        )
        self._send(_head(status, headers + (b"\r\n" if req.keep_alive else b"Connection: close\r\n\r\n")))
        while True:
            try:
                piece = resp.read1(65536)
            except (OSError, http.client.HTTPException) as exc:
                # The status line is gone already: cut the connection so the client sees a broken stream.
                reason = str(exc) or type(exc).__name__
                state.emit(code, "llm:error", {"participantId": pid, "error": reason})
                self.hub._log_request(req, status)
                return False
            if not piece:
                break
            self._send(_chunk(piece))
        self._send(b"0\r\n\r\n")
        self.hub._log_request(req, status)
        return req.keep_alive


def _error(message: str) -> bytes:
    return _dumps({"error": message}).encode()


def _printable(path: str) -> str:
    if path.isascii() and path.isprintable():
        return path
    return "".join(c if c.isascii() and c.isprintable() else f"%{ord(c):02X}" for c in path)


# -- running it -------------------------------------------------------------------------------------


class RunningHub:
    """A hub serving in background threads; `stop()` (or leaving the `with` block) shuts it down."""

    def __init__(
        self,
        lsock: socket.socket,
        state: HubState,
        participant_timeout_s: float,
        quiet: bool,
        log: Callable[[str], None] | None,
    ) -> None:
        addr = lsock.getsockname()
        self.host: str = addr[0]
        self.port: int = addr[1]
        self.url = (
            f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"
        )
        self.state = state
        self.participant_timeout_s = participant_timeout_s
        self.keepalive_s = 15.0  # how often an idle event stream sends `: keepalive` (finds dead clients)
        self.quiet = quiet
        self._log = log or _stderr_line
        self._fault: str | None = None
        self._fault_cond = threading.Condition()
        self._frozen = 0
        self._seen = 0
        self._stopping = threading.Event()
        self._stopped = False
        self._lsock = lsock
        self._wake_r, self._wake_w = socket.socketpair()
        self._conns: set[_Connection] = set()
        self._listeners: set[_Listener] = set()
        self._guard = threading.Lock()
        self._drained = threading.Condition(self._guard)
        self._acceptor = threading.Thread(target=self._accept_loop, name="llmroom-hub-accept", daemon=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="llmroom-hub-sweep", daemon=True)
        self._acceptor.start()
        self._sweeper.start()

    # -- test hooks -----------------------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        """None, "freeze", "500", "html" or "slow:<seconds>": how every request is answered."""
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        with self._fault_cond:
            self._fault = value
            self._fault_cond.notify_all()

    def frozen_requests(self) -> int:
        """How many requests are held by the "freeze" fault right now."""
        with self._fault_cond:
            return self._frozen

    def requests_seen(self) -> int:
        """How many requests (well-formed request heads) this hub has received since it started."""
        with self._guard:
            return self._seen

    # -- lifecycle ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Close the listening socket and every connection (frozen and event streams too); idempotent."""
        with self._guard:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._acceptor.join(timeout=5)
        with self._fault_cond:
            self._fault_cond.notify_all()
        with self._guard:
            conns = set(self._conns)
            listeners = list(self._listeners)
        for listener in listeners:
            listener.offer(None)
        for conn in conns:
            for sock in (conn.sock, conn.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        with self._drained:
            self._drained.wait_for(lambda: not self._conns, timeout=5)
        self._sweeper.join(timeout=5)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> RunningHub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- threads --------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        lsock = self._lsock
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(lsock, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    for key, _ in sel.select():
                        if key.fileobj is self._wake_r:
                            return
                        self._accept_all(lsock)
        finally:
            lsock.close()

    def _accept_all(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._stopping.wait(0.05)  # out of descriptors: back off instead of spinning
                return
            sock.setblocking(True)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            with self._guard:
                self._conns.add(conn)
            # A bare thread: threading.Thread.start() waits for the new thread to signal that it
            # runs, which serialises accepts (a quarter of a `Connection: close` request's cost, see
            # benchmarks/RESULTS.md). stop() waits for `_conns` to drain instead of joining threads.
            try:
                _thread.start_new_thread(conn.run, ())
            except RuntimeError:  # no more threads: refuse this connection, keep accepting
                sock.close()
                self._forget(conn)

    def _sweep_loop(self) -> None:
        every = max(0.01, min(10.0, self.participant_timeout_s / 2))
        while not self._stopping.wait(every):
            self.state.sweep(self.participant_timeout_s)

    def _forget(self, conn: _Connection) -> None:
        with self._guard:
            self._conns.discard(conn)
            if not self._conns:
                self._drained.notify_all()

    def _add_listener(self, listener: _Listener) -> None:
        with self._guard:
            self._listeners.add(listener)
        if self._stopping.is_set():
            listener.offer(None)

    def _remove_listener(self, listener: _Listener) -> None:
        with self._guard:
            self._listeners.discard(listener)

    def _obey_fault(self) -> None:
        fault = self._fault
        if fault is None:
            return
        if fault == "freeze":
            with self._fault_cond:
                self._frozen += 1
                try:
                    while self._fault == "freeze" and not self._stopping.is_set():
                        self._fault_cond.wait()
                finally:
                    self._frozen -= 1
        elif fault.startswith("slow:"):
            try:
                delay = float(fault[5:])
            except ValueError:
                delay = 0.0
            self._stopping.wait(max(0.0, delay))

    def _log_request(self, req: _Request, status: int) -> None:
        if not self.quiet:
            ms = (time.perf_counter() - req.started) * 1000
            self._log_line(f"{req.method} {_printable(req.path)} {status} {ms:.1f}ms")

    def _log_line(self, line: str) -> None:
        with contextlib.suppress(Exception):
            self._log(f"{time.strftime('%H:%M:%S')} {line}")


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc}", "check --host") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "nt":  # SO_REUSEADDR on Windows lets another process steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:  # restart on the same port at once, whatever is left in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is already in use on {host}", "pick another with --port") from None
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", "check --host and --port"
        ) from None
    return sock


def start_hub(
    host: str = "127.0.0.1",
    port: int = 0,
    participant_timeout_s: float = 30.0,
    quiet: bool = True,
    state: HubState | None = None,
    log: Callable[[str], None] | None = None,
) -> RunningHub:
    """Start a hub in background threads and return once it listens (port 0 picks a free port).

    Pass the `state` of a stopped hub to bring it back with its rooms; omit it for a restarted hub.
    """
    lsock = _listen(host, port)
    return RunningHub(lsock, state if state is not None else HubState(), participant_timeout_s, quiet, log)


def serve(
    host: str,
    port: int,
    participant_timeout_s: float,
    quiet: bool,
    on_ready: Callable[[RunningHub], Callable[[], None] | None] | None = None,
) -> int:
    """Run a hub in the foreground until SIGINT or SIGTERM; returns the exit code (0).

    `on_ready(hub)` runs once the hub listens (`serve --mdns` announces it there) and may return a
    cleanup, which runs before the hub stops."""
    hub = start_hub(host, port, participant_timeout_s, quiet)
    cleanup: Callable[[], None] | None = None
    done = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # SIGHUP (a closed terminal) stops it cleanly too, where the platform has it.
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
            previous[sig] = signal.signal(sig, handle)
    try:
        _stderr_line(f"llmroom hub listening on {hub.url} (Ctrl-C to stop)")
        if on_ready is not None:
            cleanup = on_ready(hub)
        while not done.wait(0.5):
            pass
    finally:
        if cleanup is not None:
            cleanup()
        hub.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0
