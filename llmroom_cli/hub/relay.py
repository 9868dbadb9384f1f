"""Inference routing: `/rooms/:code/v1/...` to one participant, over HTTP (v0.1) or its tunnel (v0.6).

Each request causes at most one upstream HTTP request (never a retry, never a redirect followed), and
an HTTP participant is dialed only at the address it joined from (loopback or the hub's own addresses
for a participant on the hub's machine, or a network the operator allowed with `--allow-relay-to`),
never at the hub itself. Tunnel participants are never dialed at all. Both transports produce the same
events (start, chunk, end, error), so streaming, buffering (bounded), deadlines and the Responses ->
chat-completions fallback are written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from llmroom_cli.hub.context import Context
from llmroom_cli.hub.state import NO_PARTICIPANT, V01, V06, Refused, Target, dumps
from llmroom_cli.hub.wire import (
    JSON_TYPE,
    BadRequest,
    depth,
    error_v01,
    json_response,
    parse_object,
    read_body,
)

LOOP_HEADER = "X-Llmroom-Relay"  # set on every relayed request; a request carrying it is refused (508)
STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Access-Control-Allow-Origin": "*",
    "X-Accel-Buffering": "no",
}
FALLBACK_UNSUPPORTED = ("store", "previous_response_id", "background", "conversation")
_GENERATION_KEYS = (
    "temperature", "top_p", "max_tokens", "stop", "frequency_penalty", "presence_penalty", "seed",
)  # fmt: skip


class Upstream(Exception):
    """The participant could not be reached or failed before answering: 502 with this reason."""


# -- entry point --------------------------------------------------------------------------------------


async def handle(
    ctx: Context, request: web.BaseRequest, code: str, route: list[str], segs: list[str]
) -> web.StreamResponse:
    """Serve one inference request (`route` is what follows `/rooms/:code/v1/`)."""
    if request.headers.get(LOOP_HEADER):
        await read_body(request, ctx.limits)
        return error_v01(508, "Relay loop refused: this request came from a hub relay")
    body = await read_body(request, ctx.limits)
    if ctx.state.room(code) is None:
        return error_v01(404, "Room not found")
    if route[0] == "responses" and len(route) > 1:
        return await _lifecycle(ctx, request, code, route)
    data = parse_object(body, ctx.limits)
    if depth(data, ctx.limits.max_nesting) > ctx.limits.max_nesting:
        raise BadRequest(400, "Request body is nested too deeply")
    wanted = data.get("model")
    if wanted is not None and not isinstance(wanted, str):
        raise BadRequest(400, "Field 'model' must be a string")
    responses = route[0] == "responses"
    target = ctx.state.route(code, wanted or "")
    try:
        return await _relay(ctx, request, code, target, data, wanted or "", responses)
    finally:
        ctx.state.release(code, target)


async def _relay(
    ctx: Context,
    request: web.BaseRequest,
    code: str,
    target: Target,
    data: dict[str, Any],
    wanted: str,
    responses: bool,
) -> web.StreamResponse:
    stream = data.get("stream") is True
    request_id = str(uuid.uuid4())
    protocol = "openResponses" if responses else "chatCompletions"
    ctx.state.emit(
        code,
        ("llm:request", {"participantId": target.id, "model": target.model}),
        (
            "llm.request",
            {"requestId": request_id, "participantId": target.id, "model": wanted, "protocol": protocol},
        ),
    )
    started = time.monotonic()
    meta = _Meta(ctx, code, target, request_id, protocol, started)
    if target.generation == V01:
        if responses:
            return error_v01(501, "This participant speaks chat completions only (joined with the v0.1 API)")
        body = dict(data)
        body["model"] = target.model
        events = _http_exchange(ctx, target, body, stream)
        return await _answer(ctx, request, meta, events, stream, v01=True)
    if responses:
        return await _responses(ctx, request, meta, data, stream)
    body = chat_body(data, target)
    events = _tunnel_exchange(ctx, target, "chat.completions.create", "/v1/chat/completions", body, stream)
    return await _answer(ctx, request, meta, events, stream, v01=False)


_LIFECYCLE = {
    ("GET", 2): "responses.get",
    ("DELETE", 2): "responses.delete",
    ("GET", 3): "responses.input_items",
    ("POST", 3): "responses.cancel",
}
MAX_REMEMBERED_RESPONSES = 10_000


def remember_response(ctx: Context, response_id: Any, code: str, pid: str | None) -> None:
    """Which participant made a Responses object (None: the chat fallback made it), for lifecycle calls."""
    if isinstance(response_id, str) and response_id:
        ctx.responses[response_id] = (code.upper(), pid)
        while len(ctx.responses) > MAX_REMEMBERED_RESPONSES:
            ctx.responses.pop(next(iter(ctx.responses)))


async def _lifecycle(
    ctx: Context, request: web.BaseRequest, code: str, route: list[str]
) -> web.StreamResponse:
    """GET/DELETE `/v1/responses/:id`, GET `.../input_items`, POST `.../cancel`: to the participant that
    made the response, through its tunnel (404 when unknown, 501 when the chat fallback made it)."""
    made = ctx.responses.get(route[1])
    if made is None or made[0] != code.upper():
        return error_v01(404, "Response not found")
    if made[1] is None:
        return error_v01(
            501,
            "This response was created via chat/completions fallback and does not support Responses"
            " lifecycle operations",
        )
    operation = _LIFECYCLE[(request.method, len(route))]
    target = ctx.state.route(code, made[1])
    try:
        if target.generation != V06:
            return error_v01(501, "This participant speaks chat completions only (joined with the v0.1 API)")
        meta = _Meta(ctx, code, target, str(uuid.uuid4()), "openResponses", time.monotonic())
        path = "/v1/" + "/".join(route)
        events = _tunnel_exchange(ctx, target, operation, path, None, False, method=request.method)
        return await _answer(ctx, request, meta, events, False, v01=False)
    finally:
        ctx.state.release(code, target)


class _Meta:
    """What the room events of one request need."""

    def __init__(
        self, ctx: Context, code: str, target: Target, request_id: str, protocol: str, started: float
    ) -> None:
        self.ctx, self.code, self.target = ctx, code, target
        self.request_id, self.protocol, self.started = request_id, protocol, started
        self.first_byte: float | None = None
        self.remember = False  # a native responses.create: remember which participant made the answer

    def error(self, stage: str, reason: str) -> None:
        t = self.target
        self.ctx.state.emit(
            self.code,
            ("llm:error", {"participantId": t.id, "error": reason}),
            (
                "llm.error",
                {
                    "requestId": self.request_id, "participantId": t.id, "nickname": t.nickname,
                    "endpoint": t.endpoint, "model": t.model, "protocol": self.protocol, "stage": stage,
                    "error": f"Error: {reason}",
                },
            ),
        )  # fmt: skip

    def complete(self) -> None:
        now = time.monotonic()
        ttft = (self.first_byte if self.first_byte is not None else now) - self.started
        metrics = {"ttftMs": round(ttft * 1000), "durationMs": round((now - self.started) * 1000)}
        self.ctx.state.emit(
            self.code,
            None,
            (
                "llm.complete",
                {
                    "requestId": self.request_id, "participantId": self.target.id, "model": self.target.model,
                    "protocol": self.protocol, "metrics": metrics,
                },
            ),
        )  # fmt: skip


# -- request bodies -------------------------------------------------------------------------------------


def chat_body(data: dict[str, Any], target: Target) -> dict[str, Any]:
    """The client's chat body with the participant's model, room then participant defaults filled in
    (the request wins), and the instructions as a leading system message unless the client sent one."""
    body = dict(data)
    body["model"] = target.model
    messages = body.get("messages")
    if target.instructions and isinstance(messages, list):
        if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            body["messages"] = [{"role": "system", "content": target.instructions}, *messages]
    for key, value in target.defaults.items():
        if key in _GENERATION_KEYS and key not in body:
            body[key] = value
    return body


def responses_body(data: dict[str, Any], target: Target) -> dict[str, Any]:
    body = dict(data)
    body["model"] = target.model
    if target.instructions and "instructions" not in body:
        body["instructions"] = target.instructions
    for key, value in target.defaults.items():
        name = "max_output_tokens" if key == "max_tokens" else key
        if key in _GENERATION_KEYS and name not in body:
            body[name] = value
    return body


def fallback_chat_body(data: dict[str, Any], target: Target) -> dict[str, Any]:
    """A Responses request as chat completions (text input only)."""
    messages: list[dict[str, Any]] = []
    instructions = data.get("instructions") or target.instructions
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = data.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if not isinstance(item, dict):
                continue
            content = item.get("content")
            if isinstance(content, list):
                content = "".join(
                    str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
                )
            messages.append({"role": item.get("role", "user"), "content": content})
    body: dict[str, Any] = {"model": target.model, "messages": messages}
    if data.get("stream") is True:
        body["stream"] = True
    for key in ("temperature", "top_p"):
        if key in data:
            body[key] = data[key]
    if "max_output_tokens" in data:
        body["max_tokens"] = data["max_output_tokens"]
    for key, value in target.defaults.items():
        if key in _GENERATION_KEYS and key not in body:
            body[key] = value
    return body


# -- transports --------------------------------------------------------------------------------------------


_LOCAL: dict[str, bool] = {}


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, or an address of this machine (it can be bound): a participant on the hub's machine."""
    if ip.is_loopback:
        return True
    key = str(ip)
    if key not in _LOCAL:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((key, 0))
            _LOCAL[key] = True
        except OSError:
            _LOCAL[key] = False
        if len(_LOCAL) > 4096:
            _LOCAL.clear()
    return _LOCAL[key]


async def _pick_address(ctx: Context, target: Target) -> tuple[str, int]:
    """The address to dial for an HTTP participant, or Refused: the trust rule of the module docstring."""
    parts = urlsplit(target.endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), ctx.limits.upstream_connect_s
        )
    except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
        raise Upstream(f"cannot resolve {host!r}: {exc or type(exc).__name__}") from None
    try:
        source = ipaddress.ip_address(target.source)
    except ValueError:
        source = None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip.is_unspecified or ip.is_multicast:
            continue
        local = _is_local(ip)
        if local and port == ctx.port:
            raise Refused(508, "Relay loop refused: the participant's endpoint is this hub")
        allowed = any(ip in net for net in ctx.limits.allow_relay_to)
        if source is not None and (ip == source or (local and _is_local(source))):
            allowed = True
        if allowed:
            return str(ip), port
    raise Refused(
        403,
        "Participant endpoint is not on the address it joined from (the hub operator can allow more"
        " with --allow-relay-to)",
    )


async def _http_exchange(
    ctx: Context, target: Target, body: dict[str, Any], stream: bool
) -> AsyncIterator[tuple[Any, ...]]:
    """One POST to a v0.1 participant's `/v1/chat/completions`, as relay events."""
    import aiohttp

    try:
        ip, port = await _pick_address(ctx, target)
    except Upstream as exc:
        yield ("error", str(exc))
        return
    parts = urlsplit(target.endpoint)
    literal = f"[{ip}]" if ":" in ip else ip
    url = f"{parts.scheme}://{literal}:{port}{parts.path.rstrip('/')}/v1/chat/completions"
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
        "Host": parts.netloc.rsplit("@", 1)[-1],
        LOOP_HEADER: "1",
    }
    if ctx.upstream is None:
        ctx.upstream = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False
        )
    timeout = aiohttp.ClientTimeout(
        total=None, connect=ctx.limits.upstream_connect_s, sock_read=ctx.limits.upstream_idle_s
    )
    extra: dict[str, Any] = {"server_hostname": parts.hostname} if parts.scheme == "https" else {}
    try:
        async with ctx.upstream.post(
            url, data=dumps(body).encode(), headers=headers, allow_redirects=False, timeout=timeout, **extra
        ) as resp:
            if 300 <= resp.status < 400:
                yield ("error", f"the participant answered {resp.status} (a redirect, not followed)")
                return
            yield ("start", resp.status, {"content-type": resp.headers.get("Content-Type", "")})
            async for piece in resp.content.iter_any():
                yield ("chunk", piece)
            yield ("end",)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        yield ("error", str(exc) or type(exc).__name__)


async def _tunnel_exchange(
    ctx: Context,
    target: Target,
    operation: str,
    path: str,
    body: dict[str, Any] | None,
    stream: bool,
    method: str = "POST",
) -> AsyncIterator[tuple[Any, ...]]:
    """One `tunnel.request` to a v0.6 participant, as relay events."""
    from llmroom_cli.hub.tunnel import GONE, Tunnel

    tunnel: Tunnel | None = target.tunnel
    if tunnel is None:
        yield ("error", GONE)
        return
    try:
        pending = await tunnel.request(operation, method, path, body, stream)
    except ConnectionError as exc:
        yield ("error", str(exc))
        return
    try:
        while True:
            event = await pending.events.get()
            if event[0] == "chunk":
                pending.taken(len(event[1]))
            yield event
            if event[0] in ("end", "error"):
                return
    finally:
        tunnel.forget(pending)  # a client gone mid-stream: the participant's late chunks are dropped


# -- answers -----------------------------------------------------------------------------------------------


async def _next(events: AsyncIterator[tuple[Any, ...]], timeout_s: float) -> tuple[Any, ...]:
    try:
        return await asyncio.wait_for(events.__anext__(), timeout_s)
    except StopAsyncIteration:
        return ("error", "the participant's answer ended early")
    except asyncio.TimeoutError:
        return ("timeout",)


def _proxy_error(v01: bool, reason: str) -> str:
    return f"Failed to proxy request: {reason}" if v01 else f"Failed to proxy request: Error: {reason}"


async def _buffer(
    ctx: Context, events: AsyncIterator[tuple[Any, ...]], first: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Read a whole non-streamed answer: ("ok", status, headers, bytes) or an error event, bounded in
    size (`max_buffered_answer_bytes`) and time (`upstream_answer_s`)."""
    deadline = time.monotonic() + ctx.limits.upstream_answer_s
    status, headers = 200, {}
    body = bytearray()
    event = first
    while True:
        if event[0] == "start":
            status, headers = event[1], event[2]
        elif event[0] == "chunk":
            body += event[1]
            if len(body) > ctx.limits.max_buffered_answer_bytes:
                return ("too big",)
        elif event[0] == "end":
            return ("ok", status, headers, bytes(body))
        else:
            return event
        event = await _next(events, max(0.0, deadline - time.monotonic()))


async def _answer(
    ctx: Context,
    request: web.BaseRequest,
    meta: _Meta,
    events: AsyncIterator[tuple[Any, ...]],
    stream: bool,
    v01: bool,
) -> web.StreamResponse:
    try:
        first = await _next(
            events, ctx.limits.upstream_answer_s if not stream else ctx.limits.upstream_idle_s
        )
        if first[0] == "timeout":
            meta.error("dispatch", "the participant did not answer in time")
            return error_v01(504, "Participant did not answer in time")
        if first[0] == "error":
            meta.error("dispatch", first[1])
            return error_v01(502, _proxy_error(v01, first[1]))
        meta.first_byte = time.monotonic()
        if stream:
            return await _stream(ctx, request, meta, events, first, v01)
        whole = await _buffer(ctx, events, first)
        return _buffered_answer(ctx, meta, whole, v01)
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


def _buffered_answer(ctx: Context, meta: _Meta, whole: tuple[Any, ...], v01: bool) -> web.Response:
    if whole[0] == "too big":
        meta.error("dispatch", "answer too large to buffer")
        limit = ctx.limits.max_buffered_answer_bytes
        return error_v01(507, f'Answer too large to buffer (at most {limit} bytes); ask with "stream": true')
    if whole[0] == "timeout":
        meta.error("dispatch", "the participant did not answer in time")
        return error_v01(504, "Participant did not answer in time")
    if whole[0] != "ok":
        meta.error("dispatch", whole[1])
        return error_v01(502, _proxy_error(v01, whole[1]))
    _, status, headers, payload = whole
    meta.complete()
    if v01:  # relayed as the participant sent it (status, body and content type), as before
        resp = web.Response(status=status, body=payload)
        resp.headers["Content-Type"] = headers.get("content-type") or JSON_TYPE
        resp.headers["Access-Control-Allow-Origin"] = "*"
        return resp
    try:  # v0.6: parsed and re-serialised, the participant's headers dropped, its status kept
        parsed = json.loads(payload)
    except (ValueError, RecursionError, UnicodeDecodeError):
        meta.error("dispatch", "SyntaxError: Failed to parse JSON")
        return error_v01(502, "Failed to proxy request: SyntaxError: Failed to parse JSON")
    if meta.remember and 200 <= status < 300 and isinstance(parsed, dict):
        remember_response(ctx, parsed.get("id"), meta.code, meta.target.id)
    return json_response(status, parsed)


async def _stream(
    ctx: Context,
    request: web.BaseRequest,
    meta: _Meta,
    events: AsyncIterator[tuple[Any, ...]],
    first: tuple[Any, ...],
    v01: bool,
) -> web.StreamResponse:
    early: list[bytes] = []
    event = first
    while event[0] == "chunk":  # a chunk before start is buffered and delivered first
        early.append(event[1])
        event = await _next(events, ctx.limits.upstream_idle_s)
    if event[0] != "start":
        if event[0] == "end":
            event = ("start", 200, {})
        else:
            reason = "the participant did not answer in time" if event[0] == "timeout" else event[1]
            meta.error("dispatch", reason)
            return error_v01(504 if event[0] == "timeout" else 502, _proxy_error(v01, reason))
    status = event[1]
    if v01 and not 200 <= status < 300:  # a v0.1 error answer is relayed whole, as before
        whole = await _buffer(ctx, events, ("chunk", b"".join(early)))
        if whole[0] == "ok":
            whole = ("ok", status, event[2], whole[3])
        return _buffered_answer(ctx, meta, whole, v01)
    resp = web.StreamResponse(status=status, headers=STREAM_HEADERS)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for piece in early:
        await resp.write(piece)
    while True:
        event = await _next(events, ctx.limits.upstream_idle_s)
        if event[0] == "chunk":
            await resp.write(event[1])
            continue
        if event[0] == "end":
            meta.complete()
            await resp.write_eof()
        elif event[0] == "timeout" or event[0] == "error":
            reason = "the participant went silent" if event[0] == "timeout" else event[1]
            meta.error("stream", reason)
            if v01 and event[0] == "error":  # as before: a broken upstream breaks the client's stream
                request.protocol.force_close()
                if request.transport is not None:
                    request.transport.close()
            else:  # v0.6: what was sent so far, then a clean end (as the reference does)
                await resp.write_eof()
        return resp


# -- Responses ---------------------------------------------------------------------------------------------


async def _responses(
    ctx: Context, request: web.BaseRequest, meta: _Meta, data: dict[str, Any], stream: bool
) -> web.StreamResponse:
    target = meta.target
    if target.capabilities.get("openResponses") != "unsupported":
        events = _tunnel_exchange(
            ctx, target, "responses.create", "/v1/responses", responses_body(data, target), stream
        )
        first = await _next(events, ctx.limits.upstream_answer_s)
        if not (first[0] == "start" and first[1] in (404, 405, 501)):

            async def replay() -> AsyncIterator[tuple[Any, ...]]:
                yield first
                async for event in events:
                    yield event

            meta.remember = True
            return await _answer(ctx, request, meta, replay(), stream, v01=False)
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
    unsupported = [k for k in FALLBACK_UNSUPPORTED if data.get(k) not in (None, False)]
    if unsupported:
        return error_v01(
            400, f"Responses -> chat/completions fallback does not support: {', '.join(unsupported)}"
        )
    body = fallback_chat_body(data, target)
    events = _tunnel_exchange(ctx, target, "chat.completions.create", "/v1/chat/completions", body, stream)
    first = await _next(events, ctx.limits.upstream_answer_s)
    if first[0] in ("error", "timeout"):
        reason = first[1] if first[0] == "error" else "the participant did not answer in time"
        meta.error("dispatch", reason)
        return error_v01(502 if first[0] == "error" else 504, _proxy_error(False, reason))
    if not stream:
        whole = await _buffer(ctx, events, first)
        if whole[0] != "ok" or not 200 <= whole[1] < 300:
            return _buffered_answer(ctx, meta, whole, v01=False)
        try:
            chat = json.loads(whole[3])
        except (ValueError, UnicodeDecodeError):
            return _buffered_answer(ctx, meta, whole, v01=False)
        meta.complete()
        made = _response_object(chat, target.model)
        remember_response(ctx, made["id"], meta.code, None)
        return json_response(200, made)
    return await _responses_stream(ctx, request, meta, events, first)


def _response_object(chat: Any, model: str, text: str | None = None, usage: Any = None) -> dict[str, Any]:
    if text is None:
        text = ""
        with contextlib.suppress(LookupError, TypeError, AttributeError):
            text = str(chat["choices"][0]["message"]["content"] or "")
    usage = usage if usage is not None else (chat.get("usage") if isinstance(chat, dict) else None) or {}
    item = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "created_at": int(time.time()),
        "output_text": text,
        "error": None,
        "model": model,
        "object": "response",
        "output": [item],
        "status": "completed",
        "usage": {
            "input_tokens": usage.get("prompt_tokens", 0),
            "output_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        },
    }


async def _responses_stream(
    ctx: Context,
    request: web.BaseRequest,
    meta: _Meta,
    events: AsyncIterator[tuple[Any, ...]],
    first: tuple[Any, ...],
) -> web.StreamResponse:
    """Chat-completion SSE chunks turned into Responses stream events."""
    resp = web.StreamResponse(status=first[1] if first[0] == "start" else 200, headers=STREAM_HEADERS)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    model = meta.target.model
    response_id, item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    remember_response(ctx, response_id, meta.code, None)
    seq = 0

    async def send(kind: str, payload: dict[str, Any]) -> None:
        nonlocal seq
        await resp.write(
            f"event: {kind}\ndata: {dumps({'type': kind, 'sequence_number': seq, **payload})}\n\n".encode()
        )
        seq += 1

    shell = {
        "id": response_id,
        "created_at": int(time.time()),
        "model": model,
        "object": "response",
        "output": [],
    }
    await send("response.created", {"response": {**shell, "status": "in_progress"}})
    await send(
        "response.output_item.added",
        {
            "output_index": 0,
            "item": {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            },
        },
    )  # noqa: E501
    text, usage, pending = "", None, b""
    event = first
    while True:
        if event[0] == "chunk":
            pending += event[1]
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                try:
                    chunk = json.loads(line[5:])
                    delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    usage = chunk.get("usage") or usage
                except (ValueError, LookupError, TypeError, AttributeError):
                    continue
                if delta:
                    text += str(delta)
                    await send(
                        "response.output_text.delta",
                        {"output_index": 0, "item_id": item_id, "content_index": 0, "delta": str(delta)},
                    )  # noqa: E501
        elif event[0] != "start":
            break
        event = await _next(events, ctx.limits.upstream_idle_s)
    done = _response_object(None, model, text, usage)
    done["id"], done["output"][0]["id"] = response_id, item_id
    await send("response.output_item.done", {"output_index": 0, "item": done["output"][0]})
    await send("response.completed", {"response": done})
    await resp.write(b"data: [DONE]\n\n")
    if event[0] == "end":
        meta.complete()
    else:
        meta.error("stream", event[1] if event[0] == "error" else "the participant went silent")
    await resp.write_eof()
    return resp


__all__ = ["NO_PARTICIPANT", "V06", "handle"]
