"""`join --dry-run`: exactly the request `join` would send to the hub, with every secret shown as "***".

Which request a hub gets depends on its API generation (v0.1: `POST /rooms/CODE/join` with the id in
the body; v0.6: `PUT /v1/rooms/CODE/participants/ID`), and a dry run does not ask the hub: without a
known generation both are shown. The bodies are built by the same functions the sessions send
(`JoinPlan.body`, `v06.registration_body` with the client's own filter), so they cannot drift apart.

Redacted: the room password, any key anywhere in the body that names a secret (a `config` entry
called `api_key`, say), and the values of the credential headers the relay adds for the local server
(which never go to the hub: they are listed so the user sees that).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from llmroom_cli.session import JoinPlan

REDACTED = "***"
# `password`, `client_secret`, `access_token`, `api_key` ...; not `max_tokens` or `bypass`.
_SECRET_KEY = re.compile(
    r"(?i)^(pass|pwd)$|passw(or)?d|secret|(^|[-_])token$|api[-_]?key|authorization|cookie|credential"
)
# Never in a v0.6 body, whatever the plan holds (V06Client.register drops them too).
_V06_NEVER = ("id", "authHeaders")


def redact(value: Any) -> Any:
    """A copy of a JSON value with the value of every secret-named key replaced by "***"."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _seg(value: str) -> str:
    return quote(value, safe="")


def join_requests(
    plan: JoinPlan,
    generation: str | None = None,
    capabilities: dict[str, str] | None = None,
    v01_endpoint: str | None = None,
) -> list[dict[str, Any]]:
    """The request(s) `join` sends first for `plan`, unredacted: one per hub API generation that may
    answer (`generation` "v0.1" or "v0.6"; "both" or None: both, v0.6 first). `v01_endpoint`: what the
    v0.1 request publishes instead of `plan.endpoint` (the share relay's address)."""
    from llmroom_cli.protocols.v06 import registration_body  # the module the session sends with

    hub = plan.hub_url.rstrip("/")
    out: list[dict[str, Any]] = []
    if generation in (None, "both", "v0.6"):
        body = {k: v for k, v in registration_body(plan, capabilities).items() if k not in _V06_NEVER}
        path = f"/v1/rooms/{_seg(plan.code)}/participants/{_seg(plan.participant_id)}"
        out.append({"hub_api": "v0.6", "method": "PUT", "url": hub + path, "body": body})
    if generation in (None, "both", "v0.1"):
        path = f"/rooms/{_seg(plan.code)}/join"
        body = plan.body()
        if v01_endpoint is not None:
            body["endpoint"] = v01_endpoint
        out.append({"hub_api": "v0.1", "method": "POST", "url": hub + path, "body": body})
    return out


def preview(
    plan: JoinPlan,
    generation: str | None = None,
    *,
    capabilities: dict[str, str] | None = None,
    credentials: Mapping[str, str] | None = None,
    v01_endpoint: str | None = None,
) -> dict[str, Any]:
    """What `join --dry-run` prints (as JSON): the request(s) of `join_requests`, redacted, and the
    names of the headers sent only to the local server. Contacts nothing."""
    out: dict[str, Any] = {
        "dry_run": True,
        "hub": plan.hub_url,
        "room": plan.code,
        "shares": plan.endpoint,  # the local server: a v0.1 hub gets the share relay's address instead
        "requests": [redact(r) for r in join_requests(plan, generation, capabilities, v01_endpoint)],
    }
    if generation in (None, "both"):
        out["note"] = "the hub's API generation decides which request is sent; a dry run does not ask it"
    if credentials:
        out["local_server_headers"] = dict.fromkeys(credentials, REDACTED)
    return out
