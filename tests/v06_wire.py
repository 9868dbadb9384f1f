"""A test-side Gambi v0.6 client built from the wire recordings (tests/fixtures/gambi-v06/).

Independent of llmroom's own client code, so that hub tests check the wire format from the other side:
- `Mgmt`: the `/v1` management API over httpx, with envelope checks (`data` or `error`, `meta.requestId`);
- `TunnelPeer`: a participant's tunnel on the `websockets` sync client: sends ping/start/chunk/end/error
  frames (text or binary), receives `tunnel.request`s, records every frame and the close code/reason;
- `Inference`: a tiny OpenAI-ish client for `/rooms/:code/v1/chat/completions` and `/v1/responses`,
  streamed and not, with an SSE reader for `/v1/rooms/:code/events`.

Every call has a deadline for the whole exchange (`timeout_s`); nothing here retries.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

TIMEOUT_S = 10.0
JSON_TYPE = "application/json;charset=utf-8"
PARTICIPANT = {
    "nickname": "py-probe",
    "model": "fake-model",
    "endpoint": "http://127.0.0.1:40111",
    "specs": {"cpu": "Test CPU", "ram": 16},
    "config": {"temperature": 0.7, "instructions": "You are a test."},
    "capabilities": {"openResponses": "supported", "chatCompletions": "supported"},
}


@dataclass
class Answer:
    """One HTTP answer: status, headers, raw body, and the parsed JSON when it is JSON."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def data(self) -> Any:
        """The `data` of a success envelope (asserts the envelope's shape)."""
        doc = self.json()
        assert set(doc) == {"data", "meta"}, doc
        _check_request_id(doc)
        return doc["data"]

    @property
    def error(self) -> dict[str, Any]:
        """The `error` of an error envelope (asserts its shape: code, message, optional hint/details)."""
        doc = self.json()
        assert set(doc) == {"error", "meta"}, doc
        _check_request_id(doc)
        err = doc["error"]
        assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), err
        assert set(err) <= {"code", "message", "hint", "details"}, err
        return dict(err)


def _check_request_id(doc: dict[str, Any]) -> None:
    assert set(doc["meta"]) >= {"requestId"}, doc
    uuid.UUID(doc["meta"]["requestId"])


class Mgmt:
    """The `/v1` management API, as the reference participant and CLI call it."""

    def __init__(self, base_url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Mgmt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Answer:
        content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if content is not None else {}
        r = self.http.request(method, path, content=content, headers=headers)
        return Answer(r.status_code, r.headers, r.content)

    def health(self) -> Answer:
        return self.call("GET", "/v1/health")

    def create_room(self, name: str = "Open Room", **extra: Any) -> str:
        a = self.call("POST", "/v1/rooms", {"name": name, **extra})
        assert a.status == 201, (a.status, a.body)
        return str(a.data["room"]["code"])

    def rooms(self) -> Answer:
        return self.call("GET", "/v1/rooms")

    def room(self, code: str) -> Answer:
        return self.call("GET", f"/v1/rooms/{code}")

    def participants(self, code: str) -> Answer:
        return self.call("GET", f"/v1/rooms/{code}/participants")

    def participant(self, code: str, pid: str) -> dict[str, Any] | None:
        a = self.participants(code)
        assert a.status == 200, (a.status, a.body)
        for p in a.data:
            if p["id"] == pid:
                return dict(p)
        return None

    def put(self, code: str, pid: str, body: Any = None, **overrides: Any) -> Answer:
        payload = dict(PARTICIPANT) if body is None else body
        payload.update(overrides)
        return self.call("PUT", f"/v1/rooms/{code}/participants/{pid}", payload)

    def heartbeat(self, code: str, pid: str) -> Answer:
        return self.call("POST", f"/v1/rooms/{code}/participants/{pid}/heartbeat")

    def delete(self, code: str, pid: str) -> Answer:
        return self.call("DELETE", f"/v1/rooms/{code}/participants/{pid}")

    def register(self, code: str, pid: str, **overrides: Any) -> tuple[str, str]:
        """PUT, then return (tunnel url, token)."""
        a = self.put(code, pid, **overrides)
        assert a.status in (200, 201), (a.status, a.body)
        tunnel = a.data["tunnel"]
        return str(tunnel["url"]), str(tunnel["token"])

    def tunnel_url(self, code: str, pid: str, token: str | None) -> str:
        """The tunnel URL built from our own hub URL (the reference's checklist: don't trust Host)."""
        ws = "ws" + self.base_url[len("http") :]
        url = f"{ws}/v1/rooms/{code}/participants/{pid}/tunnel"
        return url if token is None else f"{url}?token={token}"

    def upgrade_refusal(self, code: str, pid: str, token: str | None) -> tuple[int, Any]:
        """Try to open a tunnel that should be refused; return (HTTP status, parsed JSON body)."""
        try:
            conn = connect(self.tunnel_url(code, pid, token), open_timeout=TIMEOUT_S, ping_interval=None)
            conn.__enter__()  # as above: no bare-connect warning on websockets 17
        except InvalidStatus as exc:
            body = exc.response.body or b""
            return exc.response.status_code, json.loads(body) if body else None
        conn.close()
        raise AssertionError("the upgrade was accepted")


@dataclass
class TunnelRequest:
    """A `tunnel.request` as received."""

    raw: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.raw["requestId"])

    @property
    def body(self) -> Any:
        return self.raw.get("body")


@dataclass
class TunnelPeer:
    """A participant's tunnel: a background reader thread queues what the hub sends."""

    conn: ClientConnection
    received: list[Any] = field(default_factory=list)
    sent: list[str | bytes] = field(default_factory=list)
    _inbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    _closed: threading.Event = field(default_factory=threading.Event)
    close_code: int | None = None
    close_reason: str | None = None

    @classmethod
    def open(cls, url: str, timeout_s: float = TIMEOUT_S) -> TunnelPeer:
        # No WebSocket control pings: the reference participant sends none (liveness is tunnel.ping).
        conn = connect(url, open_timeout=timeout_s, close_timeout=2.0, ping_interval=None, max_size=None)
        # Entered as a context manager: websockets 17.1+ warns about a bare connect() otherwise; the
        # peer's close() (or the hub's) ends it.
        peer = cls(conn.__enter__())
        threading.Thread(target=peer._read, name="tunnel-peer", daemon=True).start()
        return peer

    def _read(self) -> None:
        try:
            for message in self.conn:
                try:
                    parsed = json.loads(message)
                except ValueError:
                    parsed = message
                self.received.append(parsed)
                self._inbox.put(parsed)
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.conn.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.close_reason = rcvd.reason if rcvd is not None else None
            self._closed.set()

    # ---- sending -----------------------------------------------------------------------------------

    def send(self, message: Any, binary: bool = False) -> None:
        data = message if isinstance(message, (str, bytes)) else json.dumps(message)
        if binary and isinstance(data, str):
            data = data.encode()
        self.sent.append(data)
        self.conn.send(data)

    def ping(self, binary: bool = False) -> None:
        self.send({"type": "tunnel.ping", "timestamp": int(time.time() * 1000)}, binary=binary)

    def start(self, rid: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send(
            {
                "type": "tunnel.response.start",
                "requestId": rid,
                "status": status,
                "headers": headers or {"content-type": "application/json"},
            }
        )

    def chunk(self, rid: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.send(
            {"type": "tunnel.response.chunk", "requestId": rid, "chunk": base64.b64encode(raw).decode()}
        )

    def end(self, rid: str) -> None:
        self.send({"type": "tunnel.response.end", "requestId": rid})

    def error(self, rid: str, message: str, stage: str = "proxy") -> None:
        self.send({"type": "tunnel.response.error", "requestId": rid, "stage": stage, "message": message})

    def answer_json(self, rid: str, doc: Any, status: int = 200) -> None:
        """A whole non-streamed answer: start, one chunk, end."""
        self.start(rid, status, {"content-type": "application/json"})
        self.chunk(rid, json.dumps(doc))
        self.end(rid)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.conn.close(code, reason)
        self._closed.wait(TIMEOUT_S)

    # ---- receiving ---------------------------------------------------------------------------------

    def next(self, timeout_s: float = TIMEOUT_S) -> Any:
        """The next message from the hub (parsed JSON, or the raw text when it is not JSON)."""
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message from the hub within {timeout_s} s") from None

    def next_request(self, timeout_s: float = TIMEOUT_S) -> TunnelRequest:
        msg = self.next(timeout_s)
        assert isinstance(msg, dict) and msg.get("type") == "tunnel.request", msg
        return TunnelRequest(msg)

    def nothing_within(self, wait_s: float) -> bool:
        """True when the hub sends nothing for wait_s (used only to check that something does NOT come)."""
        try:
            msg = self._inbox.get(timeout=wait_s)
        except queue.Empty:
            return True
        self._inbox.put(msg)
        return False

    def wait_closed(self, timeout_s: float = TIMEOUT_S) -> tuple[int | None, str | None]:
        assert self._closed.wait(timeout_s), "the tunnel was not closed"
        return self.close_code, self.close_reason

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class Inference:
    """A tiny OpenAI-ish client for a room's `/rooms/:code/v1/...` routes."""

    def __init__(self, base_url: str, timeout_s: float = TIMEOUT_S) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Inference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, code: str, model: str, content: str = "hi", **extra: Any) -> Answer:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        return self.post(f"/rooms/{code}/v1/chat/completions", body)

    def responses(self, code: str, model: str, input_: str = "hi", **extra: Any) -> Answer:
        return self.post(f"/rooms/{code}/v1/responses", {"model": model, "input": input_, **extra})

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None) -> Answer:
        content = raw if raw is not None else json.dumps(body).encode()
        r = self.http.post(path, content=content, headers={"Content-Type": "application/json"})
        return Answer(r.status_code, r.headers, r.content)

    def get(self, path: str) -> Answer:
        r = self.http.get(path)
        return Answer(r.status_code, r.headers, r.content)

    def models(self, code: str) -> Answer:
        return self.get(f"/rooms/{code}/v1/models")

    def stream_chunks(self, path: str, body: Any) -> Iterator[tuple[int, httpx.Headers, bytes]]:
        """POST with stream; yield (status, headers, each body piece as it arrives)."""
        with self.http.stream("POST", path, json=body) as r:
            for piece in r.iter_raw():
                yield r.status_code, r.headers, piece


class EventReader:
    """An SSE reader of `/v1/rooms/:code/events` on a thread: parsed `{type,timestamp,roomCode,data}`."""

    def __init__(self, base_url: str, path: str, timeout_s: float = TIMEOUT_S) -> None:
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, trust_env=False)
        self._ready = threading.Event()
        self._done = threading.Event()
        self._path = path
        self._response: httpx.Response | None = None
        threading.Thread(target=self._run, name="sse-reader", daemon=True).start()
        assert self._ready.wait(timeout_s), "no answer from the events route"

    def _run(self) -> None:
        try:
            with self._client.stream("GET", self._path) as r:
                self._response = r
                self.status, self.headers = r.status_code, r.headers
                self._ready.set()
                event_name = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event_name = line[6:].strip()
                    elif line.startswith("data:"):
                        doc = json.loads(line[5:])
                        doc["_event"] = event_name
                        self.events.append(doc)
        except (httpx.HTTPError, RuntimeError, OSError, ValueError):
            pass  # closed by close(), or cut by the hub
        finally:
            self._ready.set()
            self._done.set()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("type") == type_]

    def close(self) -> None:
        """Stop reading: closing the response from here ends the reader thread's blocking read."""
        if self._response is not None:
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a blocking read elsewhere returns at once
        self._done.wait(TIMEOUT_S)
        self._client.close()
        self._done.wait(TIMEOUT_S)


@dataclass
class Exchange:
    """One HTTP request and its answer, as a wire recording shows them."""

    conn: int
    at_s: float
    method: str
    target: str
    request_body: bytes | None
    status: int | None = None
    response_body: str | None = None
    upgrade: bool = False  # the request asked for a WebSocket
    answered_after: int = -1  # see parse_timeline

    def response_json(self) -> Any:
        try:
            return json.loads(self.response_body or "")
        except ValueError:
            return None


_LINE = re.compile(r"^\s*(\d+\.\d+) \[conn (\d+)\] (HTTP >>|HTTP <<|WS|TCP) ?(.*)$")
_WS = re.compile(r"^(hub->participant|participant->hub) (\w+) fin=\d masked=\d len=\d+ ?(.*)$")


@dataclass
class WsFrame:
    """One WebSocket frame of a recording: `payload` is the text, or `code=... reason=...` for a close."""

    conn: int
    at_s: float
    direction: str  # "hub->participant" or "participant->hub"
    kind: str  # text, binary, close
    payload: str

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            return None


def parse_timeline(text: str) -> list[Exchange | WsFrame]:
    """A recording in order: each HTTP exchange (at its request) and each WebSocket frame.

    An Exchange's `answered_after` is the index in the list after which its answer was seen, so a
    replay can tell which frames came before the client got its answer.
    """
    timeline: list[Exchange | WsFrame] = []
    open_by_conn: dict[int, Exchange] = {}
    current: Exchange | None = None
    side = ""
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            at_s, conn, kind, rest = float(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            current, side = None, ""
            if kind == "HTTP >>":
                method, target, _version = rest.split(" ", 2)
                current = Exchange(conn, at_s, method, target, None)
                timeline.append(current)
                open_by_conn[conn] = current
                side = "request"
            elif kind == "HTTP <<" and conn in open_by_conn:
                current = open_by_conn.pop(conn)
                current.status = int(rest.split(" ")[1])
                current.answered_after = len(timeline) - 1
                side = "response"
            elif kind == "WS":
                w = _WS.match(rest)
                if w is not None:
                    timeline.append(WsFrame(conn, at_s, w.group(1), w.group(2), w.group(3)))
            continue
        stripped = line.strip()
        if current is None:
            continue
        if side == "request" and stripped.lower() == "upgrade: websocket":
            current.upgrade = True
        if stripped.startswith("body: "):
            if side == "request":
                current.request_body = stripped[len("body: ") :].encode()
            else:
                current.response_body = stripped[len("body: ") :]
                side = "response-body"
        elif side == "response-body" and stripped:
            current.response_body = f"{current.response_body}\n{stripped}"
    return timeline


def parse_recording(text: str) -> list[Exchange]:
    """The HTTP exchanges of a recording in tests/fixtures/gambi-v06/ (WebSocket frames left out)."""
    return [e for e in parse_timeline(text) if isinstance(e, Exchange)]
