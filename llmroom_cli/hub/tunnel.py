"""The v0.6 participant tunnel: the WebSocket upgrade, the message catalogue, liveness and close codes.

A participant registers (`PUT`), gets a single-use token valid `tunnel_token_ttl_s` (60 s), and opens
`GET /v1/rooms/:code/participants/:id/tunnel?token=...`. The hub then sends `tunnel.request` messages
down the socket and reads `tunnel.response.start|chunk|end|error` back (one JSON object per message,
text or binary), answers `tunnel.ping` with `tunnel.pong` carrying its clock, and ignores anything
else (unparseable, unknown type, failing the schema, unknown request id). Close codes it sends:
1000 "Superseded by a newer tunnel session." (a second tunnel for the id), 1001 "Hub shutting down.",
4001 "Tunnel heartbeat timed out." (no valid participant message for `tunnel_silence_s`), and 1009 from
the WebSocket layer for a message over `max_tunnel_message_bytes` (4 MiB: split big bodies).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from llmroom_cli.hub.context import Context
from llmroom_cli.hub.state import Refused, dumps, now_ms
from llmroom_cli.hub.wire import error_v06

SUPERSEDED = (1000, "Superseded by a newer tunnel session.")
SHUTDOWN = (1001, "Hub shutting down.")
SILENT = (4001, "Tunnel heartbeat timed out.")
GONE = "Participant tunnel disconnected."
# Flow control: past HIGH_WATER_BYTES queued for one request (its client reads slower than the
# participant sends), the hub stops reading the tunnel until that client has taken it down to
# LOW_WATER_BYTES, so TCP pushes back on the participant and the hub's memory stays flat. A client
# that takes nothing for `upstream_idle_s` has its request cut instead.
HIGH_WATER_BYTES = 1 << 20
LOW_WATER_BYTES = 256 << 10


class Pending:
    """One request sent down a tunnel: what the participant answers, as events for the relay."""

    __slots__ = ("request_id", "events", "buffered", "drained")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # ("start", status, headers) | ("chunk", bytes) | ("end",) | ("error", message)
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.buffered = 0  # bytes queued and not yet taken by the relay
        self.drained = asyncio.Event()  # set while `buffered` is under the low-water mark
        self.drained.set()

    def taken(self, size: int) -> None:
        """The relay took `size` bytes: once under the low-water mark, the tunnel reads on."""
        self.buffered -= size
        if self.buffered <= LOW_WATER_BYTES:
            self.drained.set()


class Tunnel:
    """One open participant WebSocket."""

    def __init__(self, ctx: Context, ws: web.WebSocketResponse, code: str, pid: str, peer: str) -> None:
        self.ctx = ctx
        self.ws = ws
        self.code = code
        self.pid = pid
        self.peer = peer
        self.pending: dict[str, Pending] = {}
        self.last_message = time.monotonic()
        self.closed = False

    async def request(self, operation: str, method: str, path: str, body: Any, stream: bool) -> Pending:
        """Send one `tunnel.request`; the answer arrives on the returned Pending's queue."""
        if self.closed:
            raise ConnectionError(GONE)
        request_id = str(uuid.uuid4())
        pending = Pending(request_id)
        self.pending[request_id] = pending
        message: dict[str, Any] = {
            "type": "tunnel.request",
            "requestId": request_id,
            "operation": operation,
            "method": method,
            "path": path,
            "headers": {"Content-Type": "application/json"} if body is not None else {},
        }
        if body is not None:
            message["body"] = body
        message["stream"] = stream
        try:
            await self.ws.send_str(dumps(message))
        except (ConnectionError, RuntimeError) as exc:
            self.pending.pop(request_id, None)
            raise ConnectionError(GONE) from exc
        return pending

    def forget(self, pending: Pending) -> None:
        """The relay is done with this request (or its client left): later messages for it are dropped."""
        self.pending.pop(pending.request_id, None)
        pending.drained.set()

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), 2.0)

    async def run(self) -> None:
        """Read participant messages until the socket closes; then fail whatever is still pending."""
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == WSMsgType.TEXT:
                    await self._handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    with contextlib.suppress(UnicodeDecodeError):
                        await self._handle(msg.data.decode("utf-8"))
                elif msg.type == WSMsgType.CLOSE:  # the participant closed first: echo its code and reason
                    self.closed = True
                    with contextlib.suppress(Exception):
                        reason = (msg.extra or "").encode()
                        await asyncio.wait_for(self.ws.close(code=msg.data or 1000, message=reason), 2.0)
                    break
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break  # 1009 for an oversized message is sent by aiohttp itself
        finally:
            self.closed = True
            for pending in list(self.pending.values()):
                pending.events.put_nowait(("error", GONE))
            self.pending.clear()
            self.ctx.tunnels.discard(self)
            self.ctx.state.detach_tunnel(self.code, self.pid, self)

    async def _handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "tunnel.ping":
            self._alive()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(dumps({"type": "tunnel.pong", "timestamp": now_ms()}))
            return
        request_id = message.get("requestId")
        if not isinstance(request_id, str) or kind not in _CHECKS or not _CHECKS[kind](message):
            return  # unknown type or failing the schema: ignored, as on the reference (no reply, no close)
        self._alive()
        pending = self.pending.get(request_id)
        if pending is None:
            return  # no such request, or its client went away: a late message is dropped
        if kind == "tunnel.response.start":
            headers = message.get("headers")
            pending.events.put_nowait(
                ("start", message["status"], headers if isinstance(headers, dict) else {})
            )
        elif kind == "tunnel.response.chunk":
            try:
                data = base64.b64decode(message["chunk"], validate=True)
            except (binascii.Error, ValueError):
                return
            pending.buffered += len(data)
            pending.events.put_nowait(("chunk", data))
            if pending.buffered > HIGH_WATER_BYTES:
                pending.drained.clear()
                try:
                    await asyncio.wait_for(pending.drained.wait(), self.ctx.limits.upstream_idle_s)
                except asyncio.TimeoutError:  # its client takes nothing: cut this request, not the tunnel
                    self.forget(pending)
                    pending.events.put_nowait(("error", "the client stopped reading"))
                self._alive()  # the participant was not silent: the hub was not reading
        elif kind == "tunnel.response.end":
            self.forget(pending)
            pending.events.put_nowait(("end",))
        else:
            self.forget(pending)
            pending.events.put_nowait(("error", str(message["message"])))

    def _alive(self) -> None:
        self.last_message = time.monotonic()
        self.ctx.state.tunnel_seen(self.code, self.pid, self)


def _start_ok(m: dict[str, Any]) -> bool:
    status = m.get("status")
    return isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599


def _chunk_ok(m: dict[str, Any]) -> bool:
    return isinstance(m.get("chunk"), str)


def _end_ok(m: dict[str, Any]) -> bool:
    return True


def _error_ok(m: dict[str, Any]) -> bool:
    return isinstance(m.get("message"), str)


_CHECKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "tunnel.response.start": _start_ok,
    "tunnel.response.chunk": _chunk_ok,
    "tunnel.response.end": _end_ok,
    "tunnel.response.error": _error_ok,
}

_HINT_TOKEN = "Re-register the participant and retry the tunnel connection."


async def upgrade(ctx: Context, request: web.BaseRequest, code: str, pid: str) -> web.StreamResponse:
    """`GET /v1/rooms/:code/participants/:id/tunnel?token=`: check, upgrade, then serve the tunnel."""
    token = request.query.get("token")
    if not token:
        return error_v06(
            400,
            "INVALID_REQUEST",
            "Tunnel token is required.",
            "Reconnect using the bootstrap token returned during join.",
        )
    try:
        ctx.state.take_token(code, pid, token)
    except Refused as exc:
        if exc.status == 404 and exc.code == "ROOM_NOT_FOUND":
            return error_v06(404, exc.code, "Room not found.", "Run 'llmroom list' to see this hub's rooms.")
        if exc.status == 404:
            return error_v06(404, exc.code, "Participant not found.", "Check the participant id and retry.")
        return error_v06(401, "INVALID_REQUEST", exc.message, _HINT_TOKEN)
    ws = web.WebSocketResponse(
        max_msg_size=ctx.limits.max_tunnel_message_bytes, compress=False, autoping=True, autoclose=False
    )
    if not ws.can_prepare(request).ok:  # a plain GET: the token is not used up (as on the reference)
        return error_v06(
            400, "INTERNAL_ERROR", "Failed to upgrade the participant tunnel.", "Retry the join operation."
        )
    ctx.state.use_token(code, pid, token)
    from llmroom_cli.hub.wire import source_of

    await ws.prepare(request)
    tunnel = Tunnel(ctx, ws, code.upper(), pid, source_of(request))
    try:
        old = ctx.state.attach_tunnel(code, pid, tunnel)
    except Refused:  # removed between the check and the upgrade
        await tunnel.close(1000, "Participant not found.")
        return ws
    ctx.tunnels.add(tunnel)
    if ctx.stopping:
        await tunnel.close(*SHUTDOWN)
    if old is not None:
        await old.close(*SUPERSEDED)
    await tunnel.run()
    return ws


async def watch_liveness(ctx: Context) -> None:
    """Every `tunnel_sweep_s`, close tunnels silent for more than `tunnel_silence_s` with 4001."""
    while not ctx.stopping:
        await asyncio.sleep(ctx.limits.tunnel_sweep_s)
        limit = time.monotonic() - ctx.limits.tunnel_silence_s
        for tunnel in [t for t in ctx.tunnels if t.last_message < limit]:
            await tunnel.close(*SILENT)
