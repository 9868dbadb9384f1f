"""A fake of the reference Gambi v0.6 hub, quirks included, in-process on an ephemeral port.

Built from the wire recordings in tests/fixtures/gambi-v06/ and ../shared/reference/gambi-v06-api.md
(sections 2 to 7). It is what `llmroom join` meets when it joins a real Gambi v0.6 hub, so the agent's
tests can check behaviour against the reference without Bun. It is test code: aiohttp.web in a thread
of its own, loopback only, nothing persisted.

Usage::

    with FakeGambiV06(tunnel_timeout_s=1.0, sweep_interval_s=0.2) as hub:
        code = hub.create_room("Open Room")            # or POST {hub.url}/v1/rooms
        ...                                            # the agent joins {hub.url}
        hub.wait_for(lambda: hub.participant(code, "p1")["connection"]["connected"])

Constructor settings (defaults are the reference's values):
    host, port            where to listen (port 0: an ephemeral port, kept across `restart`)
    tunnel_timeout_s      30: a tunnel with no valid participant message for longer is closed with
                          4001 "Tunnel heartbeat timed out." by the next sweep
    participant_timeout_s 30: a participant whose lastSeen (management heartbeat) is older is set
                          `offline`, and `participant.offline` is sent again at every sweep
    sweep_interval_s      10: how often both checks above run
    token_ttl_s           60: tunnel bootstrap token lifetime (single use)
    max_frame_bytes       16 MiB: a participant frame larger than this drops the TCP connection with no
                          close frame (the reference fell over at an 18.2 MB frame)
    client_idle_timeout_s 10 (Bun's idle timeout; None disables it): a streamed answer or an SSE stream
                          that writes nothing to its client for this long is cut (the TTFT > 10 s case)
    crash_on_late_chunk   True: a chunk for a stream whose client has gone "crashes" the hub as the
                          reference does (hub.ts:584): every connection dropped, every room lost, the
                          port closed; `crashed` is set. False: the chunk is ignored.

Quirks reproduced on purpose (each is the reference's observed behaviour):
    * every PUT marks the participant offline/disconnected and issues a new token; older tokens stay
      valid (single use, TTL) and are never revoked;
    * DELETE leaves the participant's WebSocket open; messages on such an orphaned socket are ignored
      (pings get no pong) and no sweep ever closes it;
    * only the participant pings; the hub answers `tunnel.pong` with its clock and sends no WebSocket
      control pings; a participant's `tunnel.pong` does not count as liveness;
    * a second tunnel for the same id closes the first with 1000 "Superseded by a newer tunnel session.";
      stop() and restart() close tunnels with 1001 "Hub shutting down.";
    * the participant's own close code and reason are echoed;
    * garbage, unknown types, schema failures and unknown requestIds are silently ignored; binary frames
      holding JSON are accepted;
    * inference errors are plain {"error": "..."} (404/409/503/502), invalid JSON or a missing `model`
      on the inference plane is a 500 HTML page; non-streamed answers go out at `end`, re-serialised;
    * a heartbeat never reconnects anything and leaves `busy` alone;
    * legacy v0.1 routes answer 404 with the INVALID_REQUEST "Route not found." envelope.

Test controls (all thread-safe, callable from the test thread):
    url, ws_url, port            where it listens (`http://127.0.0.1:PORT`, `ws://127.0.0.1:PORT`)
    create_room(name, password=None, defaults=None) -> code
    rooms() / participants(code) / participant(code, id)   public JSON snapshots (None when absent)
    freeze() / unfreeze()        stop answering HTTP and WebSocket (requests hang, pings go unanswered,
                                 sweeps pause), like SIGSTOP; connections are still accepted
    restart(keep_rooms, graceful=True)  stop and listen again on the same port; graceful closes tunnels
                                 with 1001, else TCP drops (SIGKILL); keep_rooms=False loses every room
    close_tunnel(id, code, reason, room=None)   close a participant's current tunnel from the hub side
    drop_tunnel(id, room=None)   drop its TCP connection with no close frame
    delete_participant(code, id) what DELETE does (socket left open)
    requests                     list of RecordedRequest(method, path, query, headers, body) per HTTP
                                 request, WebSocket upgrades included (a request that waits out a
                                 freeze is logged at the thaw; one that meets a stopping hub is not:
                                 its connection is dropped, as a dying process would)
    frames                       list of Frame(direction "in"|"out", room, participant_id, kind
                                 "text"|"binary"|"close", data, size, close_code, close_reason)
    tunnel_frames(id, direction=None, type_=None) -> parsed JSON messages of that participant
    crashed                      threading.Event, set when crash_on_late_chunk fired
    wait_for(cond, what, timeout_s) poll a condition (a hang guard, not a speed assertion)
    stop()                       also on context exit
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import random
import re
import secrets
import string
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

JSON_TYPE = "application/json;charset=utf-8"
CORS = {"Access-Control-Allow-Origin": "*"}
ROUTE_NOT_FOUND = ("INVALID_REQUEST", "Route not found.", "Check the requested path and HTTP method.")
ROOM_HINT = "Run 'gambi room list' to inspect available rooms."
SUPERSEDED = "Superseded by a newer tunnel session."
SHUTTING_DOWN = "Hub shutting down."
TIMED_OUT = "Tunnel heartbeat timed out."
GENERATION_KEYS = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)
SPEC_KEYS = ("gpu", "vram", "ram", "cpu")
CAPABILITY_VALUES = ("supported", "unsupported", "unknown")
_CODE_ALPHABET = string.ascii_uppercase + string.digits + "_-"
_NANOID_ALPHABET = string.ascii_letters + string.digits + "_-"
_FRAME_LOG_LIMIT = 4 * 1024 * 1024  # frames larger than this are logged by size only
BUN_ERROR_PAGE = (
    "<!doctype html>\n<html><head><title>Bun error</title></head><body>"
    "<div id='BunErrorOverlay-container'>TypeError (fake of Bun's 66 KB error page)</div></body></html>"
)


def now_ms() -> int:
    return int(time.time() * 1000)


def _nanoid(size: int = 21) -> str:
    return "".join(secrets.choice(_NANOID_ALPHABET) for _ in range(size))


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the fake hub received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Frame:
    """One WebSocket message on a tunnel. `in` is participant -> hub."""

    direction: Literal["in", "out"]
    room: str
    participant_id: str
    kind: Literal["text", "binary", "close"]
    data: str | bytes | None
    size: int
    close_code: int | None = None
    close_reason: str = ""
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        """The message parsed as JSON, or None when it is not JSON (or was too large to log)."""
        if self.data is None or self.kind == "close":
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


@dataclass
class _Pending:
    request_id: str
    participant_id: str
    stream: bool
    queue: asyncio.Queue[tuple[Any, ...]]
    client_gone: bool = False


@dataclass(eq=False)  # identity: tunnels live in sets
class _Tunnel:
    ws: web.WebSocketResponse
    room: str
    participant_id: str
    transport: asyncio.BaseTransport | None
    pending: dict[str, _Pending] = field(default_factory=dict)
    last_seen_s: float = field(default_factory=time.monotonic)
    orphaned: bool = False


@dataclass
class _Participant:
    id: str
    nickname: str
    model: str
    endpoint: str
    specs: dict[str, Any]
    config: dict[str, Any]
    instructions: str | None
    capabilities: dict[str, str]
    joined_at: int
    last_seen: int
    updated_at: int
    last_seen_s: float = field(default_factory=time.monotonic)
    status: str = "offline"
    connected: bool = False
    last_tunnel_seen_at: int | None = None
    in_flight: int = 0

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "nickname": self.nickname,
            "model": self.model,
            "endpoint": self.endpoint,
            "config": {**self.config, "hasInstructions": self.instructions is not None},
            "specs": dict(self.specs),
            "capabilities": dict(self.capabilities),
            "connection": {
                "kind": "tunnel",
                "connected": self.connected,
                "lastTunnelSeenAt": self.last_tunnel_seen_at,
            },
            "status": self.status,
            "joinedAt": self.joined_at,
            "lastSeen": self.last_seen,
            "updatedAt": self.updated_at,
        }


@dataclass
class _Room:
    id: str
    code: str
    name: str
    host_id: str
    created_at: int
    password: str | None
    defaults: dict[str, Any]
    instructions: str | None
    participants: dict[str, _Participant] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "code": self.code,
            "name": self.name,
            "hostId": self.host_id,
            "createdAt": self.created_at,
        }
        if self.defaults or self.instructions is not None:
            out["defaults"] = {**self.defaults, "hasInstructions": self.instructions is not None}
        out["passwordProtected"] = self.password is not None
        out["participantCount"] = len(self.participants)
        return out


class _Invalid(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint, self.details = status, code, message, hint, details


def _envelope_error(
    status: int, code: str, message: str, hint: str | None, details: Any = None
) -> web.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if hint:
        err["hint"] = hint
    if details is not None:
        err["details"] = details
    return _json(status, {"error": err, "meta": {"requestId": str(uuid.uuid4())}})


def _ok(status: int, data: Any) -> web.Response:
    return _json(status, {"data": data, "meta": {"requestId": str(uuid.uuid4())}})


def _json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers={**CORS, "Content-Type": JSON_TYPE},
    )


def _plain_error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


def _room_not_found() -> _Invalid:
    return _Invalid(404, "ROOM_NOT_FOUND", "Room not found.", ROOM_HINT)


def _participant_not_found() -> _Invalid:
    return _Invalid(
        404, "PARTICIPANT_NOT_FOUND", "Participant not found.", "Check the participant id and retry."
    )


def _parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise _Invalid(
            400,
            "INVALID_REQUEST",
            "Invalid JSON body.",
            "Provide a valid JSON object and retry.",
            {"cause": "Failed to parse JSON"},
        ) from None


def _generation_errors(cfg: Any) -> dict[str, list[str]]:
    """The zod checks the reference applies to room defaults and participant config."""
    errors: dict[str, list[str]] = {}
    if not isinstance(cfg, dict):
        return {"_": ["Invalid input: expected object"]}
    limits = {
        "temperature": (0, 2),
        "top_p": (0, 1),
        "frequency_penalty": (-2, 2),
        "presence_penalty": (-2, 2),
    }
    for key, (lo, hi) in limits.items():
        if key in cfg:
            v = cfg[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                errors[key] = ["Invalid input: expected number"]
            elif v > hi:
                errors[key] = [f"Too big: expected number to be <={hi}"]
            elif v < lo:
                errors[key] = [f"Too small: expected number to be >={lo}"]
    for key in ("max_tokens", "seed"):
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool)):
            errors[key] = ["Invalid input: expected int"]
    if "instructions" in cfg and not isinstance(cfg["instructions"], str):
        errors["instructions"] = ["Invalid input: expected string"]
    return errors


def _split_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    kept = {k: cfg[k] for k in GENERATION_KEYS if k in cfg}
    instructions = cfg.get("instructions")
    return kept, instructions if isinstance(instructions, str) else None


def _is_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return (
        bool(parts.scheme)
        and bool(parts.netloc or parts.path)
        and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme) is not None
        and " " not in value
    )


class FakeGambiV06:
    """The reference v0.6 hub's wire behaviour on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tunnel_timeout_s: float = 30.0,
        participant_timeout_s: float = 30.0,
        sweep_interval_s: float = 10.0,
        token_ttl_s: float = 60.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
        client_idle_timeout_s: float | None = 10.0,
        crash_on_late_chunk: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.tunnel_timeout_s = tunnel_timeout_s
        self.participant_timeout_s = participant_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.token_ttl_s = token_ttl_s
        self.max_frame_bytes = max_frame_bytes
        self.client_idle_timeout_s = client_idle_timeout_s
        self.crash_on_late_chunk = crash_on_late_chunk
        self.requests: list[RecordedRequest] = []
        self.frames: list[Frame] = []
        self.crashed = threading.Event()
        self._rooms: dict[str, _Room] = {}
        # token -> (room code, participant id, monotonic expiry)
        self._tokens: dict[str, tuple[str, str, float]] = {}
        self._tunnels: dict[tuple[str, str], _Tunnel] = {}
        self._all_sockets: set[_Tunnel] = set()
        self._sse: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        self._responses: dict[str, tuple[str, str, bool]] = {}  # response id -> (room, pid, fallback)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._thawed: asyncio.Event | None = None
        self._http_transports: set[asyncio.BaseTransport] = set()
        self._crash_task: asyncio.Task[None] | None = None
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> FakeGambiV06:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-gambi-v06", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("fake hub did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close tunnels with 1001 "Hub shutting down.", end event streams, stop listening."""
        if self._loop is None or self._thread is None:
            return
        try:
            self._call(self._shutdown(graceful=True), timeout_s=15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
            self._loop = None
            self._thread = None

    def __enter__(self) -> FakeGambiV06:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, keep_rooms: bool, graceful: bool = True) -> None:
        """Stop and listen again on the same port, as a hub process restart would.

        graceful: tunnels get 1001 (SIGINT); otherwise their TCP connections drop (SIGKILL).
        keep_rooms: rooms and participants survive (offline, no tunnel, no tokens); else all lost.
        """
        self._call(self._restart(keep_rooms, graceful), timeout_s=15)

    def freeze(self) -> None:
        """Stop answering HTTP and WebSocket until unfreeze(), like a SIGSTOPped process."""
        self._call(self._set_frozen(True))

    def unfreeze(self) -> None:
        self._call(self._set_frozen(False))

    def close_tunnel(self, participant_id: str, code: int, reason: str, room: str | None = None) -> None:
        self._call(self._close_tunnel(participant_id, code, reason, room))

    def drop_tunnel(self, participant_id: str, room: str | None = None) -> None:
        """Drop the tunnel's TCP connection without a close frame."""
        self._call(self._drop_tunnel(participant_id, room))

    def delete_participant(self, code: str, participant_id: str) -> bool:
        """Remove a participant as DELETE does (its socket stays open). False when absent."""
        return bool(self._call(self._delete(code.upper(), participant_id)))

    def create_room(
        self, name: str, password: str | None = None, defaults: dict[str, Any] | None = None
    ) -> str:
        return str(self._call(self._create_room(name, password, defaults or {})))

    def rooms(self) -> list[dict[str, Any]]:
        return list(self._call(self._snapshot(lambda: [r.summary() for r in self._rooms.values()])))

    def participants(self, code: str) -> list[dict[str, Any]] | None:
        def snap() -> list[dict[str, Any]] | None:
            room = self._rooms.get(code.upper())
            return None if room is None else [p.public() for p in room.participants.values()]

        result: list[dict[str, Any]] | None = self._call(self._snapshot(snap))
        return result

    def participant(self, code: str, participant_id: str) -> dict[str, Any] | None:
        def snap() -> dict[str, Any] | None:
            room = self._rooms.get(code.upper())
            p = None if room is None else room.participants.get(participant_id)
            return None if p is None else p.public()

        result: dict[str, Any] | None = self._call(self._snapshot(snap))
        return result

    def tunnel_frames(
        self, participant_id: str, direction: str | None = None, type_: str | None = None
    ) -> list[Any]:
        """The parsed JSON messages of one participant's tunnels, in order."""
        out = []
        for f in list(self.frames):
            if f.participant_id != participant_id or (direction and f.direction != direction):
                continue
            msg = f.json()
            if isinstance(msg, dict) and (type_ is None or msg.get("type") == type_):
                out.append(msg)
        return out

    def wait_for(self, cond: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    # ---- plumbing --------------------------------------------------------------------------------

    def _call(self, coro: Awaitable[Any], timeout_s: float = 10.0) -> Any:
        assert self._loop is not None, "fake hub not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    async def _snapshot(self, fn: Callable[[], Any]) -> Any:
        return fn()

    async def _start_async(self) -> None:
        self._thawed = asyncio.Event()
        self._thawed.set()
        await self._listen()

    async def _listen(self) -> None:
        self._closing = False
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a client that goes away cancels its handler, which is how the hub
        # learns that a streamed request's client has gone (the reference frees the participant then).
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp keeps the bound socket here
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _shutdown(self, graceful: bool) -> None:
        # A process that is going away answers nothing more: stop listening and drop any new request
        # on a kept-alive connection first, then close the tunnels (1001) and the rest.
        self._closing = True
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        if self._thawed is not None:
            self._thawed.set()  # a stopped or restarted process is not frozen any more
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for tunnel in list(self._all_sockets):
            if graceful:
                await self._close_ws(tunnel, 1001, SHUTTING_DOWN)
            else:
                self._abort(tunnel.transport)
        self._all_sockets.clear()
        self._tunnels.clear()
        for queues in self._sse.values():
            for q in queues:
                q.put_nowait(None)
        self._sse.clear()
        if not graceful:
            for t in list(self._http_transports):
                self._abort(t)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _restart(self, keep_rooms: bool, graceful: bool) -> None:
        await self._shutdown(graceful)
        self._tokens.clear()
        self._responses.clear()
        if keep_rooms:
            for room in self._rooms.values():
                for p in room.participants.values():
                    p.connected, p.last_tunnel_seen_at, p.status, p.in_flight = False, None, "offline", 0
        else:
            self._rooms.clear()
        await self._listen()

    async def _crash(self) -> None:
        """What the reference does on a chunk for a closed stream controller: the process exits."""
        self.crashed.set()
        await self._shutdown(graceful=False)
        self._rooms.clear()
        self._tokens.clear()

    async def _set_frozen(self, frozen: bool) -> None:
        assert self._thawed is not None
        if frozen:
            self._thawed.clear()
        else:
            self._thawed.set()

    async def _thaw(self) -> None:
        assert self._thawed is not None
        await self._thawed.wait()

    @staticmethod
    def _abort(transport: asyncio.BaseTransport | None) -> None:
        if transport is not None and hasattr(transport, "abort"):
            transport.abort()

    def _log_frame(
        self,
        direction: Literal["in", "out"],
        tunnel: _Tunnel,
        kind: Literal["text", "binary", "close"],
        data: str | bytes | None,
        *,
        code: int | None = None,
        reason: str = "",
    ) -> None:
        size = 0 if data is None else len(data)
        logged = data if size <= _FRAME_LOG_LIMIT else None
        self.frames.append(
            Frame(direction, tunnel.room, tunnel.participant_id, kind, logged, size, code, reason)
        )

    async def _send(self, tunnel: _Tunnel, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"))
        self._log_frame("out", tunnel, "text", text)
        await tunnel.ws.send_str(text)

    async def _close_ws(self, tunnel: _Tunnel, code: int, reason: str) -> None:
        if tunnel.ws.closed:
            return
        self._log_frame("out", tunnel, "close", None, code=code, reason=reason)
        try:
            await asyncio.wait_for(tunnel.ws.close(code=code, message=reason.encode()), 2.0)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            self._abort(tunnel.transport)

    # ---- HTTP ------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transport = request.transport
        if self._closing:
            self._abort(transport)
            raise web.HTTPServiceUnavailable()  # never seen: the connection is already gone
        if transport is not None:
            self._http_transports.add(transport)
        try:
            await self._thaw()
            if self._closing:  # shut down while this request waited for a thaw
                self._abort(transport)
                raise web.HTTPServiceUnavailable()
            body = await request.read()
            self.requests.append(
                RecordedRequest(
                    request.method, request.path, request.query_string, dict(request.headers), body
                )
            )
            await self._thaw()
            try:
                return await handler(request)
            except _Invalid as exc:
                return _envelope_error(exc.status, exc.code, exc.message, exc.hint, exc.details)
        finally:
            if transport is not None:
                self._http_transports.discard(transport)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        if method == "OPTIONS":
            return web.Response(
                status=204,
                headers={
                    **CORS,
                    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": "Content-Type, Authorization",
                },
            )
        segs = [s for s in path.split("/") if s != ""]
        body = await request.read()
        if segs[:1] == ["v1"]:
            rest = segs[1:]
            if rest == ["health"] and method == "GET":
                return _ok(200, {"status": "ok", "timestamp": now_ms()})
            if rest == ["rooms"] and method == "POST":
                return await self._post_room(body)
            if rest == ["rooms"] and method == "GET":
                return _ok(200, [r.summary() for r in self._rooms.values()])
            if len(rest) >= 2 and rest[0] == "rooms":
                code = rest[1].upper()
                tail = rest[2:]
                if tail == [] and method == "GET":
                    return _ok(200, self._room(code).summary())
                if tail == ["participants"] and method == "GET":
                    return _ok(200, [p.public() for p in self._room(code).participants.values()])
                if tail == ["events"] and method == "GET":
                    return await self._events(request, code)
                if len(tail) == 2 and tail[0] == "participants" and method == "PUT":
                    return await self._put_participant(request, code, tail[1], body)
                if len(tail) == 2 and tail[0] == "participants" and method == "DELETE":
                    room = self._room(code)
                    if not await self._delete(room.code, tail[1]):
                        raise _participant_not_found()
                    return _ok(200, {"success": True})
                if (
                    len(tail) == 3
                    and tail[0] == "participants"
                    and tail[2] == "heartbeat"
                    and method == "POST"
                ):
                    return self._heartbeat(code, tail[1])
                if len(tail) == 3 and tail[0] == "participants" and tail[2] == "tunnel" and method == "GET":
                    return await self._tunnel(request, code, tail[1])
        elif segs[:1] == ["rooms"] and len(segs) >= 3:
            code = segs[1].upper()
            tail = segs[2:]
            if tail == ["events"] and method == "GET":
                return await self._events(request, code)
            if tail == ["v1", "models"] and method == "GET":
                return self._models(code)
            if tail == ["v1", "chat", "completions"] and method == "POST":
                return await self._inference(request, code, "chat", body)
            if tail == ["v1", "responses"] and method == "POST":
                return await self._inference(request, code, "responses", body)
            if len(tail) >= 3 and tail[:2] == ["v1", "responses"]:
                return await self._response_lifecycle(request, code, tail[2:], method)
        raise _Invalid(404, *ROUTE_NOT_FOUND)

    def _room(self, code: str) -> _Room:
        room = self._rooms.get(code.upper())
        if room is None:
            raise _room_not_found()
        return room

    async def _create_room(self, name: str, password: str | None, defaults: dict[str, Any]) -> str:
        code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(6))
        while code in self._rooms:
            code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(6))
        kept, instructions = _split_config(defaults)
        self._rooms[code] = _Room(
            _nanoid(), code, name, str(uuid.uuid4()), now_ms(), password, kept, instructions
        )
        return code

    async def _post_room(self, body: bytes) -> web.Response:
        data = _parse_json_body(body)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].strip():
            raise _Invalid(
                400, "INVALID_REQUEST", "Name is required", "Provide a room name via the 'name' field."
            )
        defaults = data.get("defaults") or {}
        errors = _generation_errors(defaults)
        if errors:
            raise _Invalid(
                400,
                "INVALID_REQUEST",
                "Invalid room defaults.",
                "Check the runtime config payload and retry.",
                {"formErrors": [], "fieldErrors": errors},
            )
        password = (
            data.get("password") if isinstance(data.get("password"), str) and data.get("password") else None
        )
        code = await self._create_room(data["name"], password, defaults)
        room = self._rooms[code]
        return _ok(201, {"room": room.summary(), "hostId": room.host_id})

    async def _put_participant(self, request: web.Request, code: str, pid: str, body: bytes) -> web.Response:
        data = _parse_json_body(body)
        if not isinstance(data, dict):
            data = {}
        if "authHeaders" in data:
            raise _Invalid(
                400,
                "INVALID_REQUEST",
                "Participant auth headers are not accepted by the hub.",
                "Pass authHeaders to createParticipantSession() or the CLI runtime so credentials stay local "
                "to the participant.",
                {"forbidden": ["authHeaders"]},
            )
        required = ["nickname", "model", "endpoint"]
        if any(not data.get(k) for k in required):
            raise _Invalid(
                400,
                "INVALID_REQUEST",
                "Missing required fields.",
                "Provide nickname, model, and endpoint.",
                {"required": required},
            )
        errors: dict[str, list[str]] = {}
        for key in ("nickname", "model"):
            if not isinstance(data[key], str):
                errors[key] = ["Invalid input: expected string"]
        if not _is_url(data["endpoint"]):
            errors["endpoint"] = ["Invalid URL"]
        specs = data.get("specs", {})
        if not isinstance(specs, dict):
            errors["specs"] = ["Invalid input: expected object"]
            specs = {}
        config = data.get("config", {})
        cfg_errors = _generation_errors(config)
        if cfg_errors:
            errors["config"] = [f"{k}: {v[0]}" for k, v in cfg_errors.items()]
            config = {}
        caps = data.get("capabilities", {})
        if not isinstance(caps, dict) or any(
            caps.get(k) not in (None, *CAPABILITY_VALUES) for k in ("openResponses", "chatCompletions")
        ):
            errors["capabilities"] = ['Invalid option: expected one of "supported"|"unsupported"|"unknown"']
            caps = {}
        if errors:
            raise _Invalid(
                400,
                "INVALID_REQUEST",
                "Invalid participant registration.",
                "Check the participant payload and retry.",
                {"formErrors": [], "fieldErrors": errors},
            )
        room = self._room(code)
        if room.password is not None:
            given = data.get("password")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), room.password.encode()):
                raise _Invalid(
                    401,
                    "INVALID_PASSWORD",
                    "Invalid password.",
                    "Provide the correct room password and retry.",
                )
        kept, instructions = _split_config(config)
        now = now_ms()
        existing = room.participants.get(pid)
        participant = _Participant(
            id=pid,  # the path id wins over any id in the body
            nickname=data["nickname"],
            model=data["model"],
            endpoint=data["endpoint"],
            specs={k: specs[k] for k in SPEC_KEYS if k in specs},
            config=kept,
            instructions=instructions,
            capabilities={
                "openResponses": caps.get("openResponses", "unknown"),
                "chatCompletions": caps.get("chatCompletions", "unknown"),
            },
            joined_at=existing.joined_at if existing else now,
            last_seen=now,
            updated_at=now,
            # Quirk (hub.ts:1036-1054): every PUT resets the connection, even with a tunnel open.
            status="offline",
            connected=False,
            last_tunnel_seen_at=None,
            in_flight=existing.in_flight if existing else 0,
        )
        room.participants[pid] = participant
        token = str(uuid.uuid4())
        # Quirk: earlier tokens are not revoked.
        self._tokens[token] = (room.code, pid, time.monotonic() + self.token_ttl_s)
        host = request.headers.get("Host", f"{self.host}:{self.port}")
        self._broadcast(
            room.code, "participant.updated" if existing else "participant.joined", participant.public()
        )
        return _ok(
            200 if existing else 201,
            {
                "participant": participant.public(),
                "roomId": room.id,
                "tunnel": {
                    "token": token,
                    "url": f"ws://{host}/v1/rooms/{room.code}/participants/{pid}/tunnel",
                },
            },
        )

    def _heartbeat(self, code: str, pid: str) -> web.Response:
        room = self._room(code)
        p = room.participants.get(pid)
        if p is None:
            raise _participant_not_found()
        p.last_seen, p.last_seen_s = now_ms(), time.monotonic()
        if p.status != "busy":
            p.status = "online" if p.connected else "offline"
        return _ok(200, {"success": True, "status": p.status, "lastSeen": p.last_seen})

    async def _delete(self, code: str, pid: str) -> bool:
        room = self._rooms.get(code)
        if room is None or pid not in room.participants:
            return False
        del room.participants[pid]
        tunnel = self._tunnels.pop((code, pid), None)
        if tunnel is not None:
            # Quirk (hub.ts:1112): the socket is left open, and nothing on it is answered any more.
            tunnel.orphaned = True
            for pending in tunnel.pending.values():
                pending.queue.put_nowait(("disconnected",))
        self._broadcast(code, "participant.left", {"participantId": pid})
        return True

    # ---- tunnel ----------------------------------------------------------------------------------

    async def _tunnel(self, request: web.Request, code: str, pid: str) -> web.StreamResponse:
        room = self._room(code)
        token = request.query.get("token")
        if not token:
            raise _Invalid(
                400,
                "INVALID_REQUEST",
                "Tunnel token is required.",
                "Reconnect using the bootstrap token returned during join.",
            )
        if pid not in room.participants:
            raise _participant_not_found()
        entry = self._tokens.get(token)
        if entry is None or entry[0] != room.code or entry[1] != pid or entry[2] < time.monotonic():
            raise _Invalid(
                401,
                "INVALID_REQUEST",
                "Tunnel token is invalid or expired.",
                "Re-register the participant and retry the tunnel connection.",
            )
        if request.headers.get("Upgrade", "").lower() != "websocket":
            # The token is not consumed by a failed upgrade.
            raise _Invalid(
                400,
                "INTERNAL_ERROR",
                "Failed to upgrade the participant tunnel.",
                "Retry the join operation.",
            )
        del self._tokens[token]
        # autoclose/autoping off: the participant's close code is echoed and a frozen hub answers nothing.
        # max_msg_size is a backstop only; max_frame_bytes is checked below to drop TCP like the reference.
        ws = web.WebSocketResponse(
            autoclose=False,
            autoping=False,
            compress=False,
            max_msg_size=max(4 * self.max_frame_bytes, 1 << 26),
        )
        tunnel = _Tunnel(ws, room.code, pid, request.transport)
        self._all_sockets.add(tunnel)
        old = self._tunnels.get((room.code, pid))
        self._tunnels[(room.code, pid)] = tunnel
        # Online "at once" (hub.ts:2847-2870): set before the 101 goes out, so that a heartbeat sent
        # right after the client sees the upgrade can never find the participant still disconnected.
        p = room.participants.get(pid)
        if p is not None:
            p.connected, p.last_tunnel_seen_at, p.status = True, now_ms(), "online"
        try:
            await ws.prepare(request)
            if old is not None:
                self._fail_pending(old)
                await self._close_ws(old, 1000, SUPERSEDED)
            await self._tunnel_loop(tunnel)
        finally:
            self._all_sockets.discard(tunnel)
            self._fail_pending(tunnel)
            if self._tunnels.get((tunnel.room, pid)) is tunnel:
                del self._tunnels[(tunnel.room, pid)]
                r = self._rooms.get(tunnel.room)
                q = r.participants.get(pid) if r else None
                if q is not None:
                    q.connected, q.last_tunnel_seen_at, q.status = False, None, "offline"
        return ws

    def _fail_pending(self, tunnel: _Tunnel) -> None:
        for pending in list(tunnel.pending.values()):
            pending.queue.put_nowait(("disconnected",))
        tunnel.pending.clear()

    async def _tunnel_loop(self, tunnel: _Tunnel) -> None:
        ws = tunnel.ws
        while True:
            await self._thaw()
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                return
            await self._thaw()
            if msg.type == WSMsgType.CLOSE:
                code = int(msg.data or 1005)
                reason = msg.extra or ""
                self._log_frame("in", tunnel, "close", None, code=code, reason=reason)
                echo = code if code not in (1005, 1006) else 1000
                self._log_frame("out", tunnel, "close", None, code=echo, reason=reason)
                await ws.close(code=echo, message=reason.encode())
                return
            if msg.type == WSMsgType.PING:
                if not tunnel.orphaned:
                    await ws.pong(msg.data)
                continue
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            raw: str | bytes = msg.data
            self._log_frame("in", tunnel, "text" if msg.type == WSMsgType.TEXT else "binary", raw)
            if len(raw) > self.max_frame_bytes:
                # The reference dropped the TCP connection with no close frame at 18.2 MB.
                self._abort(tunnel.transport)
                return
            if tunnel.orphaned:
                continue
            await self._on_message(tunnel, raw)

    async def _on_message(self, tunnel: _Tunnel, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        rid = message.get("requestId")
        if kind == "tunnel.ping":
            if not isinstance(message.get("timestamp", 0), (int, float)):
                return
            self._touch(tunnel)
            await self._send(tunnel, {"type": "tunnel.pong", "timestamp": now_ms()})
            return
        if kind not in (
            "tunnel.response.start",
            "tunnel.response.chunk",
            "tunnel.response.end",
            "tunnel.response.error",
        ):
            return  # includes a participant-sent tunnel.pong: it does not count as liveness
        if not isinstance(rid, str):
            return
        if kind == "tunnel.response.start":
            status = message.get("status")
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                return
            headers = message.get("headers", {})
            if not isinstance(headers, dict):
                return
            item: tuple[Any, ...] = ("start", status, headers)
        elif kind == "tunnel.response.chunk":
            try:
                chunk = base64.b64decode(str(message.get("chunk")), validate=True)
            except ValueError:
                return
            item = ("chunk", chunk)
        elif kind == "tunnel.response.end":
            item = ("end",)
        else:
            item = ("error", str(message.get("stage", "proxy")), str(message.get("message", "")))
        self._touch(tunnel)
        pending = tunnel.pending.get(rid)
        if pending is None:
            return
        if pending.client_gone:
            if kind == "tunnel.response.chunk" and pending.stream and self.crash_on_late_chunk:
                self._crash_task = asyncio.get_running_loop().create_task(self._crash())
                return
            if kind in ("tunnel.response.end", "tunnel.response.error"):
                tunnel.pending.pop(rid, None)
            return
        pending.queue.put_nowait(item)
        if kind in ("tunnel.response.end", "tunnel.response.error"):
            tunnel.pending.pop(rid, None)

    def _touch(self, tunnel: _Tunnel) -> None:
        tunnel.last_seen_s = time.monotonic()
        room = self._rooms.get(tunnel.room)
        p = room.participants.get(tunnel.participant_id) if room else None
        if p is not None and self._tunnels.get((tunnel.room, tunnel.participant_id)) is tunnel:
            # Any valid message sets connected again (even after a PUT reset it); status is left alone.
            p.connected, p.last_tunnel_seen_at = True, now_ms()

    async def _close_tunnel(self, pid: str, code: int, reason: str, room: str | None) -> None:
        for (rc, tid), tunnel in list(self._tunnels.items()):
            if tid == pid and (room is None or rc == room.upper()):
                await self._close_ws(tunnel, code, reason)

    async def _drop_tunnel(self, pid: str, room: str | None) -> None:
        for tunnel in list(self._all_sockets):
            if tunnel.participant_id == pid and (room is None or tunnel.room == room.upper()):
                self._abort(tunnel.transport)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            if self._thawed is not None and not self._thawed.is_set():
                await self._thaw()
                continue  # let what queued while frozen be read first, as after SIGCONT
            now = time.monotonic()
            for tunnel in list(self._tunnels.values()):
                if now - tunnel.last_seen_s > self.tunnel_timeout_s:
                    await self._close_ws(tunnel, 4001, TIMED_OUT)
            for room in list(self._rooms.values()):
                for p in list(room.participants.values()):
                    if now - p.last_seen_s > self.participant_timeout_s:
                        if p.status != "busy":
                            p.status = "offline"
                        # Quirk (room.ts:301-316): sent again at every sweep.
                        self._broadcast(room.code, "participant.offline", {"participantId": p.id})

    # ---- events ----------------------------------------------------------------------------------

    def _broadcast(self, code: str, type_: str, data: Any) -> None:
        frame = self._sse_frame(code, type_, data)
        for q in self._sse.get(code, set()):
            q.put_nowait(frame)

    @staticmethod
    def _sse_frame(code: str, type_: str, data: Any) -> bytes:
        payload = {"type": type_, "timestamp": now_ms(), "roomCode": code, "data": data}
        return f"event: {type_}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    async def _events(self, request: web.Request, code: str) -> web.StreamResponse:
        room = self._room(code)
        resp = web.StreamResponse(
            status=200,
            headers={
                **CORS,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
            },
        )
        await resp.prepare(request)
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._sse.setdefault(room.code, set()).add(q)
        try:
            await resp.write(self._sse_frame(room.code, "connected", {"clientId": str(uuid.uuid4())}))
            while True:
                try:
                    frame = await asyncio.wait_for(q.get(), self.client_idle_timeout_s)
                except asyncio.TimeoutError:
                    self._abort(request.transport)  # Bun's idle timeout; no keepalive comments are sent
                    break
                if frame is None:
                    break
                await self._thaw()
                await resp.write(frame)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._sse.get(room.code, set()).discard(q)
        return resp

    # ---- inference -------------------------------------------------------------------------------

    def _routable(self, p: _Participant) -> bool:
        return p.connected and p.status not in ("offline", "busy") and p.in_flight == 0

    def _pick(self, room: _Room, model: str) -> _Participant | web.Response:
        no_one = _plain_error(404, "No available participant for the requested model")
        target = room.participants.get(model)
        if target is not None:
            if not target.connected or (room.code, target.id) not in self._tunnels:
                return _plain_error(503, "Participant tunnel is not connected.")
            if target.in_flight or target.status == "busy":
                return _plain_error(409, "Participant is already handling another request.")
            if target.status == "offline":
                return no_one
            return target
        candidates = [
            p for p in room.participants.values() if self._routable(p) and (room.code, p.id) in self._tunnels
        ]
        if model in ("*", "any"):
            return random.choice(candidates) if candidates else no_one
        name = model[len("model:") :] if model.startswith("model:") else model
        for p in candidates:
            if p.model == name:
                return p
        return no_one

    def _models(self, code: str) -> web.Response:
        room = self._rooms.get(code)
        if room is None:
            return _plain_error(404, "Room not found")
        data = [
            {
                "id": p.id,
                "object": "model",
                "created": p.joined_at // 1000,
                "owned_by": p.nickname,
                "gambi": {
                    "nickname": p.nickname,
                    "model": p.model,
                    "endpoint": p.endpoint,
                    "capabilities": dict(p.capabilities),
                    "connection": p.public()["connection"],
                },
            }
            for p in room.participants.values()
            if p.connected and p.status != "offline"
        ]
        return _json(200, {"object": "list", "data": data})

    @staticmethod
    def _merge(room: _Room, p: _Participant, body: dict[str, Any], kind: str) -> dict[str, Any]:
        """Defaults room -> participant config -> request (the request wins); model replaced."""
        out = dict(body)
        out["model"] = p.model
        merged = {**room.defaults, **p.config}
        instructions = p.instructions if p.instructions is not None else room.instructions
        if kind == "chat":
            messages = list(out.get("messages") or [])
            if instructions is not None and not any(
                isinstance(m, dict) and m.get("role") == "system" for m in messages
            ):
                out["messages"] = [{"role": "system", "content": instructions}, *messages]
            for k, v in merged.items():
                out.setdefault(k, v)
        else:
            if instructions is not None:
                out.setdefault("instructions", instructions)
            for k, v in merged.items():
                out.setdefault("max_output_tokens" if k == "max_tokens" else k, v)
        return out

    @staticmethod
    def _responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if isinstance(body.get("instructions"), str):
            messages.append({"role": "system", "content": body["instructions"]})
        inp = body.get("input")
        if isinstance(inp, str):
            messages.append({"role": "user", "content": inp})
        elif isinstance(inp, list):
            for item in inp:
                if isinstance(item, dict) and "role" in item:
                    content = item.get("content")
                    if isinstance(content, list):
                        content = "".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
                    messages.append({"role": item["role"], "content": content})
        out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
        for k in ("temperature", "top_p", "stream"):
            if k in body:
                out[k] = body[k]
        if "max_output_tokens" in body:
            out["max_tokens"] = body["max_output_tokens"]
        return out

    async def _inference(self, request: web.Request, code: str, kind: str, body: bytes) -> web.StreamResponse:
        room = self._rooms.get(code)
        if room is None:
            return _plain_error(404, "Room not found")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            # The reference throws here and Bun answers with its HTML error page.
            return web.Response(status=500, text=BUN_ERROR_PAGE, content_type="text/html")
        picked = self._pick(room, data["model"])
        if isinstance(picked, web.Response):
            return picked
        p = picked
        stream = bool(data.get("stream"))
        merged = self._merge(room, p, data, kind)
        event_id = str(uuid.uuid4())
        protocol = "chatCompletions" if kind == "chat" else "openResponses"
        self._broadcast(
            room.code,
            "llm.request",
            {"requestId": event_id, "participantId": p.id, "model": data["model"], "protocol": protocol},
        )
        if kind == "responses" and p.capabilities.get("openResponses") == "unsupported":
            return await self._fallback(request, room, p, merged, stream, event_id)
        operation = "chat.completions.create" if kind == "chat" else "responses.create"
        path = "/v1/chat/completions" if kind == "chat" else "/v1/responses"
        if kind == "responses":
            # supported/unknown: try natively, fall back to chat on 404/405/501
            result = await self._roundtrip(
                room, p, operation, "POST", path, merged, stream=False, peek=stream
            )
            if isinstance(result, tuple) and result[0] in (404, 405, 501):
                return await self._fallback(request, room, p, merged, stream, event_id)
            if isinstance(result, tuple):
                status, _headers, raw, pending_iter = result
                if stream and pending_iter is not None:
                    return await self._stream_out(
                        request, room, p, status, raw, pending_iter, event_id, protocol=protocol
                    )
                return self._json_out(room, p, status, raw, event_id, protocol, record_response=True)
            return result
        return await self._relay(request, room, p, operation, path, merged, stream, event_id, protocol)

    async def _dispatch_request(
        self, p: _Participant, room: _Room, operation: str, method: str, path: str, body: Any, stream: bool
    ) -> tuple[_Tunnel, _Pending] | web.Response:
        tunnel = self._tunnels.get((room.code, p.id))
        if tunnel is None:
            return _plain_error(503, "Participant tunnel is not connected.")
        rid = str(uuid.uuid4())
        pending = _Pending(rid, p.id, stream, asyncio.Queue())
        tunnel.pending[rid] = pending
        message: dict[str, Any] = {
            "type": "tunnel.request",
            "requestId": rid,
            "operation": operation,
            "method": method,
            "path": path,
            "headers": {"Content-Type": "application/json"} if body is not None else {},
        }
        if body is not None:
            message["body"] = body
        message["stream"] = stream
        await self._send(tunnel, message)
        return tunnel, pending

    def _busy(self, p: _Participant, on: bool) -> None:
        if on:
            p.in_flight += 1
            p.status = "busy"
        else:
            p.in_flight = max(0, p.in_flight - 1)
            if p.in_flight == 0 and p.status == "busy":
                p.status = "online" if p.connected else "offline"

    async def _roundtrip(
        self,
        room: _Room,
        p: _Participant,
        operation: str,
        method: str,
        path: str,
        body: Any,
        stream: bool,
        peek: bool = False,
    ) -> tuple[int, dict[str, Any], bytes, _Pending | None] | web.Response:
        """Send one tunnel.request and collect the whole answer.

        With peek (a streamed native Responses call), return at a `start` whose status is not a
        fallback trigger, handing over the pending request (and the busy mark) to the caller.
        Returns (status, headers, body so far, pending-or-None) or an error response.
        """
        sent = await self._dispatch_request(p, room, operation, method, path, body, stream=peek or stream)
        if isinstance(sent, web.Response):
            return sent
        _tunnel, pending = sent
        self._busy(p, True)
        handed_over = False
        status, headers, buf = 200, {}, bytearray()
        try:
            while True:
                item = await pending.queue.get()
                if item[0] == "start":
                    status, headers = item[1], item[2]
                    if peek and status not in (404, 405, 501):
                        handed_over = True
                        return status, headers, bytes(buf), pending
                elif item[0] == "chunk":
                    buf += item[1]
                elif item[0] == "end":
                    return status, headers, bytes(buf), None
                elif item[0] == "error":
                    return _plain_error(502, f"Failed to proxy request: Error: {item[2]}")
                else:
                    return _plain_error(
                        502, "Failed to proxy request: Error: Participant tunnel disconnected."
                    )
        except asyncio.CancelledError:
            pending.client_gone = True
            raise
        finally:
            if not handed_over:
                self._busy(p, False)

    async def _relay(
        self,
        request: web.Request,
        room: _Room,
        p: _Participant,
        operation: str,
        path: str,
        body: Any,
        stream: bool,
        event_id: str,
        protocol: str,
    ) -> web.StreamResponse:
        if not stream:
            result = await self._roundtrip(room, p, operation, "POST", path, body, stream=False)
            if isinstance(result, web.Response):
                self._llm_error(room, p, event_id, protocol, "dispatch", result)
                return result
            status, _h, raw, _ = result
            return self._json_out(room, p, status, raw, event_id, protocol, record_response=False)
        sent = await self._dispatch_request(p, room, operation, "POST", path, body, stream=True)
        if isinstance(sent, web.Response):
            return sent
        self._busy(p, True)
        return await self._stream_out(request, room, p, None, b"", sent[1], event_id, busy_taken=True)

    def _json_out(
        self,
        room: _Room,
        p: _Participant,
        status: int,
        raw: bytes,
        event_id: str,
        protocol: str,
        record_response: bool,
    ) -> web.Response:
        try:
            parsed = json.loads(raw)
        except ValueError:
            self._llm_error(
                room, p, event_id, protocol, "dispatch", None, "SyntaxError: Failed to parse JSON"
            )
            return _plain_error(502, "Failed to proxy request: SyntaxError: Failed to parse JSON")
        if record_response and isinstance(parsed, dict) and isinstance(parsed.get("id"), str):
            self._responses[parsed["id"]] = (room.code, p.id, False)
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        metrics: dict[str, Any] = {"ttftMs": 0, "durationMs": 0}
        if isinstance(usage, dict):
            metrics["inputTokens"] = usage.get("prompt_tokens", usage.get("input_tokens"))
            metrics["outputTokens"] = usage.get("completion_tokens", usage.get("output_tokens"))
            metrics["totalTokens"] = usage.get("total_tokens")
        self._broadcast(
            room.code,
            "llm.complete",
            {
                "requestId": event_id,
                "participantId": p.id,
                "model": p.model,
                "protocol": protocol,
                "metrics": metrics,
            },
        )
        return _json(status, parsed)

    def _llm_error(
        self,
        room: _Room,
        p: _Participant,
        event_id: str,
        protocol: str,
        stage: str,
        response: web.Response | None,
        text: str | None = None,
    ) -> None:
        if text is None and response is not None and isinstance(response.body, bytes):
            text = str(json.loads(response.body).get("error", ""))
        self._broadcast(
            room.code,
            "llm.error",
            {
                "requestId": event_id,
                "participantId": p.id,
                "nickname": p.nickname,
                "endpoint": p.endpoint,
                "model": p.model,
                "protocol": protocol,
                "stage": stage,
                "error": f"Error: {text}",
            },
        )

    async def _stream_out(
        self,
        request: web.Request,
        room: _Room,
        p: _Participant,
        status: int | None,
        early: bytes,
        pending: _Pending,
        event_id: str,
        busy_taken: bool = True,
        protocol: str = "chatCompletions",
    ) -> web.StreamResponse:
        """Relay a streamed answer: the response starts at `start`, one HTTP chunk per tunnel chunk."""
        resp: web.StreamResponse | None = None
        buffered: list[bytes] = [early] if early else []
        idle_s = self.client_idle_timeout_s
        outcome = "complete"

        async def begin(code: int) -> web.StreamResponse:
            r = web.StreamResponse(
                status=code,
                headers={
                    **CORS,
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "Connection": "keep-alive",
                },
            )
            await r.prepare(request)
            return r

        try:
            if status is not None:
                resp = await begin(status)
            for b in buffered if resp is not None else []:
                await resp.write(b)  # type: ignore[union-attr]
            if resp is not None:
                buffered = []
            while True:
                try:
                    item = await asyncio.wait_for(pending.queue.get(), idle_s)
                except asyncio.TimeoutError:
                    # Bun's idle timeout: nothing written to the client for idle_s, the client is cut.
                    outcome = "client_gone"
                    pending.client_gone = True
                    self._abort(request.transport)
                    return resp or web.Response(status=500)
                if item[0] == "start":
                    if resp is None:
                        resp = await begin(item[1])
                        for b in buffered:
                            await resp.write(b)
                        buffered = []
                elif item[0] == "chunk":
                    if resp is None:
                        buffered.append(item[1])  # a chunk before start is buffered and delivered first
                    else:
                        await resp.write(item[1])
                elif item[0] == "end":
                    if resp is None:
                        resp = await begin(200)
                        for b in buffered:
                            await resp.write(b)
                    await resp.write_eof()
                    return resp
                else:  # error or disconnected
                    outcome = "error"
                    message = item[2] if item[0] == "error" else "Participant tunnel disconnected."
                    self._llm_error(
                        room, p, event_id, protocol, "dispatch" if resp is None else "stream", None, message
                    )
                    if resp is None:
                        return _plain_error(502, f"Failed to proxy request: Error: {message}")
                    await resp.write_eof()  # a clean, truncated end: no error event, no [DONE]
                    return resp
        except (asyncio.CancelledError, ConnectionError):
            outcome = "client_gone"
            pending.client_gone = True
            raise
        finally:
            if busy_taken:
                self._busy(p, False)  # the reference frees the participant as soon as the client goes
            if outcome == "complete":
                self._broadcast(
                    room.code,
                    "llm.complete",
                    {
                        "requestId": event_id,
                        "participantId": p.id,
                        "model": p.model,
                        "protocol": protocol,
                        "metrics": {"ttftMs": 0, "durationMs": 0},
                    },
                )

    async def _fallback(
        self,
        request: web.Request,
        room: _Room,
        p: _Participant,
        body: dict[str, Any],
        stream: bool,
        event_id: str,
    ) -> web.StreamResponse:
        if body.get("store"):
            return _plain_error(400, "Responses -> chat/completions fallback does not support: store")
        chat = self._responses_to_chat(body)
        result = await self._roundtrip(
            room, p, "chat.completions.create", "POST", "/v1/chat/completions", chat, stream=stream
        )
        if isinstance(result, web.Response):
            return result
        status, _h, raw, _ = result
        text = ""
        if stream:
            for line in raw.decode(errors="replace").splitlines():
                if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                    try:
                        delta = json.loads(line[5:])["choices"][0].get("delta", {}).get("content")
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        continue
                    if isinstance(delta, str):
                        text += delta
        else:
            try:
                text = json.loads(raw)["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                return _plain_error(502, "Failed to proxy request: SyntaxError: Failed to parse JSON")
        resp_id = "resp_" + uuid.uuid4().hex
        msg_id = "msg_" + uuid.uuid4().hex
        created = int(time.time())
        item = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        obj: dict[str, Any] = {
            "id": resp_id,
            "created_at": created,
            "output_text": text,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": None,
            "model": p.model,
            "object": "response",
            "output": [item],
            "status": "completed",
        }
        self._responses[resp_id] = (room.code, p.id, True)
        self._broadcast(
            room.code,
            "llm.complete",
            {
                "requestId": event_id,
                "participantId": p.id,
                "model": p.model,
                "protocol": "openResponses",
                "metrics": {"ttftMs": 0, "durationMs": 0},
            },
        )
        if not stream:
            return _json(status, obj)
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "response.created",
                {"response": {**obj, "output_text": "", "output": [], "status": "in_progress"}},
            ),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            (
                "response.output_text.delta",
                {"output_index": 0, "item_id": msg_id, "content_index": 0, "delta": text},
            ),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": obj}),
        ]
        out = web.StreamResponse(
            status=status,
            headers={
                **CORS,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
            },
        )
        await out.prepare(request)
        for seq, (name, payload) in enumerate(events):
            data = json.dumps({"type": name, "sequence_number": seq, **payload}, separators=(",", ":"))
            await out.write(f"event: {name}\ndata: {data}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def _response_lifecycle(
        self, request: web.Request, code: str, rest: list[str], method: str
    ) -> web.StreamResponse:
        room = self._rooms.get(code)
        if room is None:
            return _plain_error(404, "Room not found")
        resp_id = rest[0]
        ops = {
            ("GET", 1): ("responses.get", ""),
            ("DELETE", 1): ("responses.delete", ""),
            ("GET", 2): ("responses.input_items", "/input_items"),
            ("POST", 2): ("responses.cancel", "/cancel"),
        }
        op = ops.get((method, len(rest)))
        if op is None or (len(rest) == 2 and rest[1] not in ("input_items", "cancel")):
            raise _Invalid(404, *ROUTE_NOT_FOUND)
        known = self._responses.get(resp_id)
        if known is None or known[0] != room.code:
            return _plain_error(404, "Response not found")
        if known[2]:
            return _plain_error(
                501,
                "This response was created via chat/completions fallback and does not support Responses "
                "lifecycle operations",
            )
        p = room.participants.get(known[1])
        if p is None:
            return _plain_error(404, "No available participant for the requested model")
        result = await self._roundtrip(
            room, p, op[0], method, f"/v1/responses/{resp_id}{op[1]}", None, stream=False
        )
        if isinstance(result, web.Response):
            return result
        status, _h, raw, _ = result
        return self._json_out(room, p, status, raw, str(uuid.uuid4()), "openResponses", record_response=False)


def running_fake(**settings: Any) -> Iterator[FakeGambiV06]:
    """A generator for pytest fixtures: `yield from running_fake(tunnel_timeout_s=1)`."""
    hub = FakeGambiV06(**settings).start()
    try:
        yield hub
    finally:
        hub.stop()
