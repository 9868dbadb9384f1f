"""Room event streams (SSE) in both generations' shapes, with keepalive comments so idle ones stay open."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from llmroom_cli.hub.context import Context
from llmroom_cli.hub.state import V01, nanoid, sse_v01, sse_v06
from llmroom_cli.hub.wire import error_v01, error_v06

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Access-Control-Allow-Origin": "*",
    "X-Accel-Buffering": "no",
}


async def stream(ctx: Context, request: web.BaseRequest, code: str, flavor: str) -> web.StreamResponse:
    """Serve `GET /rooms/:code/events` (v0.1 events) or `GET /v1/rooms/:code/events` (v0.6 events)."""
    wake = asyncio.Event()
    listener = ctx.state.subscribe(
        code, flavor, wake, asyncio.get_running_loop(), ctx.limits.sse_queue_events
    )
    if listener is None:
        if flavor == V01:
            return error_v01(404, "Room not found")
        return error_v06(
            404, "ROOM_NOT_FOUND", "Room not found.", "Run 'llmroom list' to see this hub's rooms."
        )
    ctx.streams.add(wake)
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        hello = {"clientId": nanoid()}
        await resp.write(
            sse_v01("connected", hello) if flavor == V01 else sse_v06("connected", listener.code, hello)
        )
        while not ctx.stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), ctx.keepalive_s)
            wake.clear()
            if not listener.items:
                if ctx.stopping:
                    break
                await resp.write(b": keepalive\n\n")
                continue
            ended = False
            while listener.items:
                item = listener.items.popleft()
                if item is None:
                    ended = True
                    break
                await resp.write(item)
            if ended:
                break
        await resp.write_eof()
    except ConnectionError:
        pass  # the client left: nothing to answer
    finally:
        ctx.streams.discard(wake)
        ctx.state.unsubscribe(listener)
    return resp
