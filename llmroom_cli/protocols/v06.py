"""Gambi v0.6 spoken by a participant: the /v1 management API (V06Client) and the tunnel (TunnelSession).

On a v0.6 hub the participant dials out: it registers with PUT, opens a WebSocket with the token it got
back, and the hub sends inference requests down that socket (`tunnel.request`); the answers go back as
`tunnel.response.start` / base64 `chunk`s / `end` (or `error`). Liveness needs two signals each interval:
a `tunnel.ping` on the socket (else the hub closes it with 4001) and `POST .../heartbeat` (else it marks
the participant offline). See ../shared/reference/gambi-v06-api.md, sections 3, 5, 9 and 10.

Threads of a TunnelSession: the lifecycle thread (the caller's: `join()` then `heartbeat_loop()`), one
reader and one writer per open tunnel, and one worker per `tunnel.request` (plus one producer for a
streamed answer, so keepalives can go out while the local server thinks). Every frame goes through the
writer, so a hub that stops reading can never block the lifecycle thread. Never prints; events go to
the `emit` callback with the v0.1 session's names (joined, heartbeat, reconnecting, online, rejoined,
left) plus `tunnel` (state connected/lost, close code and its meaning) and `paused`/`resumed`.

`websockets` is imported only when a tunnel opens (`_default_connect`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn, Protocol, cast
from urllib.parse import quote, urlencode, urlsplit

import httpx

from llmroom_cli.errors import (
    HubProtocolError,
    HubRejected,
    HubUnavailable,
    InvalidPassword,
    LlmroomError,
    ParticipantNotFound,
    RoomNotFound,
    describe_os_error,
)
from llmroom_cli.session import (
    JoinPlan,
    Outcome,
    Pause,
    Schedule,
    Status,
    never_reached_the_hub,
    run_session,
)

Emit = Callable[[dict[str, Any]], None]
Send = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Send], None]

# -- limits (named, with the reason) ----------------------------------------------------------------

# A management answer is a few KB (a room list of hundreds of participants stays under 1 MiB).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# Every management call, whole exchange, unless the caller gives a tighter one.
DEFAULT_TIMEOUT_S = 5.0
# Raw bytes per tunnel.response.chunk: an 18 MB frame dropped the reference hub's tunnel (§5.2).
MAX_CHUNK_BYTES = 1024 * 1024
# While a streamed answer waits for its first byte, a `: keepalive` comment this often: the reference
# hub cuts the client after ~10 s of silence, then crashes on the first real chunk (§7).
KEEPALIVE_S = 4.0
# A tunnel.request is a prompt; 32 MiB allows images in it and bounds what a hostile hub can make us hold.
MAX_INCOMING_FRAME_BYTES = 32 * 1024 * 1024
# A non-streamed answer is buffered whole (the hub must get JSON, so it is checked before it goes).
MAX_NONSTREAM_BYTES = 64 * 1024 * 1024
# Requests served at once on one tunnel; beyond it the hub gets 429 at once (no unbounded threads).
MAX_WORKERS = 32
# Frames queued for the writer: enough to keep the socket busy, small enough to bound memory (~8 MiB).
WRITE_QUEUE_FRAMES = 8
# Leave: wait this long for a call in flight, then this long for the close handshake, then the DELETE.
LEAVE_WAIT_INFLIGHT_S = 0.5
LEAVE_CLOSE_S = 0.5
# ...of which the close frame alone gets this much before the DELETE goes (it is written in microseconds).
LEAVE_CLOSE_FIRST_S = 0.05
LEAVE_DELETE_S = 1.2
# Reconnect back-off: first retry at once, then doubling up to min(interval, this).
RECONNECT_MAX_DELAY_S = 2.0
STARTUP_RETRY_S = 10.0

SUPERSEDED_REASON = "Superseded by a newer tunnel session."

# What each close code means, in a sentence a user can act on (the reference prints one line for all).
CLOSE_MEANINGS: dict[int, str] = {
    1000: "the tunnel was closed normally",
    1001: "the hub is shutting down or restarting",
    1006: "the connection dropped without a close frame (network failure, or the hub was killed or crashed)",
    1008: "the hub refused a message as against its policy",
    1009: "a message was too big for the hub",
    1011: "the hub hit an internal error",
    1012: "the hub is restarting",
    4001: "the hub heard nothing from this agent for 30 s and timed the tunnel out",
}


def describe_close(code: int | None, reason: str) -> str:
    """One sentence for a tunnel close: what the code (and a known reason) means."""
    if code == 1000 and reason.startswith("Superseded"):
        return "another agent opened a tunnel with this participant id, so the hub closed ours"
    if code is None:
        return CLOSE_MEANINGS[1006]
    meaning = CLOSE_MEANINGS.get(code)
    if meaning is None:
        meaning = f"the tunnel closed with code {code}"
    return meaning


class TunnelSuperseded(LlmroomError):
    """Another agent took this participant id (close 1000 "Superseded..."): we stop, never fight."""

    exit_code = 1


class TunnelGone(Exception):
    """Raised by a request's `send` once the tunnel it came on is closed: stop producing that answer."""


# -- the management API -----------------------------------------------------------------------------


class Registration(NamedTuple):
    """What a PUT gives back; `tunnel_url` is built from our own hub URL (§9), without the token."""

    participant: dict[str, Any]
    tunnel_url: str
    token: str


_START_HINT = "is the hub running? start one with: llmroom serve"


class V06Client:
    """The v0.6 `/v1` management API of the hub at `base_url`, over an injected httpx.Client.

    Every call has a deadline for the whole exchange (`timeout_s`, default DEFAULT_TIMEOUT_S: each I/O
    step gets what is left of it and the clock is checked between reads) and reads at most
    MAX_ANSWER_BYTES. Error envelopes become errors.py classes, with the hub's `hint` kept."""

    def __init__(
        self,
        http: httpx.Client,
        base_url: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    # -- routes -----------------------------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """`GET /v1/health` -> `{"status": "ok", "timestamp": ms}`."""
        return _as_dict(
            self._call("GET", "/v1/health", timeout_s=timeout_s), self._bad_shape("GET /v1/health")
        )

    def create_room(
        self, name: str, password: str | None = None, defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`POST /v1/rooms` -> `{"room": {...code...}, "hostId": ...}`."""
        body: dict[str, Any] = {"name": name}
        if password:
            body["password"] = password
        if defaults:
            body["defaults"] = defaults
        data = _as_dict(self._call("POST", "/v1/rooms", body), self._bad_shape("POST /v1/rooms"))
        room = data.get("room")
        if not isinstance(room, dict) or not isinstance(room.get("code"), str):
            raise self._bad_shape("POST /v1/rooms")
        return data

    def list_rooms(self) -> list[dict[str, Any]]:
        """`GET /v1/rooms` -> room summaries."""
        return _as_list_of_dicts(self._call("GET", "/v1/rooms"), self._bad_shape("GET /v1/rooms"))

    def room(self, code: str) -> dict[str, Any]:
        """`GET /v1/rooms/:code` -> one room summary; RoomNotFound when there is none."""
        path = f"/v1/rooms/{_seg(code)}"
        return _as_dict(self._call("GET", path, code=code), self._bad_shape("GET /v1/rooms/:code"))

    def participants(self, code: str) -> list[dict[str, Any]]:
        """`GET /v1/rooms/:code/participants` -> public participants (with `connection`)."""
        path = f"/v1/rooms/{_seg(code)}/participants"
        return _as_list_of_dicts(self._call("GET", path, code=code), self._bad_shape("GET .../participants"))

    def register(
        self, code: str, participant_id: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> Registration:
        """`PUT /v1/rooms/:code/participants/:id` (201 created and 200 updated are the same to us)."""
        body = {k: v for k, v in body.items() if k not in ("id", "authHeaders")}  # path id wins; never auth
        path = self._participant_path(code, participant_id)
        data = _as_dict(
            self._call("PUT", path, body, timeout_s, code=code), self._bad_shape("PUT participant")
        )
        participant, tunnel = data.get("participant"), data.get("tunnel")
        token = tunnel.get("token") if isinstance(tunnel, dict) else None
        if not isinstance(participant, dict) or not isinstance(token, str) or not token:
            raise self._bad_shape("PUT /v1/rooms/:code/participants/:id")
        return Registration(participant, self.tunnel_url(code, participant_id), token)

    def heartbeat(self, code: str, participant_id: str, timeout_s: float | None = None) -> str:
        """`POST .../heartbeat` -> the status the hub now shows: online, busy or offline."""
        path = self._participant_path(code, participant_id) + "/heartbeat"
        data = _as_dict(
            self._call("POST", path, None, timeout_s, code=code), self._bad_shape("POST heartbeat")
        )
        status = data.get("status")
        if not isinstance(status, str):
            raise self._bad_shape("POST /v1/rooms/:code/participants/:id/heartbeat")
        return status

    def delete(self, code: str, participant_id: str, timeout_s: float | None = None) -> None:
        """`DELETE /v1/rooms/:code/participants/:id`; ParticipantNotFound when already gone."""
        self._call("DELETE", self._participant_path(code, participant_id), None, timeout_s, code=code)

    def tunnel_url(self, code: str, participant_id: str) -> str:
        """The tunnel's ws(s):// URL from our own hub URL: the hub's answer follows the Host and scheme it
        saw, which is wrong behind TLS termination or a proxy (§9)."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        prefix = parts.path.rstrip("/")
        return f"{scheme}://{parts.netloc}{prefix}{self._participant_path(code, participant_id)}/tunnel"

    # -- plumbing ---------------------------------------------------------------------------------

    def _participant_path(self, code: str, participant_id: str) -> str:
        return f"/v1/rooms/{_seg(code)}/participants/{_seg(participant_id)}"

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        code: str | None = None,
    ) -> Any:
        budget = self.timeout_s if timeout_s is None else timeout_s
        status, raw, ctype = self._exchange(method, path, body, budget)
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if status >= 400:
            self._raise_for(status, doc, ctype, method, path, code)
        if not isinstance(doc, dict) or "data" not in doc:
            raise HubProtocolError(
                f"{self.base_url} answered {method} {path} with something that is not the v0.6 hub API"
                f" (HTTP {status}, {ctype})",
                "check the --hub URL, or force the generation with --hub-api",
            )
        return doc["data"]

    def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, budget_s: float
    ) -> tuple[int, bytes, str]:
        deadline = time.monotonic() + budget_s
        content = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json"} if content is not None else {}
        # Connecting gets half the budget (it is milliseconds on a LAN), so connect + read stays near it.
        timeout = httpx.Timeout(budget_s, connect=budget_s / 2, pool=budget_s / 2)
        try:
            with self.http.stream(
                method, self.base_url + path, content=content, headers=headers, timeout=timeout
            ) as resp:
                buf = bytearray()
                for piece in resp.iter_bytes():
                    buf += piece
                    if len(buf) > self.max_bytes:
                        raise HubProtocolError(
                            f"the hub at {self.base_url} answered {method} {path} with more than"
                            f" {self.max_bytes} bytes",
                            "check the --hub URL",
                        )
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("whole-exchange deadline passed")
                ctype = resp.headers.get("content-type", "no content type").split(";")[0]
                return resp.status_code, bytes(buf), ctype
        except httpx.TimeoutException as exc:
            raise HubUnavailable(f"the hub at {self.base_url} did not answer in time", _START_HINT) from exc
        except httpx.TransportError as exc:
            from llmroom_cli.http import in_words

            reason = str(in_words(exc)) or type(exc).__name__
            raise HubUnavailable(f"cannot reach the hub at {self.base_url}: {reason}", _START_HINT) from exc

    def _raise_for(self, status: int, doc: Any, ctype: str, method: str, path: str, code: str | None) -> None:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            ecode = err.get("code") if isinstance(err.get("code"), str) else None
            message = _clip(err.get("message")) or f"HTTP {status}"
            hint = _clip(err.get("hint")) or None
            details = err.get("details")
        elif isinstance(err, str):  # the inference plane's plain {"error": "..."}
            ecode, message, hint, details = None, _clip(err), None, None
        else:
            if status >= 500:
                raise HubUnavailable(f"the hub at {self.base_url} failed: HTTP {status} ({ctype})")
            raise HubProtocolError(
                f"the hub at {self.base_url} answered {method} {path} with HTTP {status} ({ctype})",
                "check the --hub URL, or force the generation with --hub-api",
            )
        room = f"room {code}" if code else "the room"
        if ecode == "ROOM_NOT_FOUND" or (status == 404 and message.rstrip(".") == "Room not found"):
            raise RoomNotFound(
                f"{room} was not found on {self.base_url}",
                hint
                or f"check the code with: llmroom list --hub {self.base_url}; a restarted hub has no rooms",
            )
        if ecode == "PARTICIPANT_NOT_FOUND":
            raise ParticipantNotFound(
                f"the hub at {self.base_url} does not know this participant", status, hint
            )
        if ecode == "INVALID_PASSWORD" or status == 401:
            raise InvalidPassword(
                f"invalid password for {room} on {self.base_url}: {message}",
                hint or "give it with --password-stdin or LLMROOM_PASSWORD",
            )
        if status == 404 and message.rstrip(".") == "Route not found":
            raise HubProtocolError(
                f"{self.base_url} does not know {method} {path}: it does not speak the v0.6 hub API",
                "check the --hub URL, or force the generation with --hub-api",
            )
        if status >= 500:
            raise HubUnavailable(f"the hub at {self.base_url} failed: {status} {message}", hint)
        if details is not None:
            message = f"{message} {_clip(json.dumps(details, ensure_ascii=False, sort_keys=True))}"
        raise HubRejected(f"the hub at {self.base_url} refused {method} {path}: {message}", status, hint)

    def _bad_shape(self, route: str) -> HubProtocolError:
        return HubProtocolError(
            f"the hub at {self.base_url} answered {route} with an unexpected shape", "check the --hub URL"
        )


def _seg(value: str) -> str:
    return quote(value, safe="")


def _clip(value: Any, limit: int = 300) -> str:
    """Foreign text, bounded: a hostile hub cannot fill the terminal through an error message."""
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[:limit] + "..."


def _as_dict(value: Any, error: Exception) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error
    return value


def _as_list_of_dicts(value: Any, error: Exception) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise error
    return value


def registration_body(plan: JoinPlan, capabilities: dict[str, str] | None = None) -> dict[str, Any]:
    """The PUT body for a join plan: nickname, model, endpoint, and password/specs/config/capabilities
    when set. The id travels in the path (the hub ignores one in the body)."""
    body: dict[str, Any] = {"nickname": plan.nickname, "model": plan.model, "endpoint": plan.endpoint}
    if plan.password:
        body["password"] = plan.password
    if plan.specs is not None:
        body["specs"] = plan.specs
    if plan.config is not None:
        body["config"] = plan.config
    if capabilities:
        body["capabilities"] = capabilities
    return body


# -- answering tunnel requests ------------------------------------------------------------------------

# Headers come back as a mapping or as (name, value) pairs (the relay core's Upstream.headers).
Headers = Mapping[str, str] | Iterable[tuple[str, str]]
OpenUpstream = Callable[[str, str, dict[str, str], bytes | None], tuple[int, Headers, Iterable[bytes]]]

# Hop-by-hop and framing headers describe the local connection, not the answer: never forwarded.
_DROP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "upgrade",
        "proxy-connection",
        "te",
        "trailer",
        "set-cookie",
    }
)
_KEEPALIVE_CHUNK = b": keepalive\n\n"


class RelayHandler:
    """A tunnel `Handler` over `open_upstream(method, path, headers, body) -> (status, headers, chunks)`.

    Sends `tunnel.response.start`, base64 `chunk`s of at most `max_chunk_bytes` raw bytes, then `end`;
    a failure before the answer is complete becomes `error` with stage "proxy".
    - Streams (`request["stream"]`): `start` goes out with the server's status as soon as it answers;
      if it has not answered within `keepalive_s`, `start` goes out as 200 text/event-stream (the
      client's HTTP answer begins at `start`, and a chunk before it would be held back, so it cannot
      keep the client alive otherwise) and `: keepalive` comments follow every `keepalive_s` until the
      first byte. A server that then answers with an error status has its body relayed in that stream.
    - Non-streams are buffered (at most `max_nonstream_bytes`) and must be JSON: the hub parses them and
      turns anything else into a 502, so a non-JSON answer is replaced by a JSON error with its status.
    - Once the tunnel is gone (`send` raises TunnelGone) nothing more is sent and the upstream closed.
    """

    def __init__(
        self,
        open_upstream: OpenUpstream,
        keepalive_s: float = KEEPALIVE_S,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_nonstream_bytes: int = MAX_NONSTREAM_BYTES,
    ) -> None:
        self.open_upstream = open_upstream
        self.keepalive_s = keepalive_s
        self.max_chunk_bytes = max_chunk_bytes
        self.max_nonstream_bytes = max_nonstream_bytes

    @classmethod
    def from_core(cls, core: Any, **kw: Any) -> RelayHandler:
        """Over the relay core: `core.open(method, path, headers, body)` returns an Upstream with
        `status`, `headers` (pairs), iteration over the raw body and `close()` (duck-typed here, so
        this module does not import relay.py)."""

        def open_upstream(method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
            up = core.open(method, path, headers, body)
            return up.status, up.headers, up

        return cls(open_upstream, **kw)

    def __call__(self, request: dict[str, Any], send: Send) -> None:
        rid = request["requestId"]
        method = str(request.get("method", "POST"))
        path = str(request.get("path", "/"))
        raw_headers = request.get("headers")
        headers = {str(k): str(v) for k, v in raw_headers.items()} if isinstance(raw_headers, dict) else {}
        body = json.dumps(request["body"]).encode() if request.get("body") is not None else None
        try:
            if request.get("stream"):
                self._stream(rid, method, path, headers, body, send)
            else:
                self._plain(rid, method, path, headers, body, send)
        except TunnelGone:
            return

    # A non-stream: the whole answer, checked to be JSON, then start + chunks + end.
    def _plain(
        self, rid: str, method: str, path: str, headers: dict[str, str], body: bytes | None, send: Send
    ) -> None:
        try:
            status, up_headers, chunks = self.open_upstream(method, path, headers, body)
        except Exception as exc:  # the relay core's failures all become an error frame
            send(_error_frame(rid, exc))
            return
        buf = bytearray()
        try:
            for piece in chunks:
                buf += piece
                if len(buf) > self.max_nonstream_bytes:
                    send(
                        _error_frame(
                            rid, f"the local server's answer is over {self.max_nonstream_bytes} bytes"
                        )
                    )
                    return
        except Exception as exc:
            send(_error_frame(rid, exc))
            return
        finally:
            _close(chunks)
        out_headers = _forward_headers(up_headers)
        try:
            json.loads(bytes(buf))
            payload = bytes(buf)
        except (ValueError, UnicodeDecodeError):
            kind = _header(up_headers, "content-type") or "no content type"
            kind = kind.split(";")[0]
            message = f"the local server answered HTTP {status} with non-JSON ({kind}, {len(buf)} bytes)"
            payload = json.dumps({"error": {"message": message, "type": "upstream_error"}}).encode()
            status = status if status >= 400 else 502
        out_headers["content-type"] = "application/json"
        send({"type": "tunnel.response.start", "requestId": rid, "status": status, "headers": out_headers})
        self._chunks(rid, payload, send)
        send({"type": "tunnel.response.end", "requestId": rid})

    # A stream: a producer thread reads the server, this worker sends (and keeps the client alive).
    def _stream(
        self, rid: str, method: str, path: str, headers: dict[str, str], body: bytes | None, send: Send
    ) -> None:
        items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=4)
        cancelled = threading.Event()
        holder: list[Iterable[bytes]] = []  # the producer's, closed by the producer

        def put(item: tuple[str, Any]) -> bool:
            while not cancelled.is_set():
                try:
                    items.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                status, up_headers, chunks = self.open_upstream(method, path, headers, body)
                holder.append(chunks)
                if not put(("start", (status, up_headers))):
                    return
                for piece in chunks:
                    if piece and not put(("chunk", piece)):
                        return
                put(("end", None))
            except Exception as exc:
                put(("error", exc))
            finally:
                if holder:
                    _close(holder[0])

        producer = threading.Thread(target=produce, name=f"llmroom-upstream-{rid[:8]}", daemon=True)
        producer.start()
        started = False
        first_byte = False
        # Comments are only valid in an SSE body: into a JSON error body they would corrupt it.
        sse = True
        try:
            while True:
                try:
                    kind, value = items.get(timeout=self.keepalive_s)
                except queue.Empty:
                    if first_byte or not sse:
                        continue  # mid-stream silence is the server's; the hub does not cut a live stream
                    if not started:
                        start_headers = {"content-type": "text/event-stream", "cache-control": "no-cache"}
                        send(
                            {
                                "type": "tunnel.response.start",
                                "requestId": rid,
                                "status": 200,
                                "headers": start_headers,
                            }
                        )
                        started = True
                    send(_chunk_frame(rid, _KEEPALIVE_CHUNK))
                    continue
                if kind == "start":
                    if not started:
                        status, up_headers = value
                        ctype = _header(up_headers, "content-type") or ""
                        sse = ctype.split(";")[0].strip() == "text/event-stream"
                        send(
                            {
                                "type": "tunnel.response.start",
                                "requestId": rid,
                                "status": status,
                                "headers": _forward_headers(up_headers),
                            }
                        )
                        started = True
                elif kind == "chunk":
                    first_byte = True
                    self._chunks(rid, value, send)
                elif kind == "end":
                    send({"type": "tunnel.response.end", "requestId": rid})
                    return
                else:  # error: before start it is a 502 for the client; after, the stream ends early
                    send(_error_frame(rid, value))
                    return
        finally:
            cancelled.set()
            # Unblock a producer waiting on a full queue, then let it close the upstream.
            with contextlib.suppress(queue.Empty):
                while True:
                    items.get_nowait()
            # The producer closes the upstream itself (the relay core's Upstream is iterated and closed
            # from one thread): `cancelled` makes it stop at its next chunk.

    def _chunks(self, rid: str, data: bytes, send: Send) -> None:
        for i in range(0, len(data), self.max_chunk_bytes):
            send(_chunk_frame(rid, data[i : i + self.max_chunk_bytes]))


def _chunk_frame(rid: str, data: bytes) -> dict[str, Any]:
    return {
        "type": "tunnel.response.chunk",
        "requestId": rid,
        "chunk": base64.b64encode(data).decode("ascii"),
    }


def _error_frame(rid: str, exc: BaseException | str) -> dict[str, Any]:
    message = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    return {
        "type": "tunnel.response.error",
        "requestId": rid,
        "stage": "proxy",
        "message": _clip(message, 500),
    }


def _pairs(headers: Headers) -> list[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k).lower(), str(v)) for k, v in items]


def _header(headers: Headers, name: str) -> str | None:
    return next((v for k, v in _pairs(headers) if k == name), None)


def _forward_headers(headers: Headers) -> dict[str, str]:
    return {k: v for k, v in _pairs(headers) if k not in _DROP_HEADERS}


def _close(chunks: Iterable[bytes]) -> None:
    closer = getattr(chunks, "close", None)
    if callable(closer):
        with contextlib.suppress(Exception):
            closer()


# -- the tunnel ------------------------------------------------------------------------------------


class Connection(Protocol):
    """What a TunnelSession needs of a WebSocket connection (websockets' sync ClientConnection)."""

    def send(self, message: str) -> None: ...
    def recv(self, timeout: float | None = None) -> str | bytes: ...
    def close(self, code: int = 1000, reason: str = "") -> None: ...


Connect = Callable[[str, float], Connection]


class TunnelRefused(Exception):
    """The upgrade was answered with an HTTP status instead of 101 (401 token, 404 room/participant)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"tunnel upgrade refused: HTTP {status}")
        self.status = status
        self.body = body


def _default_connect(url: str, timeout_s: float) -> Connection:
    """Open a tunnel with websockets' sync client (imported here, only when a tunnel opens)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        conn = connect(
            url,
            open_timeout=timeout_s,
            close_timeout=LEAVE_CLOSE_S,
            # The hub's 101 never accepts permessage-deflate (§5.1): don't offer it.
            compression=None,
            # Liveness is the protocol's tunnel.ping/pong; the hub sends no control frames.
            ping_interval=None,
            max_size=MAX_INCOMING_FRAME_BYTES,
            user_agent_header="llmroom",
        )
    except InvalidStatus as exc:
        raise TunnelRefused(exc.response.status_code, bytes(exc.response.body or b"")) from None
    # The connection is its own context manager; entering it is how websockets 17 is told we hold it
    # on purpose (it warns about a bare connect() otherwise), and a no-op returning it on 13-16. The
    # session closes it itself (leave, rebuild), so there is no matching __exit__.
    return cast(Connection, conn.__enter__())


def _abort(conn: Connection) -> None:
    """Drop the TCP connection under a WebSocket at once (unblocks a reader and a stuck writer)."""
    import socket

    sock = getattr(conn, "socket", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


class _Tunnel:
    """One open WebSocket: its reader and writer threads, and how it ended."""

    def __init__(self, conn: Connection, serial: int) -> None:
        self.conn = conn
        self.serial = serial
        self.closed = threading.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by_us = False
        self.error: str | None = None  # what ended it when no close frame came (a socket error)
        self.outbox: queue.Queue[str | None] = queue.Queue(maxsize=WRITE_QUEUE_FRAMES)
        self.ping_text: str | None = None
        self.workers = threading.BoundedSemaphore(MAX_WORKERS)

    def send(self, frame: dict[str, Any]) -> None:
        """Queue one frame for the writer, waiting while the queue is full; TunnelGone once closed."""
        text = json.dumps(frame, separators=(",", ":"))
        while True:
            if self.closed.is_set():
                raise TunnelGone()
            try:
                self.outbox.put(text, timeout=0.2)
                return
            except queue.Full:
                continue

    def try_send(self, frame: dict[str, Any]) -> bool:
        """Queue a frame only if there is room (never waits behind a blocked socket)."""
        if self.closed.is_set():
            return False
        try:
            self.outbox.put_nowait(json.dumps(frame, separators=(",", ":")))
            return True
        except queue.Full:
            return False

    def ping(self, frame: dict[str, Any]) -> None:
        """Send a ping ahead of queued answer frames: a full queue (a big answer in flight) must not
        delay it into a false "no pong", and the caller (the lifecycle thread) never waits."""
        self.ping_text = json.dumps(frame, separators=(",", ":"))
        with contextlib.suppress(queue.Full):
            self.outbox.put_nowait("")  # wakes an idle writer; a busy one sees ping_text after its frame


@dataclass
class TunnelStatus(Status):
    """Status plus the tunnel: what `list`, the panel and `--debug` show about it."""

    tunnel: str = "connecting"  # connecting | connected | lost | paused | closed
    close_code: int | None = None
    close_meaning: str | None = None
    hub_status: str | None = None  # the last heartbeat's answer: online | busy | offline
    requests: int = 0


def _ms() -> int:
    return int(time.time() * 1000)


class _Wakeable(threading.Event):
    """The stop Event: setting it also wakes the lifecycle thread's wait."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake.set()


class TunnelSession:
    """One participant in one room of a v0.6 hub, served through the tunnel. Shaped like the v0.1
    `Session`: `join()`, `heartbeat_loop()` (until `stop` is set), `leave() -> bool`, `status`, and the
    same events; plus `pause(reason, cause)` / `resume()` (events `paused`, `resumed`).

    Pause closes the tunnel and keeps the registration and the heartbeats: the hub shows the participant
    at once as registered but not connected (`offline`, not routable: `model`/`*` routing skips it and
    a request aimed at its id gets 503, reference section 4), and nobody sees a `participant.left`. It
    is the honest signal for "in the room, not serving right now": a DELETE + re-PUT would tell the
    room we left, and stopping heartbeats would take 30-40 s to show while the tunnel still took
    requests. The heartbeats go on while paused (the hub answers `offline`, which is then expected),
    a hub outage meanwhile is `reconnecting` then `paused` again, and nothing re-opens the tunnel
    until `resume()`: that registers again (PUT, same id) and opens a new tunnel, at once."""

    def __init__(
        self,
        client: V06Client,
        plan: JoinPlan,
        handler: Handler,
        emit: Emit,
        stop: threading.Event | None = None,
        capabilities: dict[str, str] | None = None,
        connect: Connect | None = None,
        clock: Callable[[], float] = time.monotonic,
        startup_retry_s: float = STARTUP_RETRY_S,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        self.client = client
        self.plan = plan
        self.handler = handler
        self._emit_cb = emit
        self.capabilities = capabilities
        self._connect = connect or _default_connect
        self.clock = clock
        self.startup_retry_s = startup_retry_s
        self.on_retry = on_retry
        self._wake = threading.Event()
        self.stop: threading.Event = _Wakeable(self._wake)
        if stop is not None:
            # Drop-in for Session(stop=...): setting the caller's Event stops us too. Setting
            # `session.stop` directly (run_tunnel_session does) needs no watcher.
            def watch() -> None:
                stop.wait()
                self.stop.set()

            threading.Thread(target=watch, name="llmroom-stop-watch", daemon=True).start()
        self.status = TunnelStatus()
        self.join_maybe_sent = False
        self.joined = False
        self.left = False
        self.superseded = False
        self._in_flight = threading.Lock()
        self._lock = threading.Lock()
        self._tunnel: _Tunnel | None = None
        self._serial = 0
        self._last_pong_at: float | None = None
        self._ping_outstanding = False
        self.join_may_have_landed = False  # see Session: False while every attempt was refused
        self._pause_lock = threading.Lock()
        self._paused: Pause | None = None  # what pause()/resume() want (any thread, under the lock)
        self._pause_changed = False
        self._resuming = False  # resumed: the next tunnel that opens is announced as `resumed`
        self._rejoin_pending = False
        # Each request is shorter than the interval, so the hub sees an attempt every interval.
        self.request_timeout_s = max(min(5.0, plan.interval_s * 0.8), 0.05)
        self.reconnect_max_delay_s = min(plan.interval_s, RECONNECT_MAX_DELAY_S)

    # -- events -----------------------------------------------------------------------------------

    def emit(self, event: str, **data: Any) -> None:
        record: dict[str, Any] = {"event": event, "ts": _ms(), **data}
        self.status.history.append(record)
        self._emit_cb(record)

    # -- lifecycle ----------------------------------------------------------------------------------

    def join(self) -> None:
        """Register and open the tunnel, retrying an unreachable hub for `startup_retry_s`. Raises
        RoomNotFound, InvalidPassword, HubUnavailable (still unreachable), HubRejected; returns quietly
        if stopped meanwhile."""
        deadline = self.clock() + self.startup_retry_s
        delay = 0.1
        told = False
        while True:
            try:
                participant = self._register_and_open(startup=True)
                break
            except (HubUnavailable, ParticipantNotFound) as exc:
                remaining = deadline - self.clock()
                if remaining <= 0 or self.stop.is_set():
                    raise
                if self.on_retry is not None and not told:
                    told = True
                    self.on_retry(exc.message, remaining)
                if self.stop.wait(min(delay, remaining)):
                    return
                delay = min(delay * 2, 2.0)
            if self.stop.is_set():
                return
        if participant is None:
            return
        self.joined = True
        self.status.state = "online"
        self.status.joined_at = self.clock()
        self.emit("joined", **self.plan.joined_event(participant), protocol="v0.6")

    def heartbeat_loop(self) -> None:
        """Ping + heartbeat every interval, reconnect when the tunnel goes, until `stop` is set. Raises
        RoomNotFound (the room is gone), InvalidPassword, or TunnelSuperseded."""
        assert self.status.joined_at is not None
        schedule = Schedule(self.status.joined_at, self.plan.interval_s)
        deadline = schedule.next_deadline(self.clock())
        delay = 0.0
        while not self.stop.is_set():
            self._check_tunnel()
            if self._pause_changed:
                self._apply_pause()
            if self._tunnel is None and self._paused is None:
                if self._reconnect():
                    delay = 0.0
                    schedule = Schedule(self.clock(), self.plan.interval_s)
                    deadline = schedule.next_deadline(self.clock())
                else:
                    delay = min(max(delay * 2, 0.1), self.reconnect_max_delay_s)
                    self._wake.wait(delay)
                    self._wake.clear()
                    continue
            timeout = max(0.0, deadline - self.clock())
            self._wake.wait(timeout)
            self._wake.clear()
            if self.stop.is_set():
                return
            if self.clock() >= deadline:
                self._tick()
                deadline = schedule.next_deadline(self.clock())

    # -- one interval -------------------------------------------------------------------------------

    def _tick(self) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            if self._ping_outstanding:
                # The ping of the last interval got no pong: the hub is frozen or the path is dead.
                self._trouble("the hub did not answer the tunnel ping within one interval")
                self._drop_tunnel(tunnel, "no tunnel.pong from the hub")
                return
            # Set before sending: the pong may come back before ping() returns. A ping the writer cannot
            # get out (it is stuck on a hub that stopped reading) stays unanswered, which is the truth.
            self._ping_outstanding = True
            tunnel.ping({"type": "tunnel.ping", "timestamp": _ms()})
        self._heartbeat()

    def _heartbeat(self) -> None:
        seq = self.status.beats + 1
        started = self.clock()
        try:
            with self._in_flight:
                if self.stop.is_set():
                    return
                hub_status = self.client.heartbeat(
                    self.plan.code, self.plan.participant_id, self.request_timeout_s
                )
        except ParticipantNotFound:
            # The hub forgot us (a DELETE by someone, a sweep): register again under the same id.
            self._rejoin_pending = True
            if self._tunnel is not None:
                self._drop_tunnel(self._tunnel, "re-registering")
            return
        except RoomNotFound as exc:
            raise self._room_gone(exc) from None
        except (HubUnavailable, HubRejected) as exc:
            self._trouble(exc.message)
            return
        rtt_ms = round((self.clock() - started) * 1000, 2)
        self.status.beats = seq
        self.status.last_beat_at = self.clock()
        self.status.last_rtt_ms = rtt_ms
        self.status.hub_status = hub_status
        self.emit("heartbeat", seq=seq, rtt_ms=rtt_ms, status=hub_status)
        if hub_status == "offline" and self._paused is None and self._tunnel is not None:
            # The hub does not see our tunnel (a PUT resets it; a ping sets it again): rebuild it.
            self._trouble("the hub shows this participant offline")
            self._drop_tunnel(self._tunnel, "hub shows us offline")
            return
        if self.status.paused is not None and self._tunnel is None:
            if self.status.state == "reconnecting":
                # The hub answers again during the pause: the state is paused again, not online.
                self._announce_pause()
            return
        if self.status.state != "online" and self._tunnel is not None:
            self._back_online()

    # -- tunnel open/close ----------------------------------------------------------------------------

    def _register_and_open(self, startup: bool = False) -> dict[str, Any] | None:
        """PUT, then open the tunnel with that token (once, at once: it lives 60 s). A refused upgrade
        with 401 (token) is retried once with a fresh PUT."""
        for _ in range(2):
            with self._in_flight:
                if self.stop.is_set():
                    return None
                self.join_maybe_sent = True
                timeout_s = max(self.request_timeout_s, 2.0) if startup else self.request_timeout_s
                landed_before, self.join_may_have_landed = self.join_may_have_landed, True
                try:
                    reg = self.client.register(
                        self.plan.code,
                        self.plan.participant_id,
                        registration_body(self.plan, self.capabilities),
                        timeout_s,
                    )
                except HubUnavailable as exc:
                    if never_reached_the_hub(exc):
                        self.join_may_have_landed = landed_before
                    raise
                url = reg.tunnel_url + "?" + urlencode({"token": reg.token})
                try:
                    conn = self._connect(url, timeout_s)
                except TunnelRefused as exc:
                    if exc.status == 401:
                        continue  # token refused (expired, used): a fresh PUT gives a fresh one
                    self._refused(exc)
                except Exception as exc:  # OSError, TimeoutError, websockets' InvalidHandshake ...
                    # The token is a credential for 60 s: never let it into a message.
                    far = urlsplit(reg.tunnel_url)
                    why = describe_os_error(exc, far.hostname, far.port).replace(reg.token, "***")
                    raise HubUnavailable(f"cannot open the tunnel to {self.client.base_url}: {why}") from None
            self._start_tunnel(conn, reg.tunnel_url)
            if self.stop.is_set():
                self._close_tunnel(LEAVE_CLOSE_S, "participant leaving")
            return reg.participant
        raise HubUnavailable(f"the hub at {self.client.base_url} refused two fresh tunnel tokens in a row")

    def _refused(self, exc: TunnelRefused) -> NoReturn:
        try:
            doc = json.loads(exc.body)
            ecode = doc["error"]["code"]
        except (ValueError, KeyError, TypeError):
            ecode = None
        if ecode == "ROOM_NOT_FOUND":
            raise RoomNotFound(f"room {self.plan.code} was not found on {self.client.base_url}")
        if ecode == "PARTICIPANT_NOT_FOUND" or exc.status == 404:
            raise ParticipantNotFound("the hub forgot this participant before its tunnel opened", 404)
        if exc.status >= 500:
            raise HubUnavailable(
                f"the hub at {self.client.base_url} failed the tunnel upgrade: HTTP {exc.status}"
            )
        raise HubRejected(
            f"the hub at {self.client.base_url} refused the tunnel: HTTP {exc.status}", exc.status
        )

    def _start_tunnel(self, conn: Connection, url: str) -> None:
        with self._lock:
            self._serial += 1
            tunnel = _Tunnel(conn, self._serial)
            self._tunnel = tunnel
        self._ping_outstanding = False
        self._last_pong_at = self.clock()
        threading.Thread(target=self._reader, args=(tunnel,), name="llmroom-tunnel-read", daemon=True).start()
        threading.Thread(
            target=self._writer, args=(tunnel,), name="llmroom-tunnel-write", daemon=True
        ).start()
        self.status.tunnel = "connected"
        self.status.close_code = None
        self.status.close_meaning = None
        self.emit("tunnel", state="connected", url=url)

    def _reconnect(self) -> bool:
        """One attempt to be back in the room; False (trouble recorded) when the hub is not there yet."""
        try:
            self._register_and_open()
        except RoomNotFound as exc:
            raise self._room_gone(exc) from None
        except InvalidPassword:
            raise
        except (HubUnavailable, HubRejected) as exc:
            self._trouble(exc.message)
            return False
        if self._tunnel is None:
            return False
        if self._rejoin_pending:
            self._rejoin_pending = False
            self.status.rejoins += 1
            self.emit("rejoined", id=self.plan.participant_id)
        if self._resuming:
            self._resuming = False
            self.status.attempt = 0
            self.status.last_error = None
            self.status.state = "online"
            self.emit("resumed", id=self.plan.participant_id)
            return True
        self._back_online()
        return True

    def _room_gone(self, exc: RoomNotFound) -> RoomNotFound:
        return RoomNotFound(
            f"room {self.plan.code} is gone from the hub at {self.client.base_url}"
            " (a restarted hub forgets its rooms)",
            "ask the host for a new room code, then join again",
        )

    def _check_tunnel(self) -> None:
        """Notice a tunnel the hub (or the network) closed, and say why."""
        tunnel = self._tunnel
        if tunnel is None or not tunnel.closed.is_set() or tunnel.closed_by_us:
            return
        with self._lock:
            if self._tunnel is tunnel:
                self._tunnel = None
        code, reason = tunnel.close_code, tunnel.close_reason
        meaning = describe_close(code, reason)
        self.status.tunnel = "lost"
        self.status.close_code = code
        self.status.close_meaning = meaning
        self.emit(
            "tunnel", state="lost", code=code, reason=_clip(reason, 123), meaning=meaning, error=tunnel.error
        )
        if code == 1000 and reason.startswith("Superseded"):
            self.superseded = True
            raise TunnelSuperseded(
                f"another agent joined room {self.plan.code} as {self.plan.participant_id!r}"
                " and the hub gave it this participant's tunnel;"
                " this agent stopped rather than fight over the id",
                "give each agent its own id with --id",
            )
        self._trouble(f"tunnel closed: {meaning}")

    def _drop_tunnel(self, tunnel: _Tunnel, reason: str) -> None:
        """Close one of our tunnels ourselves (a rebuild): its close is not news."""
        with self._lock:
            if self._tunnel is tunnel:
                self._tunnel = None
        tunnel.closed_by_us = True
        self._shut(tunnel, 1000, reason[:120], LEAVE_CLOSE_S)
        self.status.tunnel = "lost"

    def _close_tunnel(self, timeout_s: float, reason: str) -> None:
        with self._lock:
            tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.closed_by_us = True
            self._shut(tunnel, 1000, reason, timeout_s)

    def _shut(self, tunnel: _Tunnel, code: int, reason: str, timeout_s: float) -> None:
        """Close handshake in a helper thread, bounded: a frozen hub or a blocked writer cannot hold it."""
        self._finish_shut(tunnel, self._start_shut(tunnel, code, reason), timeout_s)

    def _start_shut(self, tunnel: _Tunnel, code: int, reason: str) -> threading.Thread:
        tunnel.closed.set()
        with contextlib.suppress(queue.Full):
            tunnel.outbox.put_nowait(None)

        def close() -> None:
            with contextlib.suppress(Exception):
                tunnel.conn.close(code, reason)

        closer = threading.Thread(target=close, name="llmroom-tunnel-close", daemon=True)
        closer.start()
        return closer

    def _finish_shut(self, tunnel: _Tunnel, closer: threading.Thread, timeout_s: float) -> None:
        closer.join(timeout_s)
        if closer.is_alive():
            _abort(tunnel.conn)

    # -- reader / writer / workers ------------------------------------------------------------------

    def _reader(self, tunnel: _Tunnel) -> None:
        code: int | None = None
        reason = ""
        try:
            while True:
                message = tunnel.conn.recv()
                self._on_message(tunnel, message)
        except Exception as exc:  # ConnectionClosed (with the close frame, if any) or a socket error
            rcvd = getattr(exc, "rcvd", None)
            if rcvd is not None:
                code, reason = int(rcvd.code), str(rcvd.reason)
            else:
                tunnel.error = describe_os_error(exc)
                _abort(tunnel.conn)  # whatever broke the reader, the socket must not linger half-used
        finally:
            tunnel.close_code, tunnel.close_reason = code, reason
            tunnel.closed.set()
            with contextlib.suppress(queue.Full):
                tunnel.outbox.put_nowait(None)
            if not tunnel.closed_by_us:
                self._wake.set()

    def _writer(self, tunnel: _Tunnel) -> None:
        while True:
            ping, tunnel.ping_text = tunnel.ping_text, None
            if ping is not None and not tunnel.closed.is_set():
                try:
                    tunnel.conn.send(ping)
                except Exception:
                    tunnel.closed.set()
                    self._wake.set()
                    return
            try:
                text = tunnel.outbox.get(timeout=2.0)  # the timeout only backs up the None sentinel
            except queue.Empty:
                if tunnel.closed.is_set():
                    return
                continue
            if text is None or tunnel.closed.is_set():
                return
            if not text:
                continue  # the ping's wake-up
            try:
                tunnel.conn.send(text)
            except Exception:
                tunnel.closed.set()
                self._wake.set()
                return

    def _on_message(self, tunnel: _Tunnel, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except (ValueError, UnicodeDecodeError):
            return  # the hub ignores our garbage; we ignore its
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "tunnel.pong" and tunnel is self._tunnel:
            self._last_pong_at = self.clock()
            self._ping_outstanding = False
        elif kind == "tunnel.request":
            self._dispatch(tunnel, frame)

    def _dispatch(self, tunnel: _Tunnel, frame: dict[str, Any]) -> None:
        rid = frame.get("requestId")
        if not isinstance(rid, str) or not rid or len(rid) > 200:
            return
        path = frame.get("path")
        if not isinstance(path, str) or not path.startswith("/") or not isinstance(frame.get("method"), str):
            self._reply(tunnel, _error_frame(rid, "malformed tunnel.request"))
            return
        if not tunnel.workers.acquire(blocking=False):
            self._reply(
                tunnel,
                {
                    "type": "tunnel.response.start",
                    "requestId": rid,
                    "status": 429,
                    "headers": {"content-type": "application/json"},
                },
            )
            busy = json.dumps(
                {"error": {"message": "participant is at its concurrency limit", "type": "rate_limit"}}
            )
            self._reply(tunnel, _chunk_frame(rid, busy.encode()))
            self._reply(tunnel, {"type": "tunnel.response.end", "requestId": rid})
            return
        self.status.requests += 1

        def work() -> None:
            try:
                self.handler(frame, tunnel.send)
            except TunnelGone:
                pass
            except Exception as exc:  # a handler bug must not take the tunnel down: tell the hub
                with contextlib.suppress(TunnelGone):
                    tunnel.send(_error_frame(rid, exc))
            finally:
                tunnel.workers.release()

        threading.Thread(target=work, name=f"llmroom-request-{rid[:8]}", daemon=True).start()

    def _reply(self, tunnel: _Tunnel, frame: dict[str, Any]) -> None:
        """A frame from the reader thread itself (a refusal): waits for room, gives up if the tunnel goes."""
        with contextlib.suppress(TunnelGone):
            tunnel.send(frame)

    # -- state --------------------------------------------------------------------------------------

    def _trouble(self, reason: str) -> None:
        if self.status.state != "reconnecting":
            self.status.reconnects += 1
            self.status.attempt = 0
        self.status.attempt += 1
        self.status.last_error = reason
        self.status.state = "reconnecting"
        self.emit("reconnecting", reason=reason, attempt=self.status.attempt)

    def _back_online(self) -> None:
        was = self.status.state
        self.status.attempt = 0
        self.status.last_error = None
        self.status.state = "online"
        if was != "online":
            self.emit("online")

    # -- pause / resume -------------------------------------------------------------------------------

    def pause(self, reason: str, cause: str = "server_down") -> None:
        """Stop serving (the local server died, the GPU is busy): the lifecycle thread closes the
        tunnel at its next wake-up, which this causes at once; heartbeats go on. Thread-safe, returns
        at once; called again while paused it only updates the reason."""
        with self._pause_lock:
            self._paused = Pause(reason, cause)
            self._pause_changed = True
        self._wake.set()

    def resume(self) -> None:
        """Serve again: register (same id) and open a new tunnel, at once. Thread-safe."""
        with self._pause_lock:
            self._paused = None
            self._pause_changed = True
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self.status.paused is not None

    def _apply_pause(self) -> None:
        with self._pause_lock:
            self._pause_changed = False
            want = self._paused
        if want is not None:
            changed = (want.reason, want.cause) != (self.status.paused, self.status.pause_cause)
            first = self.status.paused is None
            self.status.paused, self.status.pause_cause = want.reason, want.cause
            self._resuming = False
            if first:
                self._close_tunnel(LEAVE_CLOSE_S, "paused: not serving for now")
                self.status.tunnel = "paused"
            if first or changed:
                self._announce_pause()
        elif self.status.paused is not None:
            self.status.paused = self.status.pause_cause = None
            # The loop reconnects now (no tunnel, not paused); that tunnel is announced as `resumed`.
            self._resuming = True

    def _announce_pause(self) -> None:
        self.status.state = "paused"
        self.status.attempt = 0
        self.status.last_error = None
        self.emit("paused", reason=self.status.paused, cause=self.status.pause_cause)

    # -- leave --------------------------------------------------------------------------------------

    def abandon(self) -> None:
        """Stop without a DELETE (superseded, room gone, refused): close a tunnel still open, quietly."""
        self.stop.set()
        self._close_tunnel(LEAVE_CLOSE_S, "participant stopping")
        self.left = True
        self.status.state = "left"

    def leave(self) -> bool:
        """Close the tunnel with 1000, then DELETE; True when the hub confirmed (or we were already
        gone). Bounded even when the hub is frozen: a wait for a call in flight
        (LEAVE_WAIT_INFLIGHT_S), then the close frame and the DELETE (LEAVE_DELETE_S) with the close
        handshake awaited alongside (LEAVE_CLOSE_S): about 1.8 s, under 2.5 s at worst. After a
        supersede it sends nothing: the id now belongs to the other agent."""
        if self.left or not self.join_maybe_sent:
            return True
        self.stop.set()
        self.status.state = "leaving"
        if self.superseded:
            self.left = True
            self.status.state = "left"
            return True
        got = self._in_flight.acquire(timeout=LEAVE_WAIT_INFLIGHT_S)
        if got and not self.join_may_have_landed:
            # Every registration was refused at the connection: nothing of ours is on the hub.
            self._in_flight.release()
            self.left = True
            self.status.state = "left"
            return True
        with self._lock:
            tunnel, self._tunnel = self._tunnel, None
        closer = None
        started = time.monotonic()
        try:
            if tunnel is not None:
                # The close frame goes first; its echo is awaited alongside the DELETE, not before it,
                # so a frozen hub costs max(close, DELETE) rather than their sum.
                tunnel.closed_by_us = True
                closer = self._start_shut(tunnel, 1000, "participant leaving")
                closer.join(LEAVE_CLOSE_FIRST_S)
            self.status.tunnel = "closed"
            self.client.delete(self.plan.code, self.plan.participant_id, timeout_s=LEAVE_DELETE_S)
            confirmed = True
        except (ParticipantNotFound, RoomNotFound):
            confirmed = True
        except LlmroomError:
            confirmed = False
        finally:
            if tunnel is not None and closer is not None:
                self._finish_shut(tunnel, closer, max(0.0, LEAVE_CLOSE_S - (time.monotonic() - started)))
            if got:
                self._in_flight.release()
        self.left = True
        self.status.state = "left"
        return confirmed


def run_tunnel_session(
    session: TunnelSession, wake: threading.Event, on_started: Callable[[], None] | None = None
) -> Outcome:
    """`run_session` for a TunnelSession. Nothing is DELETEd when the room is gone, the hub refused
    us, or the id is another agent's (superseded): the session just lets go of its tunnel."""
    return run_session(
        session,
        wake,
        on_started,
        nothing_to_leave=(RoomNotFound, InvalidPassword, TunnelSuperseded),
        on_nothing_to_leave=session.abandon,
        thread_name="llmroom-tunnel-session",
    )
