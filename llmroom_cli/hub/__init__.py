"""The embedded hub (`llmroom serve`): both hub generations, v0.1 and v0.6, on aiohttp.

    state.py      rooms and participants of both generations, event listeners, limits on both
    routes_v01.py the v0.1 routes (hub-api.md), unchanged on the wire
    routes_v1.py  the v0.6 `/v1` management API (envelopes, PUT upsert, heartbeat, delete)
    tunnel.py     the v0.6 participant WebSocket: token, messages, liveness, close codes
    relay.py      inference routing to one participant over HTTP (v0.1) or its tunnel (v0.6)
    events.py     room event streams (SSE), both shapes, keepalive comments
    runner.py     Config / Server / RunningHub: start_hub(), serve(), clean shutdown
    limits.py     every bound and deadline, named, with its default
    context.py    what the routes share; wire.py body reading, JSON, both error shapes
    testing.py    fault injection for tests (start_hub(test_hooks=True)), never on the product path

Importing this package imports aiohttp: only `llmroom serve` (and tests) do it.
"""

from llmroom_cli.hub.limits import Limits
from llmroom_cli.hub.routes_v01 import MISSING_JOIN_FIELDS
from llmroom_cli.hub.runner import Config, ListenError, PortInUse, RunningHub, Server, serve, start_hub
from llmroom_cli.hub.state import NO_PARTICIPANT, HubState

__all__ = [
    "MISSING_JOIN_FIELDS",
    "NO_PARTICIPANT",
    "Config",
    "HubState",
    "Limits",
    "ListenError",
    "PortInUse",
    "RunningHub",
    "Server",
    "serve",
    "start_hub",
]
