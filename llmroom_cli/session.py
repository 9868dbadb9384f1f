"""The participant lifecycle: join -> heartbeat on a drift-free schedule -> leave. Never prints.

The lifecycle runs in one worker thread while the main thread waits on an Event, so a signal (which
only sets that Event) is answered at once, even while a request to a frozen hub is in flight.
Everything the session does is reported as event dicts to an `emit` callback, which the CLI renders.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from llmroom_cli.client import HubClient
from llmroom_cli.errors import (
    HubRejected,
    HubUnavailable,
    InvalidPassword,
    LlmroomError,
    ParticipantNotFound,
    RoomNotFound,
)

Emit = Callable[[dict[str, Any]], None]

# How long start-up keeps retrying an unreachable hub before exit 5 (the issue allows ~20 s at most).
STARTUP_RETRY_S = 10.0
# Leaving must finish within 3 s even when the hub is frozen: wait this long for an in-flight request,
LEAVE_WAIT_INFLIGHT_S = 0.8
# then give the DELETE this long.
LEAVE_TIMEOUT_S = 1.5


@dataclass
class JoinPlan:
    """Everything a join sends, decided before any request to the hub."""

    hub_url: str
    code: str
    participant_id: str
    nickname: str
    model: str
    endpoint: str
    password: str | None = None
    specs: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    interval_s: float = 10.0

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.participant_id,
            "nickname": self.nickname,
            "model": self.model,
            "endpoint": self.endpoint,
        }
        if self.password:
            body["password"] = self.password
        if self.specs is not None:
            body["specs"] = self.specs
        if self.config is not None:
            body["config"] = self.config
        return body


class Schedule:
    """Deadlines at start + k * interval (k = 1, 2, ...): a slow beat never shifts later ones, and
    deadlines already missed are skipped rather than bunched."""

    def __init__(self, start: float, interval_s: float) -> None:
        self.start = start
        self.interval_s = interval_s
        self.k = 0

    def next_deadline(self, now: float) -> float:
        k = self.k + 1
        behind = int((now - self.start) / self.interval_s)
        if behind >= k:  # the deadline(s) up to now were missed: skip to the next one ahead
            k = behind + 1
        self.k = k
        return self.start + k * self.interval_s


@dataclass
class Status:
    """What the live panel shows; updated by the worker, read by the renderer."""

    state: str = "starting"  # starting | online | reconnecting | left | error
    joined_at: float | None = None
    last_beat_at: float | None = None
    last_rtt_ms: float | None = None
    beats: int = 0
    reconnects: int = 0  # stretches of trouble (not failed attempts)
    attempt: int = 0  # failed attempts in the current stretch
    rejoins: int = 0
    last_error: str | None = None
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Session:
    """One participant in one room. `run()` blocks (join + heartbeat loop) until `stop` is set."""

    def __init__(
        self,
        client: HubClient,
        plan: JoinPlan,
        emit: Emit,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        startup_retry_s: float = STARTUP_RETRY_S,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        self.client = client
        self.plan = plan
        self._emit_cb = emit
        self.stop = stop or threading.Event()
        self.clock = clock
        self.startup_retry_s = startup_retry_s
        # Told once, with the reason and the seconds left, when start-up begins retrying the hub.
        self.on_retry = on_retry
        self.status = Status()
        self.join_maybe_sent = False
        self.joined = False
        self.left = False
        self._in_flight = threading.Lock()
        # Every request is shorter than the interval, so the hub sees an attempt each interval.
        self.request_timeout_s = max(min(5.0, plan.interval_s * 0.8), 0.005)

    # -- events -----------------------------------------------------------------------------------

    def emit(self, event: str, **data: Any) -> None:
        record: dict[str, Any] = {"event": event, "ts": _now_ms(), **data}
        self.status.history.append(record)
        self._emit_cb(record)

    # -- lifecycle ----------------------------------------------------------------------------------

    def join(self) -> None:
        """Join, retrying an unreachable hub for a few seconds; raises RoomNotFound, InvalidPassword,
        HubUnavailable (still unreachable), or returns quietly if stopped meanwhile."""
        deadline = self.clock() + self.startup_retry_s
        delay = 0.25
        while True:
            try:
                with self._in_flight:
                    self.join_maybe_sent = True
                    data = self.client.join(self.plan.code, self.plan.body(), timeout_s=self._join_timeout())
                break
            except HubUnavailable as exc:
                remaining = deadline - self.clock()
                if remaining <= 0 or self.stop.is_set():
                    raise
                if self.on_retry is not None and delay == 0.25:
                    self.on_retry(exc.message, remaining)
                if self.stop.wait(min(delay, remaining)):
                    return
                delay = min(delay * 2, 2.0)
        self.joined = True
        self.status.state = "online"
        self.status.joined_at = self.clock()
        participant = data.get("participant", {})
        self.emit(
            "joined",
            room=self.plan.code,
            hub=self.plan.hub_url,
            id=self.plan.participant_id,
            nickname=self.plan.nickname,
            model=self.plan.model,
            endpoint=self.plan.endpoint,
            specs=participant.get("specs", self.plan.specs) if isinstance(participant, dict) else None,
        )

    def _join_timeout(self) -> float:
        return max(self.request_timeout_s, 2.0) if not self.joined else self.request_timeout_s

    def heartbeat_loop(self) -> None:
        """Beat on schedule until stopped; raises RoomNotFound (exit 3) or InvalidPassword."""
        assert self.status.joined_at is not None
        schedule = Schedule(self.status.joined_at, self.plan.interval_s)
        while True:
            deadline = schedule.next_deadline(self.clock())
            if self.stop.wait(max(0.0, deadline - self.clock())):
                return
            self.beat()

    def beat(self) -> None:
        """One heartbeat with its fault handling (one request in flight at most)."""
        seq = self.status.beats + 1
        started = self.clock()
        try:
            with self._in_flight:
                self.client.heartbeat(self.plan.code, self.plan.participant_id, self.request_timeout_s)
        except ParticipantNotFound:
            self._rejoin()
            return
        except (HubUnavailable, HubRejected) as exc:
            self._trouble(exc)
            return
        except InvalidPassword:
            # A heartbeat carries no password: a 401 to it is the hub misbehaving (or a proxy in front
            # of it), not a wrong password of ours. Ride it out like any other hub trouble.
            self._trouble(HubUnavailable(f"the hub at {self.plan.hub_url} refused the heartbeat (401)"))
            return
        rtt_ms = round((self.clock() - started) * 1000, 2)
        self.status.beats = seq
        self.status.last_beat_at = self.clock()
        self.status.last_rtt_ms = rtt_ms
        self.emit("heartbeat", seq=seq, rtt_ms=rtt_ms)
        if self.status.state != "online":
            self._back_online()

    def _rejoin(self) -> None:
        try:
            with self._in_flight:
                self.client.join(self.plan.code, self.plan.body(), timeout_s=self.request_timeout_s)
        except (HubUnavailable, ParticipantNotFound) as exc:
            self._trouble(exc)
            return
        except HubRejected as exc:
            self._trouble(exc)
            return
        except InvalidPassword:
            # The room now wants another password than the one we joined with: keep trying (the
            # hub may come back as it was), saying so plainly.
            self._trouble(
                HubUnavailable(f"the hub at {self.plan.hub_url} refused the rejoin: invalid password")
            )
            return
        self.status.rejoins += 1
        self.status.beats += 1
        self.status.last_beat_at = self.clock()
        self.emit("rejoined", id=self.plan.participant_id)
        if self.status.state != "online":
            self._back_online()

    def _trouble(self, exc: LlmroomError) -> None:
        if self.status.state != "reconnecting":
            self.status.reconnects += 1
            self.status.attempt = 0
        self.status.attempt += 1
        self.status.last_error = exc.message
        self.status.state = "reconnecting"
        self.emit("reconnecting", reason=exc.message, attempt=self.status.attempt)

    def _back_online(self) -> None:
        self.status.attempt = 0
        self.status.state = "online"
        self.status.last_error = None
        self.emit("online")

    def leave(self) -> bool:
        """DELETE ourselves from the room with a short timeout; True when the hub confirmed it."""
        if self.left or not self.join_maybe_sent:
            return True
        self.status.state = "leaving"
        # Let an in-flight join/heartbeat land first, so our leave is not overtaken by it.
        got = self._in_flight.acquire(timeout=LEAVE_WAIT_INFLIGHT_S)
        try:
            self.client.leave(self.plan.code, self.plan.participant_id, timeout_s=LEAVE_TIMEOUT_S)
            confirmed = True
        except (ParticipantNotFound, RoomNotFound):
            confirmed = True  # nothing of ours is left on the hub
        except LlmroomError:
            confirmed = False
        finally:
            if got:
                self._in_flight.release()
        self.left = True
        self.status.state = "left"
        return confirmed


class Outcome:
    """How a run ended: `error` is None for a clean stop."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.confirmed: bool | None = None


class Lifecycle(Protocol):
    """What `run_session` drives: the v0.1 `Session` and the v0.6 `TunnelSession` alike."""

    stop: threading.Event
    joined: bool
    join_maybe_sent: bool

    def join(self) -> None: ...
    def heartbeat_loop(self) -> None: ...
    def leave(self) -> bool: ...
    def emit(self, event: str, **data: Any) -> None: ...


def run_session(
    session: Lifecycle,
    wake: threading.Event,
    on_started: Callable[[], None] | None = None,
    *,
    nothing_to_leave: tuple[type[BaseException], ...] = (RoomNotFound, InvalidPassword),
    on_nothing_to_leave: Callable[[], None] | None = None,
    thread_name: str = "llmroom-session",
) -> Outcome:
    """Run join + heartbeat loop in a worker thread; return when `wake` is set (a signal, or the worker
    ended). Then leave, if the join may have reached the hub. Never raises for hub trouble.

    A run that ends with one of `nothing_to_leave` (the hub refused the join, the room is gone, ...)
    sends no leave; `on_nothing_to_leave` then releases what the session still holds."""
    outcome = Outcome()

    def work() -> None:
        try:
            session.join()
            if session.joined and not session.stop.is_set():
                if on_started is not None:
                    on_started()
                session.heartbeat_loop()
        except BaseException as exc:  # handed to the main thread, which maps it to an exit code
            outcome.error = exc
        finally:
            wake.set()

    worker = threading.Thread(target=work, name=thread_name, daemon=True)
    worker.start()
    while not wake.wait(0.5):
        pass
    session.stop.set()
    # No join of the worker here: leave() itself waits (briefly) for a request in flight, which keeps
    # the worst case (a frozen hub) at LEAVE_WAIT_INFLIGHT_S + LEAVE_TIMEOUT_S, well inside 3 s.
    if isinstance(outcome.error, nothing_to_leave):
        if on_nothing_to_leave is not None:
            on_nothing_to_leave()
        return outcome
    if not session.join_maybe_sent:
        return outcome
    if outcome.error is not None and not session.joined:
        # Start-up failed (say, the hub timed out): the join may still have landed, so clean up,
        # quietly: the run's events are just the error.
        session.leave()
        return outcome
    outcome.confirmed = session.leave()
    session.emit("left", confirmed=outcome.confirmed)
    return outcome


class Interrupted(BaseException):
    """A signal arrived before anything was sent to the hub: unwind and exit 0, nothing to leave."""


@contextlib.contextmanager
def capture_signals(
    wake: threading.Event, on_second: Callable[[], None], interrupt: Callable[[], bool] | None = None
) -> Iterator[list[int]]:
    """SIGINT/SIGTERM/SIGHUP set `wake`; a second one calls `on_second` (exit at once). While
    `interrupt()` is true (start-up, before any request to the hub) a signal raises Interrupted
    instead, so a probe or a prompt in progress is abandoned at once. Handlers are restored
    afterwards. Yields the list of signals received."""
    received: list[int] = []
    names = ["SIGINT", "SIGTERM", "SIGHUP"]
    sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            on_second()
        wake.set()
        if interrupt is not None and interrupt():
            raise Interrupted()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in sigs:
            # `nohup llmroom join ...`: a hang-up the user asked to ignore stays ignored.
            if getattr(signal, "SIGHUP", None) == sig and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            previous[sig] = signal.signal(sig, handle)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
