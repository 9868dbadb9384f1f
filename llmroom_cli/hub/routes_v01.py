"""The v0.1 (Gambiarra) routes of hub-api.md, with the same wire behaviour as the hub they replace."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from llmroom_cli.hub import events, relay
from llmroom_cli.hub.context import Context
from llmroom_cli.hub.state import V01, Refused, now_ms
from llmroom_cli.hub.wire import (
    BadRequest,
    depth,
    error_v01,
    json_response,
    parse_object,
    read_body,
    source_of,
)

MISSING_JOIN_FIELDS = "Missing required fields: id, nickname, model, endpoint"

# path shape -> methods; "*" stands for a room code or a participant id
ROUTES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("health",): ("GET",),
    ("rooms",): ("GET", "POST"),
    ("rooms", "*", "join"): ("POST",),
    ("rooms", "*", "leave", "*"): ("DELETE",),
    ("rooms", "*", "health"): ("POST",),
    ("rooms", "*", "participants"): ("GET",),
    ("rooms", "*", "v1", "models"): ("GET",),
    ("rooms", "*", "v1", "chat", "completions"): ("POST",),
    ("rooms", "*", "v1", "responses"): ("POST",),
    ("rooms", "*", "v1", "responses", "*"): ("GET", "DELETE"),
    ("rooms", "*", "v1", "responses", "*", "input_items"): ("GET",),
    ("rooms", "*", "v1", "responses", "*", "cancel"): ("POST",),
    ("rooms", "*", "events"): ("GET",),
}
# Routes whose effects a browser page may cause cross-origin (see runner's origin check): reads and
# the inference calls that dashboards make. Everything else that writes is refused cross-origin.
CROSS_ORIGIN_WRITES = {
    ("rooms", "*", "v1", "chat", "completions"),
    ("rooms", "*", "v1", "responses"),
    ("rooms", "*", "v1", "responses", "*", "cancel"),
}


def shape(segs: list[str]) -> tuple[str, ...]:
    if segs and segs[0] == "rooms" and len(segs) >= 3:
        out = ["rooms", "*", *segs[2:]]
        if len(segs) == 4 and segs[2] == "leave":
            out[3] = "*"
        if len(segs) >= 5 and segs[2:4] == ["v1", "responses"]:
            out[4] = "*"
        return tuple(out)
    return tuple(segs)


def _string(data: dict[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(400, f"Field '{key}' must be a string")
    if len(value) > limit:
        raise BadRequest(400, f"Field '{key}' is too long (at most {limit} characters)")
    return value


def check_endpoint(url: str) -> None:
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok or not url.isprintable() or any(c.isspace() for c in url):
        raise BadRequest(400, "Field 'endpoint' must be an http:// or https:// URL")


def validate_join(data: dict[str, Any], ctx: Context) -> None:
    limits = ctx.limits
    fields = ("id", "nickname", "model", "endpoint")
    if any(data.get(k) is None or data.get(k) == "" for k in fields):
        raise BadRequest(400, MISSING_JOIN_FIELDS)
    for key in fields:
        value = _string(data, key, limits.max_url_chars if key == "endpoint" else limits.max_field_chars)
        if value is not None and not value.strip():
            raise BadRequest(400, MISSING_JOIN_FIELDS)
    check_endpoint(data["endpoint"])
    stored = 0
    for key in ("specs", "config"):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise BadRequest(400, f"Field '{key}' must be an object")
        if value is not None and depth(value, limits.max_nesting) > limits.max_nesting:
            raise BadRequest(400, f"Field '{key}' is nested too deeply")
        if value is not None:
            from llmroom_cli.hub.state import dumps

            stored += len(dumps(value))
    if stored > limits.max_stored_bytes:
        raise BadRequest(
            413, f"Fields 'specs' and 'config' are too large (at most {limits.max_stored_bytes} bytes)"
        )
    _string(data, "password", limits.max_url_chars)


async def dispatch(ctx: Context, request: web.BaseRequest, segs: list[str]) -> web.StreamResponse:
    key = shape(segs)
    allowed = ROUTES.get(key)
    if allowed is None:
        return error_v01(404, "Not found")
    if request.method not in allowed:
        return error_v01(405, "Method not allowed", {"Allow": ", ".join((*allowed, "OPTIONS"))})
    code = segs[1].upper() if len(segs) > 1 else ""
    route = key[2:] if len(key) > 2 else key
    state = ctx.state
    try:
        if key == ("health",):
            return json_response(200, {"status": "ok", "timestamp": now_ms()})
        if key == ("rooms",):
            if request.method == "GET":
                return json_response(200, {"rooms": state.rooms_v01()})
            return await _create_room(ctx, request)
        if route == ("health",):
            body = await read_body(request, ctx.limits)
            try:
                pid = _string(parse_object(body, ctx.limits), "id", ctx.limits.max_field_chars)
                if not pid:
                    raise BadRequest(400, "Participant ID is required")
            except BadRequest:
                if state.room(code) is None:  # the room is checked first, as on the reference
                    return error_v01(404, "Room not found")
                raise
            problem = state.health(code, pid, source_of(request), ctx.participant_timeout_s)
            return error_v01(404, problem) if problem else json_response(200, {"success": True})
        if route == ("join",):
            return await _join(ctx, request, code)
        if route[0] == "leave":
            await read_body(request, ctx.limits)
            tunnel = state.leave(code, segs[3], source_of(request), ctx.participant_timeout_s)
            if tunnel is not None:
                await tunnel.close(1000, "Participant left the room.")
            return json_response(200, {"success": True})
        if route == ("participants",):
            listed = state.listing(code, V01)
            if listed is None:
                return error_v01(404, "Room not found")
            return json_response(200, {"participants": listed})
        if route == ("v1", "models"):
            models = state.models(code)
            if models is None:
                return error_v01(404, "Room not found")
            return json_response(200, {"object": "list", "data": models})
        if route == ("events",):
            return await events.stream(ctx, request, code, V01)
        return await relay.handle(ctx, request, code, segs[3:], segs)
    except Refused as exc:
        return error_v01(exc.status, exc.message)
    except BadRequest as exc:
        return error_v01(exc.status, exc.message)


async def _create_room(ctx: Context, request: web.BaseRequest) -> web.Response:
    data = parse_object(await read_body(request, ctx.limits), ctx.limits)
    name = _string(data, "name", ctx.limits.max_field_chars)
    if not name or not name.strip():
        raise BadRequest(400, "Name is required")
    password = _string(data, "password", ctx.limits.max_url_chars)
    secret = await ctx.hash(password) if password else None
    room = ctx.state.add_room(name, secret).wire_v01()
    return json_response(201, {"room": room, "hostId": room["hostId"]})


async def _join(ctx: Context, request: web.BaseRequest, code: str) -> web.Response:
    state = ctx.state
    body = await read_body(request, ctx.limits)
    room = state.room(code)
    if room is None:
        return error_v01(404, "Room not found")
    data = parse_object(body, ctx.limits)
    validate_join(data, ctx)
    source = source_of(request)
    if not await ctx.password_ok(room.secret, data.get("password"), source):
        return error_v01(401, "Invalid password")
    participant, room_id, tunnel = state.join_v01(code, data, source, ctx.participant_timeout_s)
    if tunnel is not None:  # a v0.6 participant's id taken over (it was gone): its old tunnel ends
        await tunnel.close(1000, "Superseded by a newer registration.")
    return json_response(201, {"participant": participant, "roomId": room_id})
