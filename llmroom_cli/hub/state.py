"""Rooms, participants of both generations and event listeners, behind one lock held only for bookkeeping.

Both hub generations share the rooms: a v0.1 participant (joined with `POST /rooms/:code/join`, relayed
to over HTTP) and a v0.6 participant (registered with `PUT /v1/rooms/:code/participants/:id`, reached
through its WebSocket tunnel) sit in the same room and are listed by both APIs, each in that API's
shape. The routes (event loop thread) and tests (their own threads) call `HubState`; nothing here does
I/O, and the lock is never held while hashing a password.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import random
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
NO_PARTICIPANT = "No available participant for the requested model"
V01, V06 = "v0.1", "v0.6"
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(data: Any) -> str:
    """Compact JSON, like JSON.stringify (built once: json.dumps with options builds an encoder per call)."""
    return _ENCODER.encode(data)


def now_ms() -> int:
    return int(time.time() * 1000)


def nanoid(size: int = 21) -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(size))


def hash_password(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, scrypt digest); slow (16 MiB, tens of ms) on purpose: never call it under the lock."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << 14, r=8, p=1, dklen=32)
    return salt, digest


class Refused(Exception):
    """A request the state refuses: the HTTP status, a message, and a v0.6 error code."""

    def __init__(self, status: int, message: str, code: str = "INVALID_REQUEST") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Participant:
    """One participant; `generation` says how it joined and so how it is reached."""

    __slots__ = (
        "id", "nickname", "model", "endpoint", "specs", "config", "status", "joined_at", "seen",
        "generation", "source", "capabilities", "instructions", "updated_at", "connected",
        "tunnel_seen_ms", "tunnel", "inflight",
    )  # fmt: skip

    def __init__(self, generation: str, pid: str, body: dict[str, Any], source: str, now: int) -> None:
        self.generation = generation
        self.id = pid
        self.nickname: str = body["nickname"]
        self.model: str = body["model"]
        self.endpoint: str = body["endpoint"]
        self.specs: Any = body.get("specs")
        self.config: Any = body.get("config")
        self.capabilities: dict[str, str] = body.get("capabilities") or {}
        self.instructions: str | None = body.get("instructions")
        self.status = "online" if generation == V01 else "offline"
        self.joined_at = now
        self.updated_at = now
        self.seen = (now, time.monotonic())  # (lastSeen on the wire, monotonic for the sweep)
        self.source = source  # the address it joined from: the only one that may change it
        self.connected = False
        self.tunnel_seen_ms: int | None = None
        self.tunnel: Any = None  # the live tunnel (tunnel.Tunnel) of a v0.6 participant
        self.inflight = 0

    def wire_status(self) -> str:
        return "busy" if self.inflight and self.status == "online" else self.status

    def wire_v01(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "nickname": self.nickname, "model": self.model}
        out["endpoint"] = self.endpoint
        if self.specs is not None:
            out["specs"] = self.specs
        if self.config is not None:
            out["config"] = self.public_config() if self.generation == V06 else self.config
        out["status"] = self.status
        out["joinedAt"] = self.joined_at
        out["lastSeen"] = self.seen[0]
        return out

    def public_config(self) -> dict[str, Any]:
        config = dict(self.config or {}) if isinstance(self.config, dict) else {}
        config.pop("instructions", None)
        config["hasInstructions"] = bool(self.instructions)
        return config

    def connection(self) -> dict[str, Any]:
        if self.generation == V01:  # reached over HTTP at its endpoint, not through a tunnel
            return {"kind": "http", "connected": self.status == "online", "lastTunnelSeenAt": None}
        return {"kind": "tunnel", "connected": self.connected, "lastTunnelSeenAt": self.tunnel_seen_ms}

    def capabilities_wire(self) -> dict[str, str]:
        if self.generation == V01:  # the v0.1 relay speaks chat completions only
            return {"openResponses": "unsupported", "chatCompletions": "supported"}
        return {
            "openResponses": self.capabilities.get("openResponses", "unknown"),
            "chatCompletions": self.capabilities.get("chatCompletions", "unknown"),
        }

    def wire_v06(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "nickname": self.nickname,
            "model": self.model,
            "endpoint": self.endpoint,
            "specs": self.specs if isinstance(self.specs, dict) else {},
            "config": self.public_config(),
            "capabilities": self.capabilities_wire(),
            "connection": self.connection(),
            "status": self.wire_status(),
            "joinedAt": self.joined_at,
            "lastSeen": self.seen[0],
            "updatedAt": self.updated_at,
        }

    def routable(self) -> bool:
        if self.generation == V01:
            return self.status == "online"
        return self.connected and self.tunnel is not None and self.status != "offline" and not self.inflight


class Room:
    __slots__ = (
        "id", "code", "name", "host_id", "created_at", "secret", "participants", "defaults",
        "instructions", "tokens",
    )  # fmt: skip

    def __init__(
        self,
        code: str,
        name: str,
        secret: tuple[bytes, bytes] | None,
        defaults: dict[str, Any] | None = None,
        instructions: str | None = None,
    ) -> None:
        self.id = nanoid()
        self.code = code
        self.name = name
        self.host_id = nanoid()
        self.created_at = now_ms()
        self.secret = secret  # (salt, scrypt digest) or None; never leaves this object
        self.participants: dict[str, Participant] = {}
        self.defaults = defaults or {}
        self.instructions = instructions
        self.tokens: dict[str, tuple[str, float]] = {}  # tunnel token -> (participant id, expiry)

    def wire_v01(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "name": self.name,
            "hostId": self.host_id,
            "createdAt": self.created_at,
        }

    def wire_v06(self) -> dict[str, Any]:
        out = self.wire_v01()
        if self.defaults or self.instructions:
            out["defaults"] = {**self.defaults, "hasInstructions": bool(self.instructions)}
        out["passwordProtected"] = self.secret is not None
        out["participantCount"] = len(self.participants)
        return out


class Listener:
    """One event-stream client: a bounded queue of encoded events (None ends it), woken thread-safely."""

    __slots__ = ("code", "flavor", "items", "wake", "loop", "bound")

    def __init__(self, code: str, flavor: str, wake: Any, loop: Any, bound: int) -> None:
        self.code = code
        self.flavor = flavor  # V01 (`event: participant:joined`) or V06 (`{type,timestamp,roomCode,data}`)
        self.items: collections.deque[bytes | None] = collections.deque()
        self.wake = wake  # an asyncio.Event of the hub's loop
        self.loop = loop
        self.bound = bound

    def offer(self, item: bytes | None) -> bool:
        if item is not None and len(self.items) >= self.bound:
            return False
        self.items.append(item)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is reading any more
            self.loop.call_soon_threadsafe(self.wake.set)
        return True


def sse_v01(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


def sse_v06(event: str, code: str, data: Any) -> bytes:
    frame = {"type": event, "timestamp": now_ms(), "roomCode": code, "data": data}
    return f"event: {event}\ndata: {dumps(frame)}\n\n".encode()


@dataclass
class Target:
    """Who a chat request goes to, copied out of the state (the lock is not held while relaying)."""

    id: str
    nickname: str
    model: str
    endpoint: str
    generation: str
    source: str
    tunnel: Any
    capabilities: dict[str, str]
    defaults: dict[str, Any]  # room defaults, then the participant's config (the request wins later)
    instructions: str | None


class PasswordGuard:
    """Failed password attempts per source address within a sliding window (429 past the bound)."""

    def __init__(self, failures: int, window_s: float) -> None:
        self.failures = failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._seen: dict[str, collections.deque[float]] = {}

    def blocked_for_s(self, source: str) -> float:
        """Seconds until this source may try again (0 when it may now)."""
        with self._lock:
            times = self._trim(source)
            if times is None or len(times) < self.failures:
                return 0.0
            return max(0.0, times[0] + self.window_s - time.monotonic())

    def failed(self, source: str) -> None:
        with self._lock:
            if len(self._seen) > 100_000:  # bound the table itself: forget the oldest source
                self._seen.pop(next(iter(self._seen)))
            self._seen.setdefault(source, collections.deque()).append(time.monotonic())

    def _trim(self, source: str) -> collections.deque[float] | None:
        times = self._seen.get(source)
        if times is None:
            return None
        limit = time.monotonic() - self.window_s
        while times and times[0] < limit:
            times.popleft()
        if not times:
            del self._seen[source]
            return None
        return times


class HubState:
    """Every room, participant and event listener of a hub, behind one lock held only for bookkeeping."""

    def __init__(self, max_rooms: int = 1000, max_participants_per_room: int = 10_000) -> None:
        self.lock = threading.Lock()
        self.max_rooms = max_rooms
        self.max_participants = max_participants_per_room
        self._rooms: dict[str, Room] = {}
        self._listeners: set[Listener] = set()

    # -- the public API (routes and tests call these) -------------------------------------------------

    def create_room(self, name: str, password: str | None = None) -> dict[str, Any]:
        """Create a room and return its public v0.1 dict (`id, code, name, hostId, createdAt`)."""
        secret = hash_password(password) if password else None  # slow on purpose: outside the lock
        return self.add_room(name, secret).wire_v01()

    def add_room(
        self,
        name: str,
        secret: tuple[bytes, bytes] | None,
        defaults: dict[str, Any] | None = None,
        instructions: str | None = None,
    ) -> Room:
        """Add a room whose password is hashed already; Refused(507) past `max_rooms`."""
        with self.lock:
            if len(self._rooms) >= self.max_rooms:
                raise Refused(507, f"Too many rooms on this hub (at most {self.max_rooms})", "LIMIT_EXCEEDED")
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))
            while code in self._rooms:
                code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))
            room = Room(code, name, secret, defaults, instructions)
            self._rooms[code] = room
            self._emit_locked(None, ("room:created", room.wire_v01()), ("room.created", room.wire_v06()))
        return room

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
        """Copies of a room's participants (v0.1 shape) in join order; KeyError when there is no room."""
        with self.lock:
            listed = [p.wire_v01() for p in self._rooms[code.upper()].participants.values()]
        return copy.deepcopy(listed)

    def clear(self) -> None:
        """Forget every room, like a restarted hub."""
        with self.lock:
            self._rooms.clear()
            for listener in list(self._listeners):
                self._drop(listener)

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
                        gone = {"participantId": p.id}
                        self._emit_locked(
                            room.code, ("participant:offline", gone), ("participant.offline", gone)
                        )
        return marked

    # -- lookups --------------------------------------------------------------------------------------

    def room(self, code: str) -> Room | None:
        with self.lock:
            return self._rooms.get(code.upper())

    def rooms_v01(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{**r.wire_v01(), "participantCount": len(r.participants)} for r in self._rooms.values()]

    def rooms_v06(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.wire_v06() for r in self._rooms.values()]

    def room_v06(self, code: str) -> dict[str, Any] | None:
        with self.lock:
            room = self._rooms.get(code.upper())
            return None if room is None else room.wire_v06()

    def listing(self, code: str, generation: str) -> list[dict[str, Any]] | None:
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                return None
            if generation == V01:
                return [p.wire_v01() for p in room.participants.values()]
            return [p.wire_v06() for p in room.participants.values()]

    def models(self, code: str) -> list[dict[str, Any]] | None:
        """`/rooms/:code/v1/models`: routable ones, v0.1 ones under `gambiarra`, v0.6 under `gambi`."""
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                return None
            out = []
            for p in room.participants.values():
                entry: dict[str, Any] = {
                    "id": p.id,
                    "object": "model",
                    "created": p.joined_at // 1000,
                    "owned_by": p.nickname,
                }
                if p.generation == V01:
                    if p.status != "online":
                        continue
                    entry["gambiarra"] = {"nickname": p.nickname, "model": p.model, "endpoint": p.endpoint}
                else:
                    if not p.connected or p.status == "offline":
                        continue
                    entry["gambi"] = {
                        "nickname": p.nickname,
                        "model": p.model,
                        "endpoint": p.endpoint,
                        "capabilities": p.capabilities_wire(),
                        "connection": p.connection(),
                    }
                out.append(entry)
            return out

    # -- v0.1 participants ----------------------------------------------------------------------------

    def join_v01(
        self, code: str, body: dict[str, Any], source: str, timeout_s: float
    ) -> tuple[dict[str, Any], str, Any]:
        """Add or replace (same id, same place) a v0.1 participant: (wire, room id, a replaced tunnel)."""
        with self.lock:
            room = self._room_or_refuse(code)
            old = room.participants.get(body["id"])
            self._may_change(old, source, timeout_s)
            self._room_has_space(room, old)
            p = Participant(V01, body["id"], body, source, now_ms())
            if old is not None:
                p.joined_at = old.joined_at if old.generation == V01 else p.joined_at
            room.participants[p.id] = p  # a dict keeps an existing key's position: the upsert rule
            wire = p.wire_v01()
            self._emit_locked(room.code, ("participant:joined", wire), ("participant.joined", p.wire_v06()))
            return wire, room.id, old.tunnel if old is not None else None

    def leave(self, code: str, participant_id: str, source: str | None, timeout_s: float) -> Any:
        """Remove a participant (`source` None: no address check); returns its tunnel, if it had one."""
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
            p = room.participants.get(participant_id)
            if p is None:
                raise Refused(404, "Participant not found", "PARTICIPANT_NOT_FOUND")
            if source is not None:
                self._may_change(p, source, timeout_s)
            del room.participants[participant_id]
            gone = {"participantId": participant_id}
            self._emit_locked(room.code, ("participant:left", gone), ("participant.left", gone))
            return p.tunnel

    def health(
        self, code: str, participant_id: str, source: str | None = None, timeout_s: float = 30.0
    ) -> str | None:
        """Record a v0.1 health check (back online at once); None when done, else the error message.

        Only the address that holds the participant keeps it alive (`source` None: no check). From
        another address: 403 while it is held; once it is gone, "Participant not found", so an agent
        whose address changed re-joins, which reclaims the id from its new address."""
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                return "Room not found"
            p = room.participants.get(participant_id)
            if p is None:
                return "Participant not found"
            if source is not None and p.source != source:
                self._may_change(p, source, timeout_s)  # raises 403 while the participant is held
                return "Participant not found"
            p.seen = (now_ms(), time.monotonic())
            p.status = "online" if p.generation == V01 or p.connected else "offline"
            return None

    # -- v0.6 participants ----------------------------------------------------------------------------

    def put_v06(
        self,
        code: str,
        pid: str,
        body: dict[str, Any],
        source: str,
        timeout_s: float,
        token_ttl_s: float,
    ) -> tuple[bool, dict[str, Any], str, str]:
        """Register or update (PUT upsert): (created, wire, room id, new single-use tunnel token)."""
        with self.lock:
            room = self._room_or_refuse(code)
            old = room.participants.get(pid)
            self._may_change(old, source, timeout_s)
            self._room_has_space(room, old)
            now = now_ms()
            p = Participant(V06, pid, body, source, now)
            if old is not None:
                p.joined_at = old.joined_at
                if old.generation == V06:  # the old tunnel stays attached until a new one supersedes it
                    p.tunnel = old.tunnel
            room.participants[pid] = p
            mono = time.monotonic()
            for token, (_, expiry) in list(room.tokens.items()):
                if expiry < mono:
                    del room.tokens[token]
            mine = [t for t, (owner, _) in room.tokens.items() if owner == pid]
            for token in mine[:-7]:  # earlier tokens stay valid (as on the reference), but at most 8
                del room.tokens[token]
            token = str(uuid.uuid4())
            room.tokens[token] = (pid, mono + token_ttl_s)
            wire = p.wire_v06()
            if old is None:
                self._emit_locked(
                    room.code, ("participant:joined", p.wire_v01()), ("participant.joined", wire)
                )
            else:
                self._emit_locked(
                    room.code, ("participant:joined", p.wire_v01()), ("participant.updated", wire)
                )
            return old is None, wire, room.id, token

    def heartbeat_v06(self, code: str, pid: str, source: str, timeout_s: float) -> dict[str, Any]:
        with self.lock:
            room = self._room_or_refuse(code)
            p = room.participants.get(pid)
            if p is None:
                raise Refused(404, "Participant not found.", "PARTICIPANT_NOT_FOUND")
            self._may_change(p, source, timeout_s)
            p.seen = (now_ms(), time.monotonic())
            if p.generation == V01:
                p.status = "online"
            elif p.status != "busy":
                p.status = "online" if p.connected else "offline"
            return {"success": True, "status": p.wire_status(), "lastSeen": p.seen[0]}

    def take_token(self, code: str, pid: str, token: str) -> None:
        """Use up a tunnel token (single use, TTL); Refused with the reference's statuses otherwise."""
        with self.lock:
            room = self._room_or_refuse(code)
            if pid not in room.participants:
                raise Refused(404, "Participant not found.", "PARTICIPANT_NOT_FOUND")
            held = room.tokens.get(token)
            if held is None or held[0] != pid or held[1] < time.monotonic():
                raise Refused(401, "Tunnel token is invalid or expired.")

    def use_token(self, code: str, pid: str, token: str) -> None:
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is not None:
                room.tokens.pop(token, None)

    def attach_tunnel(self, code: str, pid: str, tunnel: Any) -> Any:
        """The tunnel of `pid` is open: online at once. Returns the tunnel it supersedes (or None)."""
        with self.lock:
            room = self._room_or_refuse(code)
            p = room.participants.get(pid)
            if p is None:
                raise Refused(404, "Participant not found.", "PARTICIPANT_NOT_FOUND")
            old = p.tunnel
            p.tunnel = tunnel
            p.connected = True
            p.tunnel_seen_ms = now_ms()
            p.seen = (p.tunnel_seen_ms, time.monotonic())
            p.status = "online"
            p.source = tunnel.peer  # from now on the tunnel's own address is the one that may change it
            self._emit_locked(room.code, None, ("participant.updated", p.wire_v06()))
            return old if old is not tunnel else None

    def tunnel_seen(self, code: str, pid: str, tunnel: Any) -> None:
        with self.lock:
            room = self._rooms.get(code.upper())
            p = room.participants.get(pid) if room is not None else None
            if p is not None and p.tunnel is tunnel:
                p.tunnel_seen_ms = now_ms()
                p.connected = True

    def detach_tunnel(self, code: str, pid: str, tunnel: Any) -> None:
        with self.lock:
            room = self._rooms.get(code.upper())
            p = room.participants.get(pid) if room is not None else None
            if p is not None and p.tunnel is tunnel:
                p.tunnel = None
                p.connected = False
                p.tunnel_seen_ms = None
                p.status = "offline"
                p.inflight = 0
                assert room is not None
                self._emit_locked(room.code, None, ("participant.updated", p.wire_v06()))

    # -- routing --------------------------------------------------------------------------------------

    def route(self, code: str, wanted: str) -> Target:
        """Pick the participant for an inference request and mark a v0.6 one busy (`release` after)."""
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
            chosen: Participant | None = None
            if wanted in ("*", "any"):
                free = [p for p in room.participants.values() if p.routable()]
                chosen = random.choice(free) if free else None
            elif wanted.startswith("model:"):
                name = wanted[6:]
                chosen = next(
                    (p for p in room.participants.values() if p.model == name and p.routable()), None
                )
            else:
                by_id = room.participants.get(wanted)
                if by_id is not None and not by_id.routable():
                    if by_id.generation == V01:
                        raise Refused(503, "Participant is offline")
                    if by_id.tunnel is None or not by_id.connected:
                        raise Refused(503, "Participant tunnel is not connected.")
                    if by_id.inflight:
                        raise Refused(409, "Participant is already handling another request.")
                    raise Refused(404, NO_PARTICIPANT)
                chosen = by_id or next(
                    (p for p in room.participants.values() if p.model == wanted and p.routable()), None
                )
            if chosen is None:
                raise Refused(404, NO_PARTICIPANT)
            if chosen.generation == V06:
                chosen.inflight += 1
            defaults = {**room.defaults}
            instructions = room.instructions
            if chosen.generation == V06 and isinstance(chosen.config, dict):
                defaults.update({k: v for k, v in chosen.config.items() if k != "instructions"})
                instructions = chosen.instructions or instructions
            return Target(
                chosen.id, chosen.nickname, chosen.model, chosen.endpoint, chosen.generation, chosen.source,
                chosen.tunnel, chosen.capabilities_wire(), defaults, instructions,
            )  # fmt: skip

    def release(self, code: str, target: Target) -> None:
        """A request to `target` is over (answered, failed, or its client went away): free it."""
        if target.generation != V06:
            return
        with self.lock:
            room = self._rooms.get(code.upper())
            p = room.participants.get(target.id) if room is not None else None
            if p is not None and p.tunnel is target.tunnel and p.inflight:
                p.inflight -= 1

    # -- events ---------------------------------------------------------------------------------------

    def subscribe(self, code: str, flavor: str, wake: Any, loop: Any, bound: int) -> Listener | None:
        with self.lock:
            room = self._rooms.get(code.upper())
            if room is None:
                return None
            listener = Listener(room.code, flavor, wake, loop, bound)
            self._listeners.add(listener)
            return listener

    def unsubscribe(self, listener: Listener) -> None:
        with self.lock:
            self._listeners.discard(listener)

    def emit(self, code: str, v01: tuple[str, Any] | None, v06: tuple[str, Any] | None) -> None:
        """Send one room event to that room's listeners, each in its generation's shape."""
        with self.lock:
            self._emit_locked(code.upper(), v01, v06)

    def end_all_streams(self) -> None:
        with self.lock:
            for listener in list(self._listeners):
                self._drop(listener)

    # -- under the lock -------------------------------------------------------------------------------

    def _room_or_refuse(self, code: str) -> Room:
        room = self._rooms.get(code.upper())
        if room is None:
            raise Refused(404, "Room not found", "ROOM_NOT_FOUND")
        return room

    def _room_has_space(self, room: Room, old: Participant | None) -> None:
        if old is None and len(room.participants) >= self.max_participants:
            raise Refused(
                507, f"Room is full (at most {self.max_participants} participants)", "LIMIT_EXCEEDED"
            )

    @staticmethod
    def _may_change(p: Participant | None, source: str, timeout_s: float) -> None:
        """A participant is changed or removed only from the address that holds it, unless it is gone:
        no tunnel open and no sign of life for `timeout_s` (an agent whose address changed comes back)."""
        if p is None or p.source == source:
            return
        alive = time.monotonic() - p.seen[1] <= timeout_s
        if p.generation == V01 and p.status == "online" and alive:
            raise Refused(403, "Participant is held by another address", "PARTICIPANT_CONFLICT")
        if p.generation == V06 and (p.tunnel is not None or alive):
            raise Refused(403, "Participant is held by another address", "PARTICIPANT_CONFLICT")

    def _emit_locked(
        self, code: str | None, v01: tuple[str, Any] | None, v06: tuple[str, Any] | None
    ) -> None:
        if not self._listeners:
            return
        encoded: dict[str, bytes] = {}
        for listener in list(self._listeners):
            if code is None and listener.flavor == V06:
                continue  # room.created reaches no v0.6 client (its room did not exist to subscribe to)
            if code is not None and listener.code != code:
                continue
            event = v01 if listener.flavor == V01 else v06
            if event is None:
                continue
            if listener.flavor not in encoded:
                encoded[listener.flavor] = (
                    sse_v01(*event) if listener.flavor == V01 else sse_v06(event[0], listener.code, event[1])
                )
            if not listener.offer(encoded[listener.flavor]):
                self._drop(listener)  # too slow to follow: it is cut off rather than buffered forever

    def _drop(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        listener.items.clear()
        listener.offer(None)
