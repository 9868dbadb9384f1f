"""The v0.6 (Gambi) `/v1` management API: `{data, meta}` and `{error, meta}` envelopes, PUT upsert."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web

from llmroom_cli.hub import events, tunnel
from llmroom_cli.hub.context import Context
from llmroom_cli.hub.state import V06, Refused, dumps, now_ms
from llmroom_cli.hub.wire import BadRequest, depth, envelope, error_v06, parse_object, read_body, source_of

HINTS = {
    "ROOM_NOT_FOUND": ("Room not found.", "Run 'llmroom list' to see this hub's rooms."),
    "PARTICIPANT_NOT_FOUND": ("Participant not found.", "Check the participant id and retry."),
    "INVALID_PASSWORD": ("Invalid password.", "Provide the correct room password and retry."),
}
ROUTE_NOT_FOUND = ("Route not found.", "Check the requested path and HTTP method.")
CAPABILITY_VALUES = ("supported", "unsupported", "unknown")
# config key -> (type check, bounds) as the reference validates them; unknown keys are dropped
_NUMBER_BOUNDS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}


def _refused(exc: Refused) -> web.Response:
    if exc.code in HINTS:
        message, hint = HINTS[exc.code]
        return error_v06(exc.status, exc.code, message, hint)
    return error_v06(exc.status, exc.code, exc.message)


def _bad(exc: BadRequest) -> web.Response:
    if exc.message.startswith("Invalid JSON body"):
        return error_v06(
            400, exc.code, "Invalid JSON body.", "Provide a valid JSON object and retry.", exc.details
        )
    return error_v06(
        exc.status, exc.code, exc.message, exc.hint, exc.details if exc.status != 400 or exc.details else None
    )


async def dispatch(ctx: Context, request: web.BaseRequest, segs: list[str]) -> web.StreamResponse:
    """Serve a request whose path starts with `/v1/`."""
    method = request.method
    n = len(segs)
    try:
        if segs == ["v1", "health"] and method == "GET":
            return envelope(200, {"status": "ok", "timestamp": now_ms()})
        if segs == ["v1", "rooms"]:
            if method == "GET":
                return envelope(200, ctx.state.rooms_v06())
            if method == "POST":
                return await _create_room(ctx, request)
        if n >= 3 and segs[1] == "rooms":
            code = segs[2]
            if n == 3 and method == "GET":
                room = ctx.state.room_v06(code)
                if room is None:
                    raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
                return envelope(200, room)
            if n == 4 and segs[3] == "participants" and method == "GET":
                listed = ctx.state.listing(code, V06)
                if listed is None:
                    raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
                return envelope(200, listed)
            if n == 4 and segs[3] == "events" and method == "GET":
                return await events.stream(ctx, request, code, V06)
            if n == 5 and segs[3] == "participants":
                if method == "PUT":
                    return await _put(ctx, request, code, segs[4])
                if method == "DELETE":
                    await read_body(request, ctx.limits)
                    old = ctx.state.leave(code, segs[4], source_of(request), ctx.participant_timeout_s)
                    if old is not None:  # unlike the reference, its tunnel is closed rather than orphaned
                        await old.close(1000, "Participant left the room.")
                    return envelope(200, {"success": True})
            if n == 6 and segs[3] == "participants" and segs[5] == "heartbeat" and method == "POST":
                await read_body(request, ctx.limits)  # a body is ignored
                data = ctx.state.heartbeat_v06(code, segs[4], source_of(request), ctx.participant_timeout_s)
                return envelope(200, data)
            if n == 6 and segs[3] == "participants" and segs[5] == "tunnel" and method == "GET":
                return await tunnel.upgrade(ctx, request, code, segs[4])
        return error_v06(404, "INVALID_REQUEST", *ROUTE_NOT_FOUND)
    except Refused as exc:
        return _refused(exc)
    except BadRequest as exc:
        return _bad(exc)


def _field_errors(errors: dict[str, list[str]], message: str, hint: str) -> BadRequest:
    return BadRequest(400, message, hint=hint, details={"formErrors": [], "fieldErrors": errors})


def _generation_config(raw: Any, errors: dict[str, list[str]], prefix: str = "") -> dict[str, Any]:
    """The known generation settings of a room's defaults or a participant's config, checked."""
    out: dict[str, Any] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        errors[prefix.rstrip(".") or "config"] = ["Invalid input: expected object"]
        return out
    for key, value in raw.items():
        if key in _NUMBER_BOUNDS:
            low, high = _NUMBER_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors[prefix + key] = ["Invalid input: expected number"]
            elif value > high:
                errors[prefix + key] = [f"Too big: expected number to be <={high:g}"]
            elif value < low:
                errors[prefix + key] = [f"Too small: expected number to be >={low:g}"]
            else:
                out[key] = value
        elif key in ("max_tokens", "seed"):
            if isinstance(value, bool) or not isinstance(value, int) or (key == "max_tokens" and value <= 0):
                errors[prefix + key] = [
                    "Invalid input: expected a positive integer"
                    if key == "max_tokens"
                    else "Invalid input: expected int"
                ]  # noqa: E501
            else:
                out[key] = value
        elif key == "stop":
            if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                out[key] = value
            else:
                errors[prefix + key] = ["Invalid input: expected string or array of strings"]
        elif key == "instructions":
            if isinstance(value, str):
                out[key] = value
            else:
                errors[prefix + key] = ["Invalid input: expected string"]
    return out


async def _create_room(ctx: Context, request: web.BaseRequest) -> web.Response:
    data = parse_object(await read_body(request, ctx.limits), ctx.limits)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(400, "Name is required", hint="Provide a room name via the 'name' field.")
    if len(name) > ctx.limits.max_field_chars:
        raise BadRequest(400, f"Name is too long (at most {ctx.limits.max_field_chars} characters)")
    password = data.get("password")
    if password is not None and (not isinstance(password, str) or len(password) > ctx.limits.max_url_chars):
        raise BadRequest(400, "Invalid password field.")
    errors: dict[str, list[str]] = {}
    defaults = _generation_config(data.get("defaults"), errors)
    if errors:
        raise _field_errors(errors, "Invalid room defaults.", "Check the runtime config payload and retry.")
    instructions = defaults.pop("instructions", None)
    secret = await ctx.hash(password) if password else None
    room = ctx.state.add_room(name, secret, defaults, instructions)
    wire = ctx.state.room_v06(room.code) or {}
    return envelope(201, {"room": wire, "hostId": room.host_id})


async def _put(ctx: Context, request: web.BaseRequest, code: str, pid: str) -> web.Response:
    limits = ctx.limits
    body = await read_body(request, limits)
    room = ctx.state.room(code)
    if room is None:
        raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
    data = parse_object(body, limits)
    if "authHeaders" in data:
        raise BadRequest(
            400,
            "Participant auth headers are not accepted by the hub.",
            hint="Pass authHeaders to createParticipantSession() or the CLI runtime so credentials stay local"
            " to the participant.",
            details={"forbidden": ["authHeaders"]},
        )
    required = ("nickname", "model", "endpoint")
    if any(not isinstance(data.get(k), str) or not data[k].strip() for k in required) or not pid.strip():
        raise BadRequest(
            400,
            "Missing required fields.",
            hint="Provide nickname, model, and endpoint.",
            details={"required": list(required)},
        )
    errors: dict[str, list[str]] = {}
    for key in ("nickname", "model"):
        if len(data[key]) > limits.max_field_chars:
            errors[key] = [f"Too big: expected string to have <={limits.max_field_chars} characters"]
    if len(pid) > limits.max_field_chars:
        errors["id"] = [f"Too big: expected string to have <={limits.max_field_chars} characters"]
    endpoint = data["endpoint"]
    try:
        parts = urlsplit(endpoint)
        _ = parts.port
        if not parts.scheme or not (parts.netloc or parts.path) or len(endpoint) > limits.max_url_chars:
            raise ValueError(endpoint)
        if any(c.isspace() for c in endpoint) or not endpoint.isprintable():
            raise ValueError(endpoint)
    except ValueError:
        errors["endpoint"] = ["Invalid URL"]
    specs_raw = data.get("specs")
    specs: dict[str, Any] = {}
    if specs_raw is not None and not isinstance(specs_raw, dict):
        errors["specs"] = ["Invalid input: expected object"]
    elif isinstance(specs_raw, dict):
        for key in ("gpu", "vram", "ram", "cpu"):  # unknown keys are dropped, as on the reference
            value = specs_raw.get(key)
            if value is None:
                continue
            if key in ("gpu", "cpu") and isinstance(value, str) and len(value) <= limits.max_field_chars:
                specs[key] = value
            elif key in ("vram", "ram") and isinstance(value, (int, float)) and not isinstance(value, bool):
                specs[key] = value
            else:
                errors[f"specs.{key}"] = ["Invalid input"]
    config = _generation_config(data.get("config"), errors, "config.")
    caps_raw = data.get("capabilities")
    capabilities: dict[str, str] = {}
    if isinstance(caps_raw, dict):
        for key in ("openResponses", "chatCompletions"):
            value = caps_raw.get(key, "unknown")
            if value not in CAPABILITY_VALUES:
                errors[f"capabilities.{key}"] = [
                    'Invalid option: expected one of "supported"|"unsupported"|"unknown"'
                ]
            else:
                capabilities[key] = value
    elif caps_raw is not None:
        errors["capabilities"] = ["Invalid input: expected object"]
    if errors:
        raise _field_errors(
            errors, "Invalid participant registration.", "Check the participant payload and retry."
        )
    instructions = config.pop("instructions", None)
    if len(dumps(specs)) + len(dumps(config)) + len(instructions or "") > limits.max_stored_bytes or (
        depth(config, limits.max_nesting) > limits.max_nesting
    ):
        raise BadRequest(413, f"Participant registration too large (at most {limits.max_stored_bytes} bytes)")
    source = source_of(request)
    if not await ctx.password_ok(room.secret, data.get("password"), source):
        raise Refused(401, "Invalid password.", "INVALID_PASSWORD")
    stored = {
        "nickname": data["nickname"],
        "model": data["model"],
        "endpoint": endpoint,
        "specs": specs,
        "config": config,
        "capabilities": capabilities,
        "instructions": instructions,
    }
    created, wire, room_id, token = ctx.state.put_v06(
        code, pid, stored, source, ctx.participant_timeout_s, limits.tunnel_token_ttl_s
    )
    scheme = "wss" if request.secure else "ws"
    url = f"{scheme}://{request.host}/v1/rooms/{room.code}/participants/{quote(pid, safe='')}/tunnel"
    answer = {"participant": wire, "roomId": room_id, "tunnel": {"token": token, "url": url}}
    return envelope(201 if created else 200, answer)
