"""The join plan and its run: probe, model choice, how the room reaches us, specs, the session loop.

`llmroom join` (and `llmroom demo`) fill one `SharePlan` and call `run_share(plan, ui)`. What the run
decides, in order: the local server answers (waiting for a loading one with `wait`), which model is
shared, which hub (the implicit default may fall back to one found on the LAN), the hub's generation
(`protocols.generation.detect_generation`, once; `hub_api` forces it), then how the room reaches the
local server:

- v0.6 (or a hub that speaks both, as ours does): through the tunnel the agent dials out
  (`TunnelSession` serving `tunnel.request`s through the relay core). No hub connects to this machine,
  so there is no reachability check and no exit 6 for a localhost-only server;
- v0.1: through the agent's own `ShareRelay`, bound to the interface that routes to the hub (loopback
  when the hub is on this machine) and open only to the hub's address; the relay's URL is published;
- `direct` (or `advertise`) on v0.1: the server's own address, checked to answer (`reach`), as before.

Either way one `relay.RelayCore` carries the requests: credentials are added there and only there,
concurrency is bounded, each finished request is a `request` event, and on leave it stops accepting,
the room is left and the requests in flight get `drain_s` to finish (`_Draining`).

The core never prints and never exits: what needs a person (pick a model, type a password, a line on
stderr, the immediate exit of a second Ctrl-C) goes through the small `ShareUI` protocol that the CLI
implements. Errors are raised (errors.py), for the CLI to map to exit codes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmroom_cli.errors import (
    EndpointError,
    HubProtocolError,
    HubUnavailable,
    InvalidPassword,
    LlmroomError,
    RoomNotFound,
    UsageError,
)

if TYPE_CHECKING:
    import httpx

    from llmroom_cli.endpoints import ModelInfo, ServerInfo
    from llmroom_cli.relay import RelayCore, Traffic
    from llmroom_cli.session import Lifecycle, Outcome
    from llmroom_cli.watch import ServerWatch

HUB_APIS = ("v0.1", "v0.6")
# The server watch checks at most this often, whatever the heartbeat interval.
WATCH_MIN_INTERVAL_S = 1.0
# On leave, requests in flight get this long to finish: a typical chat answer streams within it.
DEFAULT_DRAIN_S = 10.0
# The capability probe (one POST {} per route, at start): the server is local, it answers at once.
CAPABILITY_PROBE_S = 5.0
# Answers that mean "this route is not served here" to the capability probe (as the reference reads
# them); any other status means the route exists (a 400 for the empty body is the usual answer).
UNSUPPORTED_STATUSES = frozenset({401, 403, 404, 405, 501})
CAPABILITY_BODY_BYTES = 64 * 1024
CAPABILITY_ROUTES = (("chatCompletions", "/v1/chat/completions"), ("openResponses", "/v1/responses"))


class ShareUI(Protocol):
    """The interactive bits the CLI keeps; the run calls them, never prints itself."""

    def interactive(self) -> bool:
        """Whether a person can answer questions (stdin and stderr are terminals)."""
        ...

    def message(self, text: str) -> None:
        """One line for the user on stderr."""
        ...

    def debug(self, text: str) -> None:
        """One line of `--debug` output (dropped without --debug); never given a secret."""
        ...

    def secret(self, value: str) -> None:
        """A secret of this run (a password, a credential), to blank wherever it would appear."""
        ...

    def choose_model(self, models: list[ModelInfo]) -> ModelInfo:
        """Ask which of several chat models to share; raises EndpointError when none is chosen."""
        ...

    def ask_password(self, prompt: str) -> str:
        """Read a password without echo."""
        ...

    def find_hub(self, http: httpx.Client, hub_url: str) -> tuple[str, str | None]:
        """The default hub if it answers, else one found on the LAN: (URL, its name when found)."""
        ...

    def password_for_lan_hub(self, lan_hub: str, secret: str | None, interactive: bool) -> str | None:
        """The password to send to a hub found on the LAN (None: withheld)."""
        ...

    def exit_now(self, leftover: tuple[str, str, str] | None) -> None:
        """A second Ctrl-C: exit at once; `leftover` is (room, participant id, hub URL) when the hub
        may still list us (the CLI prints the cleanup command)."""
        ...

    def unconfirmed_leave(self, room: str, participant_id: str, hub_url: str) -> None:
        """The hub did not confirm the leave: say how to clean up."""
        ...

    def join_may_have_landed(self, room: str, participant_id: str, hub_url: str) -> None:
        """Stopped before the join was confirmed, but a join request may have reached the hub (and
        the clean-up leave was not confirmed): say how to clean up."""
        ...


@dataclass
class SharePlan:
    """What the user asked `join` for, parsed and checked (`check()`), before any network request.

    Hooks for what other parts connect: `on_started` (the session joined), `output_hook(JoinOutput)`,
    `on_server_down` (callbacks run when a relayed request finds the local server down: the pause
    logic connects here), `on_session(core, session)` (each new session, with the relay core that
    serves it), `wake` (set it to end the run as a signal would).
    """

    room: str
    hub_url: str
    endpoint: str
    nickname: str
    model: str | None = None
    password: str | None = field(default=None, repr=False)
    config: dict[str, Any] | None = None
    no_specs: bool = False
    participant_id: str | None = None
    interval_s: float = 10.0
    wait: bool = False
    mode: str = "plain"  # json | quiet | live | plain
    advertise: str | None = None
    force: bool = False
    implicit_hub: bool = False
    direct: bool = False
    hub_api: str | None = None
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    max_concurrent: int | None = None  # None: relay.DEFAULT_MAX_CONCURRENT
    drain_s: float = DEFAULT_DRAIN_S
    pause_when_busy: bool = False
    # --share: only these spec fields (specs.parse_share); None sends them all.
    share_fields: tuple[str, ...] | None = None
    # --bench: time the model once (bench.measure) and merge the figures into specs.llm.
    bench: bool = False
    # --dry-run: `prepare` contacts no hub (no LAN fallback, no generation probe).
    dry_run: bool = False
    # The probe already made of `endpoint` (the search of the usual local ports found it): not redone.
    server: ServerInfo | None = field(default=None, repr=False)
    on_started: Callable[[], None] | None = None
    wake: threading.Event | None = None
    output_hook: Callable[[Any], None] | None = None
    on_server_down: list[Callable[[], None]] = field(default_factory=list)
    on_session: list[Callable[[RelayCore, Any], None]] = field(default_factory=list)

    def check(self) -> None:
        """UsageError (exit 2) for a combination that cannot work; no network."""
        if self.hub_api is not None and self.hub_api not in HUB_APIS:
            raise UsageError(f"--hub-api {self.hub_api!r}: expected v0.1 or v0.6")
        if self.hub_api == "v0.6" and (self.direct or self.advertise is not None):
            option = "--direct" if self.direct else "--advertise"
            raise UsageError(
                f"{option} publishes an address for a v0.1 hub to connect to; a v0.6 hub is served"
                " through the tunnel (drop one of them)"
            )
        if self.max_concurrent is not None and not 1 <= self.max_concurrent <= 1024:
            raise UsageError(f"--max-concurrent {self.max_concurrent}: expected 1 to 1024")
        if not (math.isfinite(self.drain_s) and 0 <= self.drain_s <= 3600):
            raise UsageError(f"--drain {self.drain_s}: expected seconds from 0 to 3600")
        if self.no_specs and (self.share_fields is not None or self.bench):
            option = "--share" if self.share_fields is not None else "--bench"
            raise UsageError(f"--no-specs sends no specs: drop it, or drop {option}")
        if self.bench and self.share_fields is not None and "llm" not in self.share_fields:
            raise UsageError("--bench sends its figures in specs.llm: add llm to --share")


@dataclass
class Prepared:
    """What `prepare` found: the model, the hub, its generation, how to publish, the specs."""

    model: str
    info: ServerInfo
    hub_url: str
    generation: str
    how: str  # tunnel | relay | direct
    published: str | None  # direct mode: the URL given to the hub
    specs: dict[str, Any] | None
    lan_hub: str | None


def traffic_source(core: RelayCore) -> Callable[[], Traffic]:
    """What the panel draws traffic from: a fresh copy of the core's counters at each call."""
    return lambda: core.traffic


def local_http(endpoint: str, max_concurrent: int) -> httpx.Client:
    """The relay core's own client for the local server (never the hub's: a pool full of long streams
    must not hold up heartbeats): max_concurrent + 1 connections (one more for `ping`), no proxy
    for a loopback server, redirects never followed."""
    import ssl
    from urllib.parse import urlsplit

    import httpx

    from llmroom_cli.reach import _is_loopback_name

    verify: ssl.SSLContext | bool = True
    if endpoint.lower().startswith("http://"):
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # holds no CA: fails closed on https
    host = urlsplit(endpoint).hostname or ""
    pool = max_concurrent + 1
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=60.0)
    return httpx.Client(
        timeout=httpx.Timeout(5.0),
        limits=limits,
        verify=verify,
        follow_redirects=False,
        trust_env=not _is_loopback_name(host) and not host.startswith("127."),
    )


def probe_capabilities(
    http: httpx.Client, endpoint: str, credentials: dict[str, str], timeout_s: float = CAPABILITY_PROBE_S
) -> dict[str, str]:
    """What the server supports, for a v0.6 registration, from one `POST {}` per route (once per run):
    401/403/404/405/501 is "unsupported", any other answer "supported", no answer "unknown"."""
    import httpx

    found: dict[str, str] = {}
    for key, path in CAPABILITY_ROUTES:
        try:
            with http.stream(
                "POST",
                endpoint.rstrip("/") + path,
                json={},
                headers={**credentials, "Accept-Encoding": "identity"},
                timeout=httpx.Timeout(timeout_s),
            ) as response:
                found[key] = "unsupported" if response.status_code in UNSUPPORTED_STATUSES else "supported"
                # Read the (small) error body, bounded: a connection closed with unread bytes is reset.
                read = 0
                with contextlib.suppress(httpx.StreamError):  # a body already read needs no reading
                    for piece in response.iter_raw():
                        read += len(piece)
                        if read > CAPABILITY_BODY_BYTES:
                            break
        except httpx.HTTPError:
            found[key] = "unknown"
    return found


def relay_binding(hub_url: str) -> tuple[str, set[str]]:
    """(the address the share relay listens on, the peer addresses it accepts) for the hub at `hub_url`:
    loopback when the hub is on this machine, else this machine's address on the interface that routes
    to the hub, open only to the hub's own addresses."""
    from urllib.parse import urlsplit

    from llmroom_cli import reach

    loopback = ("127.0.0.1", {"127.0.0.1", "::1"})
    if reach.hub_is_local(hub_url):
        return loopback
    parts = urlsplit(hub_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addr = reach.route_address(host, port)
    if addr is None:
        raise EndpointError(
            f"this machine has no route to the hub at {hub_url.rstrip('/')}: nowhere to publish the relay",
            "check the --hub URL",
        )
    if addr.startswith("127.") or addr == "::1":
        return loopback  # the kernel routes to the hub over loopback: it is on this machine after all
    peers = set(reach.resolve_host(host))
    if not peers:
        raise EndpointError(f"the hub's name {host} does not resolve", "check the --hub URL")
    return addr, peers


class _CountingHandler:
    """A tunnel handler that knows how many requests it is still answering (the relay core's slot is
    free as soon as the server's answer is read; the last frames may still be on their way)."""

    def __init__(self, handler: Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]) -> None:
        self.handler = handler
        self._busy = 0
        self._cv = threading.Condition()

    def __call__(self, request: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> None:
        with self._cv:
            self._busy += 1
        try:
            self.handler(request, send)
        finally:
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True


# After the drain, how long the tunnel's writer gets to send the frames already queued (frames of at
# most 1 MiB to a hub on the LAN: milliseconds), so an answer that finished is not cut by the close.
FLUSH_S = 1.0


def _flush_tunnel(session: Any, handler: _CountingHandler, timeout_s: float) -> None:
    """Wait (bounded) until the tunnel has answered every request: the handlers are done and the
    writer's queue is empty. The queue is TunnelSession's own (`_tunnel.outbox`): read, never changed."""
    deadline = time.monotonic() + timeout_s
    handler.wait_idle(timeout_s)
    tunnel = getattr(session, "_tunnel", None)
    outbox = getattr(tunnel, "outbox", None)
    while outbox is not None and not outbox.empty() and time.monotonic() < deadline:
        time.sleep(0.005)
    # The writer took the last frame off the queue; give its send a moment to reach the socket.
    time.sleep(0.02)


class _Reports:
    """How many finished requests the run's `on_request` has reported (events out, state file written)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1

    def caught_up(self, core: Any) -> bool:
        """Whether every request the core finished has been reported."""
        traffic = core.traffic
        return self.count >= int(traffic.served) + int(traffic.failed) + int(traffic.rejected)


class _Draining:
    """The Lifecycle handed to run_session: the session, with a leave that stops the relay taking
    requests first and gives those in flight `drain_s` to finish.

    On v0.1 the room is left first (the hub stops routing to us) and the requests already inside the
    relay drain afterwards; through the tunnel they drain first, as leaving closes the tunnel they
    answer through. With nothing in flight the drain returns at once, so leave stays within 3 s."""

    def __init__(
        self,
        inner: Any,
        core: RelayCore,
        drain_s: float,
        drain_first: bool,
        handler: _CountingHandler | None = None,
        reports: _Reports | None = None,
    ) -> None:
        self.inner = inner
        self.reports = reports
        self.core = core
        self.drain_s = drain_s
        self.drain_first = drain_first
        self.handler = handler
        self.drained: bool | None = None

    def __getattr__(self, name: str) -> Any:
        # Everything else (plan, status, pause/resume ...) is the session's own.
        return getattr(self.inner, name)

    @property
    def stop(self) -> threading.Event:
        event: threading.Event = self.inner.stop
        return event

    @stop.setter
    def stop(self, value: threading.Event) -> None:
        self.inner.stop = value

    @property
    def joined(self) -> bool:
        return bool(self.inner.joined)

    @joined.setter
    def joined(self, value: bool) -> None:
        self.inner.joined = value

    @property
    def join_maybe_sent(self) -> bool:
        return bool(self.inner.join_maybe_sent)

    @join_maybe_sent.setter
    def join_maybe_sent(self, value: bool) -> None:
        self.inner.join_maybe_sent = value

    def join(self) -> None:
        self.inner.join()

    def heartbeat_loop(self) -> None:
        self.inner.heartbeat_loop()

    def emit(self, event: str, **data: Any) -> None:
        self.inner.emit(event, **data)

    def abandon(self) -> None:
        self.core.stop_accepting()
        self.inner.abandon()

    def _drain(self) -> None:
        in_flight = self.core.traffic.in_flight
        if in_flight:
            self.inner.emit("draining", in_flight=in_flight, drain_s=self.drain_s)
        self.drained = self.core.drain(self.drain_s)
        if in_flight and self.handler is not None:
            _flush_tunnel(self.inner, self.handler, FLUSH_S)
        if in_flight:
            # The core frees a request's slot just before it reports the request: let the last
            # `request` event out before `left` (bounded: a report is a line of output).
            deadline = time.monotonic() + FLUSH_S
            while self.reports is not None and not self.reports.caught_up(self.core):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)

    def leave(self) -> bool:
        self.core.stop_accepting()
        if self.drain_first:
            self._drain()
            return bool(self.inner.leave())
        confirmed = bool(self.inner.leave())
        self._drain()
        return confirmed


def detect_with_retry(
    http: httpx.Client,
    hub_url: str,
    forced: str | None,
    wake: threading.Event,
    on_retry: Callable[[str, float], None],
    retry_s: float,
) -> str:
    """The hub's generation; an unreachable hub is asked again for `retry_s` (as the join would be),
    and what answers but is no hub is taken as v0.1 (the join then says what is wrong with it)."""
    from llmroom_cli.protocols.generation import detect_generation

    deadline = time.monotonic() + retry_s
    delay = 0.25
    told = False
    while True:
        try:
            return detect_generation(http, hub_url, forced)
        except HubProtocolError:
            return "v0.1"
        except HubUnavailable as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            if not told:
                told = True
                on_retry(exc.message, remaining)
            if wake.wait(min(delay, remaining)):
                raise
            delay = min(delay * 2, 2.0)


def prepare(
    http: httpx.Client,
    plan: SharePlan,
    ui: ShareUI,
    wake: threading.Event,
    on_retry: Callable[[str, float], None],
) -> Prepared:
    """Check the endpoint, pick the model, the hub and its generation, and (direct mode) the URL the
    hub reaches the server at, while the specs are detected in parallel."""
    from llmroom_cli import endpoints
    from llmroom_cli.session import STARTUP_RETRY_S

    found: dict[str, Any] = {}

    def detect() -> None:
        from llmroom_cli.specs import detect_specs

        found["specs"] = detect_specs(ui.debug).data

    detector = None
    if not plan.no_specs:
        detector = threading.Thread(target=detect, name="llmroom-specs", daemon=True)
        detector.start()
    ep = plan.endpoint
    target = endpoints.probe_url(ep)
    info = plan.server
    if info is None or info.url != ep:
        info = endpoints.probe(http, target, credentials=plan.credentials)
    if info.status == "loading":
        if not plan.wait:
            raise EndpointError(f"the LLM server at {ep} is still loading a model", "wait, or pass --wait")
        if plan.mode not in ("json", "quiet"):
            ui.message(f"waiting for the LLM server at {ep} to finish loading ...")
        while info.status == "loading":
            time.sleep(1.0)
            info = endpoints.probe(http, target, credentials=plan.credentials)
    interactive = ui.interactive() and plan.mode != "json"
    chosen = endpoints.choose_model(info, plan.model, ui.choose_model if interactive else None)
    hub_url, lan_hub = plan.hub_url, None
    if plan.implicit_hub and not plan.dry_run:
        hub_url, lan_hub = ui.find_hub(http, hub_url)
    if plan.dry_run:  # not asked: the preview shows the request of each generation not forced
        generation = plan.hub_api or "both"
    else:
        generation = detect_with_retry(http, hub_url, plan.hub_api, wake, on_retry, STARTUP_RETRY_S)
    wants_address = plan.direct or plan.advertise is not None
    if generation == "v0.6" and wants_address:
        raise UsageError(
            f"the hub at {hub_url} speaks only v0.6: it is served through the tunnel, so"
            f" {'--direct' if plan.direct else '--advertise'} has no address to publish (drop it)"
        )
    how = "direct" if wants_address else "tunnel" if generation in ("v0.6", "both") else "relay"
    ui.debug(
        f"hub {hub_url}: API {generation}"
        f" ({'forced with --hub-api' if plan.hub_api else 'detected'}); sharing {how}"
    )
    published = None
    if how == "direct" and plan.dry_run:  # the reachability check would ask the hub
        published = plan.advertise or ep
    elif how == "direct":
        from llmroom_cli.reach import publishable_endpoint

        publication = publishable_endpoint(
            http, ep, hub_url, info.kind, advertise=plan.advertise, force=plan.force
        )
        if publication.warning:
            ui.message(f"warning: {publication.warning}")
        elif publication.rewritten and plan.mode not in ("json", "quiet"):
            ui.message(f"publishing {publication.url} (the address the hub reaches this machine at)")
        published = publication.url
    specs: dict[str, Any] | None = None
    if detector is not None:
        detector.join(timeout=5.0)
        specs = dict(found.get("specs") or {})
        llm = endpoints.llm_specs(info, chosen)
        if llm:
            specs["llm"] = llm
        if plan.bench:
            from llmroom_cli.bench import measure

            try:
                figures = measure(http, ep, chosen.id, plan.credentials).to_specs()
                specs["llm"] = {**(specs.get("llm") or {}), **figures}
            except EndpointError as exc:  # the join goes on without the figures
                ui.message(f"warning: --bench: {exc.message}")
        if plan.share_fields is not None:
            from llmroom_cli.specs import select

            specs = select(specs, plan.share_fields)
    return Prepared(chosen.id, info, hub_url, generation, how, published, specs, lan_hub)


class _Tracker:
    """The session's events to the output, and the agent's state file kept in step with them and with
    the relay's traffic (a state file that cannot be written never disturbs the join)."""

    STATES = {
        "joined": "online",
        "online": "online",
        "rejoined": "online",
        "reconnecting": "reconnecting",
        "paused": "paused",
        "resumed": "online",
    }

    def __init__(self, output: Callable[[dict[str, Any]], None], state_file: Any) -> None:
        self.output = output
        self.state_file = state_file
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        self.output(event)
        name = event.get("event")
        changes: dict[str, Any] = {}
        if name in self.STATES:
            changes["state"] = self.STATES[str(name)]
        if name == "reconnecting":
            changes["last_error"] = event.get("reason")
        elif name == "paused":  # `status` says why in its last-problem column
            changes["last_error"] = f"paused: {event.get('reason')}"
        elif name in ("online", "rejoined", "resumed"):
            changes["last_error"] = None
        if changes:
            self._update(True, **changes)

    def served(self, count: int) -> None:
        # One small file write per finished request: nothing next to an LLM answer, and `status` is exact.
        self._update(True, requests_served=count)

    def _update(self, force: bool, **changes: Any) -> None:
        with self._lock, contextlib.suppress(OSError):
            self.state_file.update(force=force, **changes)


def run_share(plan: SharePlan, ui: ShareUI) -> int:
    """Everything `join` does after parsing: returns 0 on a clean leave, raises errors.py classes.
    While it runs, a state file tells `llmroom status` about it; the file goes when it ends."""
    cleanup: list[Callable[[], None]] = []  # run however the run ends, last first
    try:
        return _run(plan, ui, cleanup)
    finally:
        for undo in reversed(cleanup):
            with contextlib.suppress(Exception):
                undo()


def _run(plan: SharePlan, ui: ShareUI, cleanup: list[Callable[[], None]]) -> int:
    from llmroom_cli import endpoints
    from llmroom_cli.agents import AgentState, StateFile
    from llmroom_cli.http import make_http
    from llmroom_cli.identity import stable_participant_id
    from llmroom_cli.relay import DEFAULT_MAX_CONCURRENT, RelayCore
    from llmroom_cli.render import JoinOutput
    from llmroom_cli.session import Interrupted, JoinPlan, capture_signals

    for value in plan.credentials.values():
        ui.secret(value)
        if value.lower().startswith("bearer "):
            ui.secret(value[7:])
    wake = plan.wake or threading.Event()
    phase = {"starting": True}
    plan_ref: list[JoinPlan] = []
    output: JoinOutput | None = None
    secret = plan.password
    room = plan.room

    def exit_now() -> None:
        if output is not None:
            # Closed on a thread of its own, waited for briefly: this runs in a signal handler, which
            # may have interrupted the main thread inside the output's own lock (an event being drawn).
            closer = threading.Thread(target=output.close, name="llmroom-close-output", daemon=True)
            closer.start()
            closer.join(0.5)
        leftover = None
        if plan_ref:
            p = plan_ref[0]
            leftover = (p.code, p.participant_id, p.hub_url)
        ui.exit_now(leftover)

    def retry_notice(reason: str, remaining_s: float) -> None:
        phase["retried"] = True
        if output is not None and output.retrying(reason, remaining_s):
            return  # a live spinner line counts the seconds down
        if plan.mode != "quiet":
            ui.message(f"{reason}; retrying for up to {remaining_s:.0f} s ...")

    sessions: list[Any] = []
    tracker: _Tracker | None = None
    reports = _Reports()

    def on_request(event: dict[str, Any]) -> None:
        try:
            if sessions:
                sessions[-1].emit("request", **event)
            if tracker is not None:
                tracker.served(core.traffic.served)
        finally:
            reports.add()

    def server_down() -> None:
        for callback in list(plan.on_server_down):
            callback()

    session: Any = None
    error: BaseException | None = None
    outcome: Outcome | None = None
    try:
        with capture_signals(wake, exit_now, interrupt=lambda: phase["starting"]) as received:
            # Every URL this run may call: an https one among them gets real certificate verification.
            extra = [plan.advertise] if plan.advertise else []
            http = make_http(plan.hub_url, endpoints.probe_url(plan.endpoint), *extra)
            cleanup.append(http.close)
            prep = prepare(http, plan, ui, wake, retry_notice)
            hub_url, lan_hub = prep.hub_url, prep.lan_hub
            withheld = False
            if lan_hub is not None and secret:
                interactive = ui.interactive() and plan.mode != "json"
                secret = ui.password_for_lan_hub(lan_hub, secret, interactive)
                withheld = secret is None
            pid = plan.participant_id or stable_participant_id(
                hub_url, room, plan.endpoint, lambda m: ui.message(f"warning: {m}")
            )
            local = endpoints.probe_url(plan.endpoint)
            max_concurrent = plan.max_concurrent or DEFAULT_MAX_CONCURRENT
            core_http = local_http(local, max_concurrent)
            cleanup.append(core_http.close)
            core = RelayCore(
                local,
                core_http,
                credentials=plan.credentials,
                max_concurrent=max_concurrent,
                on_request=on_request,
                on_server_down=server_down,
            )
            published = _publish(prep, core, ui, cleanup, plan.endpoint)
            capabilities = None
            if prep.how == "tunnel" and plan.bench and plan.mode != "quiet":
                # The v0.6 registration keeps gpu, vram, ram and cpu of the specs and drops the rest
                # (the reference hub does, and ours follows it there): say so rather than send in vain.
                ui.message(
                    "warning: --bench: a v0.6 hub keeps only gpu, vram, ram and cpu of the specs, so the"
                    " room will not see the figures (a v0.1 hub does: --hub-api v0.1 where it speaks both)"
                )
            if prep.how == "tunnel":
                capabilities = probe_capabilities(core_http, local, plan.credentials)
                ui.debug(f"capabilities: {capabilities}")
            join_plan = JoinPlan(
                hub_url,
                room,
                pid,
                plan.nickname,
                prep.model,
                published,
                secret,
                prep.specs,
                plan.config,
                plan.interval_s,
            )
            plan_ref.append(join_plan)
            info = {
                "room": room,
                "hub": hub_url,
                "nickname": plan.nickname,
                "model": prep.model,
                "endpoint": published,
                "id": pid,
            }
            output = JoinOutput(plan.mode, info, traffic=traffic_source(core))
            output.on_broken = wake.set
            if plan.output_hook is not None:
                plan.output_hook(output)
            state_file = StateFile(
                AgentState(os.getpid(), room, hub_url, "starting", time.time(), participant_id=pid)
            )
            cleanup.append(state_file.remove)
            with contextlib.suppress(OSError):
                state_file.update(force=True)
            tracker = _Tracker(output, state_file)
            prompts = 0
            while True:
                session = _new_session(prep, http, join_plan, core, tracker, capabilities, retry_notice, plan)
                session.reports = reports
                sessions.append(session)
                for hook in plan.on_session:
                    hook(core, session.inner)
                output.status = session.inner.status
                # From here on the join may reach the hub: a signal sets `wake`, and the session leaves.
                phase["starting"] = False
                if wake.is_set():
                    break
                watch = _server_watch(plan, core, session.inner, ui)
                plan.on_server_down.append(watch.server_down)

                def started(watch: ServerWatch = watch) -> None:
                    watch.start()
                    if plan.on_started is not None:
                        plan.on_started()

                try:
                    outcome = _run_lifecycle(session, wake, started, prep.how == "tunnel")
                finally:
                    plan.on_server_down.remove(watch.server_down)
                    watch.close()
                error = outcome.error
                can_prompt = ui.interactive() and not received and plan.mode != "json" and prompts < 3
                if isinstance(error, InvalidPassword) and can_prompt:
                    prompts += 1
                    where = f" on hub {lan_hub} (found on the local network)" if lan_hub else ""
                    ui.message(f"room {room}{where} is protected" if prompts == 1 else "wrong password")
                    phase["starting"] = True  # a Ctrl-C at the prompt just ends the command
                    output.end_retry()  # no spinner drawn over the question
                    join_plan.password = ui.ask_password("Room password: ")
                    if join_plan.password:
                        ui.secret(join_plan.password)
                    wake.clear()
                    continue
                break
    except Interrupted:
        if output is not None:
            output.close()
        if plan.mode != "quiet":
            why = f" (the hub at {plan.hub_url} never answered)" if phase.get("retried") else ""
            ui.message(f"stopped before joining{why}: nothing to leave")
        return 0
    assert output is not None and session is not None
    output.close()
    # Issue 14 item 10: a stop before the hub confirmed the join (Ctrl-C during the start-up retry
    # against a hub that is down) joined nothing: no leave warning. session.py's Outcome decides what
    # happened; this only words it. Exit 0, as for every stop by signal that leaves nothing behind.
    if outcome is not None and outcome.stopped_before_joining:
        if outcome.left_behind:
            ui.join_may_have_landed(room, join_plan.participant_id, hub_url)
        elif plan.mode != "quiet":
            why = "" if outcome.reached_hub else f" (the hub at {hub_url} never answered)"
            ui.message(f"stopped before joining{why}: nothing to leave")
        return 0
    if wake.is_set() and not session.join_maybe_sent:
        return 0
    if error is not None:
        if isinstance(error, InvalidPassword) and not join_plan.password and withheld:
            raise InvalidPassword(
                f"room {room} on hub {lan_hub} is protected, and the password was not sent to a hub"
                " found on the local network",
                f"name the hub to send it: --hub {hub_url}",
            )
        if isinstance(error, InvalidPassword) and not join_plan.password:
            raise InvalidPassword(
                f"room {room} is protected and no password was given",
                "give it with --password-stdin or LLMROOM_PASSWORD",
            )
        if isinstance(error, RoomNotFound) and session.joined:
            raise RoomNotFound(
                f"room {room} is gone from {hub_url}",
                "the hub restarted or the room was removed: create or pick a room and join again",
            )
        if isinstance(error, LlmroomError):
            raise error
        raise error
    if outcome is not None and outcome.confirmed is False:
        ui.unconfirmed_leave(room, join_plan.participant_id, hub_url)
    return 0


def _server_watch(plan: SharePlan, core: RelayCore, session: Any, ui: ShareUI) -> ServerWatch:
    """What pauses the participant while the local server does not answer (a ping each interval, and
    at once when a relayed request cannot connect) or, with --pause-when-busy, while other processes
    use the GPU; started once the session has joined."""
    from llmroom_cli.watch import ServerWatch, server_pids

    endpoint = plan.endpoint
    return ServerWatch(
        session,
        lambda: core.ping(timeout_s=1.0),
        # At most one check a second: with a test-sized --interval (0.01 s) a ping per beat doubled
        # the agent's CPU per beat; a relayed request that cannot connect still pauses at once.
        interval_s=max(plan.interval_s, WATCH_MIN_INTERVAL_S),
        pause_when_busy=plan.pause_when_busy,
        server_pids=lambda: server_pids(endpoint),
        note=lambda text: ui.message(f"note: {text}") if plan.mode != "quiet" else None,
        server=f"the local LLM server at {endpoint}",
    )


def dry_run(plan: SharePlan, ui: ShareUI) -> dict[str, Any]:
    """What `join --dry-run` prints: the join request(s) for `plan`, redacted (dryrun.preview). Only
    the local server is asked (model, specs, --bench, capabilities): no hub, no state file."""
    from llmroom_cli import endpoints
    from llmroom_cli.dryrun import preview
    from llmroom_cli.http import make_http
    from llmroom_cli.identity import stable_participant_id
    from llmroom_cli.session import JoinPlan

    local = endpoints.probe_url(plan.endpoint)
    with make_http(local) as http:
        prep = prepare(http, plan, ui, threading.Event(), lambda reason, remaining_s: None)
        capabilities = None
        if prep.how == "tunnel":
            capabilities = probe_capabilities(http, local, plan.credentials)
    pid = plan.participant_id or stable_participant_id(
        plan.hub_url, plan.room, plan.endpoint, lambda m: ui.message(f"warning: {m}")
    )
    # Through the tunnel the hub is shown the server's own URL (it never connects to it); a v0.1 hub
    # gets the share relay's address, whose port exists only once it listens: shown as PORT.
    v01_endpoint = None
    if prep.how != "direct":
        host = relay_binding(plan.hub_url)[0]
        v01_endpoint = f"http://{f'[{host}]' if ':' in host else host}:PORT"
    join_plan = JoinPlan(
        plan.hub_url,
        plan.room,
        pid,
        plan.nickname,
        prep.model,
        prep.published or plan.endpoint,
        plan.password,
        prep.specs,
        plan.config,
        plan.interval_s,
    )
    generation = None if prep.generation == "both" else prep.generation
    return preview(
        join_plan,
        generation,
        capabilities=capabilities,
        credentials=plan.credentials,
        v01_endpoint=v01_endpoint,
    )


def _publish(
    prep: Prepared, core: RelayCore, ui: ShareUI, cleanup: list[Callable[[], None]], endpoint: str
) -> str:
    """The endpoint URL the hub is given: the share relay's (started here, stopped by `cleanup`), the
    checked direct address, or, through the tunnel, the server's own URL (the hub only shows it)."""
    if prep.how == "direct":
        assert prep.published is not None
        return prep.published
    if prep.how == "tunnel":
        return endpoint
    from llmroom_cli.relay import ShareRelay

    bind_host, peers = relay_binding(prep.hub_url)
    relay = ShareRelay(core, bind_host, peers)
    try:
        url = relay.start()
    except OSError as exc:
        raise EndpointError(
            f"cannot listen on {bind_host} for the hub ({exc.strerror or exc})",
            "pass --direct to publish the server's own address instead",
        ) from None
    cleanup.append(relay.stop)
    ui.debug(f"share relay on {url}, open to {', '.join(sorted(peers))}")
    return url


def _new_session(
    prep: Prepared,
    http: httpx.Client,
    join_plan: Any,
    core: RelayCore,
    emit: Callable[[dict[str, Any]], None],
    capabilities: dict[str, str] | None,
    on_retry: Callable[[str, float], None],
    plan: SharePlan,
) -> _Draining:
    if prep.how == "tunnel":
        from llmroom_cli.protocols.v06 import RelayHandler, TunnelSession, V06Client

        handler = _CountingHandler(RelayHandler.from_core(core))
        tunnel = TunnelSession(
            V06Client(http, join_plan.hub_url),
            join_plan,
            handler,
            emit,
            stop=threading.Event(),
            capabilities=capabilities,
            on_retry=on_retry,
        )
        return _Draining(tunnel, core, plan.drain_s, drain_first=True, handler=handler)
    from llmroom_cli.client import HubClient
    from llmroom_cli.session import Session

    session = Session(
        HubClient(http, join_plan.hub_url), join_plan, emit, stop=threading.Event(), on_retry=on_retry
    )
    return _Draining(session, core, plan.drain_s, drain_first=False)


def _run_lifecycle(
    session: _Draining, wake: threading.Event, on_started: Callable[[], None] | None, tunnel: bool
) -> Outcome:
    """run_session over the draining wrapper; through the tunnel with run_tunnel_session's rules
    (nothing is DELETEd when the room is gone, the hub refused us, or the id is another agent's)."""
    from llmroom_cli.session import run_session

    lifecycle: Lifecycle = session
    if not tunnel:
        return run_session(lifecycle, wake, on_started)
    from llmroom_cli.protocols.v06 import TunnelSuperseded

    return run_session(
        lifecycle,
        wake,
        on_started,
        nothing_to_leave=(RoomNotFound, InvalidPassword, TunnelSuperseded),
        on_nothing_to_leave=session.abandon,
        thread_name="llmroom-tunnel-session",
    )
