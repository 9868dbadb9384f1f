"""What every route shares: the state, the limits, password checking, and the hub's own addresses."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from typing import Any

from llmroom_cli.hub.limits import Limits
from llmroom_cli.hub.state import HubState, PasswordGuard, hash_password
from llmroom_cli.hub.wire import BadRequest


@dataclass
class Context:
    """One running hub's shared objects; built by the runner inside the hub's event loop."""

    state: HubState
    limits: Limits
    participant_timeout_s: float
    port: int = 0
    keepalive_s: float = 15.0  # read on every wait, so a test may shorten it on a running hub
    guard: PasswordGuard = field(init=False)
    hashing: asyncio.Semaphore = field(init=False)
    tunnels: set[Any] = field(default_factory=set)  # open tunnel.Tunnel objects (closed with 1001)
    streams: set[asyncio.Event] = field(default_factory=set)  # wake-ups of open event streams
    upstream: Any = None  # the aiohttp ClientSession of the v0.1 relay, made on first use
    # Responses object id -> (room code, participant id, or None when the chat fallback made it)
    responses: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.guard = PasswordGuard(self.limits.password_failures, self.limits.password_window_s)
        self.hashing = asyncio.Semaphore(self.limits.password_hash_concurrency)

    async def hash(self, password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
        """scrypt off the event loop, at most `password_hash_concurrency` at once (16 MiB each)."""
        async with self.hashing:
            return await asyncio.get_running_loop().run_in_executor(None, hash_password, password, salt)

    async def password_ok(self, secret: tuple[bytes, bytes] | None, given: Any, source: str) -> bool:
        """Check a room password; failures are counted per source and refused with 429 past the bound."""
        if secret is None:
            return True
        wait_s = self.guard.blocked_for_s(source)
        if wait_s > 0:
            raise BadRequest(
                429,
                "Too many failed password attempts; try again later",
                code="RATE_LIMITED",
                details={"retryAfterS": round(wait_s, 1)},
            )
        if not isinstance(given, str) or not given:
            # No password is no guess: the agent is learning that the room is protected (it asks its
            # user next), so it costs no hashing and does not count against the source.
            return False
        digest = (await self.hash(given, secret[0]))[1]
        if hmac.compare_digest(digest, secret[1]):  # constant time, whatever the length
            return True
        self.guard.failed(source)
        return False
