"""The hub's named limits and deadlines, with their defaults: one place, written down in the README."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Limits:
    """What one hub allows; every bound the hub enforces is a field here (README "The embedded hub")."""

    # -- requests --------------------------------------------------------------------------------
    max_body_bytes: int = 1 << 20  # a request body (join, chat ...): 413 past it
    max_header_field_bytes: int = 16 << 10  # one request header line: 400/431 past it
    max_field_chars: int = 256  # id, nickname, model, room name
    max_url_chars: int = 2048  # endpoint, password
    max_nesting: int = 32  # JSON depth of stored specs/config and of relayed bodies
    max_stored_bytes: int = 16 << 10  # specs + config of one participant, encoded
    # A connection is closed when it has sent no complete request head this long after connecting or
    # after its last answer: the idle timeout and the header deadline (slowloris) in one.
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this: 408 past it

    # -- state -----------------------------------------------------------------------------------
    max_rooms: int = 1000  # 507 past it
    max_participants_per_room: int = 10_000  # 507 past it
    sse_queue_events: int = 1024  # an event stream this far behind is cut, not buffered
    sse_keepalive_s: float = 15.0  # `: keepalive` comment on an idle event stream

    # -- passwords -------------------------------------------------------------------------------
    password_failures: int = 5  # failed password attempts per source address ...
    password_window_s: float = 60.0  # ... within this window, then 429 until it slides
    password_hash_concurrency: int = 2  # scrypt runs at once (16 MiB each)

    # -- relay (v0.1 participants over HTTP) -----------------------------------------------------
    upstream_connect_s: float = 10.0
    upstream_answer_s: float = 300.0  # a non-streamed answer must be complete within this: 504
    upstream_idle_s: float = 120.0  # a stream silent this long (before or between chunks) is ended
    max_buffered_answer_bytes: int = 16 << 20  # a non-streamed answer: 507 past it (stream instead)
    allow_relay_to: tuple[IPNetwork, ...] = field(default_factory=tuple)  # serve --allow-relay-to

    # -- tunnel (v0.6 participants) --------------------------------------------------------------
    tunnel_token_ttl_s: float = 60.0
    tunnel_silence_s: float = 30.0  # no participant message this long: close 4001
    tunnel_sweep_s: float = 10.0  # how often silent tunnels are looked for
    # One WebSocket message from a participant. The reference hub sets none and dropped an 18.2 MB
    # frame; 4 MiB holds a 1 MiB chunk base64-encoded three times over, and bounds what one frame costs.
    max_tunnel_message_bytes: int = 4 << 20
