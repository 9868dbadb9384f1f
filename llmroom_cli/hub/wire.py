"""Request and answer encoding shared by the routes: bounded body reads, JSON parsing, both error shapes."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from typing import Any

from aiohttp import web

from llmroom_cli.hub.limits import Limits
from llmroom_cli.hub.state import dumps

JSON_TYPE = "application/json;charset=utf-8"
CORS_V01 = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
}
CORS_V06 = {**CORS_V01, "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS"}
LIMITS_KEY = web.AppKey("limits", Limits)


class BadRequest(Exception):
    """A request refused before it reached the state: status, message, and a v0.6 code/hint/details."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "INVALID_REQUEST",
        hint: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.hint = hint
        self.details = details


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=dumps(data).encode(), headers=headers)
    resp.headers["Content-Type"] = JSON_TYPE
    resp.headers["Access-Control-Allow-Origin"] = "*"
    return resp


def error_v01(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(status, {"error": message}, headers)


def envelope(status: int, data: Any) -> web.Response:
    return json_response(status, {"data": data, "meta": {"requestId": str(uuid.uuid4())}})


def error_v06(
    status: int, code: str, message: str, hint: str | None = None, details: Any = None
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if hint is not None:
        error["hint"] = hint
    if details is not None:
        error["details"] = details
    return json_response(status, {"error": error, "meta": {"requestId": str(uuid.uuid4())}})


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def depth(value: Any, limit: int) -> int:
    """How deep `value` nests (counting stops past `limit`), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _nesting_prescan(raw: bytes, limit: int) -> bool:
    """True when brackets outside strings nest deeper than `limit`: checked before parsing, so a body
    nested 100,000 deep never reaches the recursive decoder (or a Python server behind the relay)."""
    level = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            level += 1
            if level > limit:
                return True
        elif byte in (0x5D, 0x7D):
            level -= 1
    return False


async def read_body(request: web.BaseRequest, limits: Limits) -> bytes:
    """The whole body, within `max_body_bytes` (413) and `body_timeout_s` (408); the runner closes the
    connection after either answer (what is left of the body is drained for a moment, then dropped)."""
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise BadRequest(413, f"Request body too large (at most {limits.max_body_bytes} bytes)")

    async def whole() -> bytes:
        if request.headers.get("Expect", "").lower() == "100-continue" and request.content_length != 0:
            # What aiohttp's router does for `Expect` (the low-level server leaves it to the handler).
            await request.writer.write(b"HTTP/%d.%d 100 Continue\r\n\r\n" % request.version)
        body = bytearray()
        async for piece in request.content.iter_any():
            body += piece
            if len(body) > limits.max_body_bytes:
                raise BadRequest(413, f"Request body too large (at most {limits.max_body_bytes} bytes)")
        return bytes(body)

    try:
        return await asyncio.wait_for(whole(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(408, "Request body timed out") from None


def parse_object(body: bytes, limits: Limits, message: str = "Invalid JSON body") -> dict[str, Any]:
    """A JSON object from a body, or BadRequest(400) (v0.1 messages; v0.6 routes remap them)."""
    if _nesting_prescan(body, limits.max_nesting * 4):
        raise BadRequest(400, message, details={"cause": "Failed to parse JSON"})
    try:
        data = _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BadRequest(400, message, details={"cause": "Failed to parse JSON"}) from None
    if not isinstance(data, dict):
        raise BadRequest(400, "Request body must be a JSON object")
    return data


def source_of(request: web.BaseRequest) -> str:
    """The peer address a request came from (never a header: X-Forwarded-For is not trusted)."""
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        return host[7:] if host.startswith("::ffff:") else host  # an IPv4 client of a dual-stack socket
    return ""
