"""The participant lifecycle: join -> heartbeat on a drift-free schedule -> leave. Never prints.

The lifecycle runs in one worker thread while the main thread waits on an Event, so a signal (which
only sets that Event) is answered at once, even while a request to a frozen hub is in flight.
Everything the session does is reported as event dicts to an `emit` callback, which the CLI renders.

Pausing (the local server died, or the owner's GPU is busy: see watch.py): `pause(reason, cause)` and
`resume()` may be called from any thread; they only record what is wanted and wake the lifecycle
thread, which does the requests. Events: `paused` (`reason`, `cause`: server_down | gpu_busy) when the
participant stops being served, `resumed` (`id`) when the room has it back under the same id.
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

    def joined_event(self, participant: Any) -> dict[str, Any]:
        """The fields of the `joined` event (both generations): the plan, with the specs as the hub
        stored them (`participant` is the hub's answer; the plan's own when it says none)."""
        specs = participant.get("specs", self.specs) if isinstance(participant, dict) else None
        return {
            "room": self.code,
            "hub": self.hub_url,
            "id": self.participant_id,
            "nickname": self.nickname,
            "model": self.model,
            "endpoint": self.endpoint,
            "specs": specs,
        }


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

    state: str = "starting"  # starting | online | reconnecting | paused | leaving | left | error
    joined_at: float | None = None
    last_beat_at: float | None = None
    last_rtt_ms: float | None = None
    beats: int = 0
    reconnects: int = 0  # stretches of trouble (not failed attempts)
    attempt: int = 0  # failed attempts in the current stretch
    rejoins: int = 0
    last_error: str | None = None
    paused: str | None = None  # the reason, while paused (state is "paused", or "reconnecting" meanwhile)
    pause_cause: str | None = None  # server_down | gpu_busy, while paused
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))


@dataclass(frozen=True)
class Pause:
    """What `pause()` asked for: the words for people and the cause for scripts."""

    reason: str
    cause: str = "server_down"  # server_down | gpu_busy


class _Wakeable(threading.Event):
    """A session's stop Event: setting it also wakes the lifecycle thread's wait (and sets the
    caller's own Event, when one was given, so both stay in step)."""

    def __init__(self, wake: threading.Event, linked: threading.Event | None = None) -> None:
        super().__init__()
        self._wake = wake
        self._linked = linked

    def set(self) -> None:
        super().set()
        self._wake.set()
        if self._linked is not None:
            self._linked.set()


def link_stop(stop: threading.Event | None, wake: threading.Event, thread_name: str) -> threading.Event:
    """The stop Event a session uses: setting it wakes `wake`. A caller's own Event (Session(stop=...))
    still stops the session when the caller sets it: a small watcher notices (it ends with the
    session), since a plain Event cannot wake a wait on another one."""
    own = _Wakeable(wake, stop)
    if stop is not None:

        def watch() -> None:
            while not own.is_set():
                if stop.wait(0.5):
                    own.set()
                    return

        threading.Thread(target=watch, name=thread_name, daemon=True).start()
    return own


def _now_ms() -> int:
    return int(time.time() * 1000)


def never_reached_the_hub(exc: BaseException) -> bool:
    """True when a failed hub call cannot have been delivered: the connection itself failed (refused,
    no route, TLS handshake, connect timeout), so the hub saw no request. A timeout after the
    connection was made is not this: the request may have landed."""
    import httpx  # loaded already: the exception came from it

    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short (ours -> httpx's -> httpcore's); never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, (httpx.ConnectError, httpx.ConnectTimeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        self._wake = threading.Event()
        self.stop: threading.Event = link_stop(stop, self._wake, "llmroom-stop-watch")
        self.clock = clock
        self.startup_retry_s = startup_retry_s
        # Told once, with the reason and the seconds left, when start-up begins retrying the hub.
        self.on_retry = on_retry
        self.status = Status()
        self.join_maybe_sent = False
        # False while every join attempt failed before reaching the hub (connection refused): then
        # a stop during the start-up retry has nothing to leave and nothing to warn about.
        self.join_may_have_landed = False
        self.joined = False
        self.left = False
        self._in_flight = threading.Lock()
        # Every request is shorter than the interval, so the hub sees an attempt each interval.
        self.request_timeout_s = max(min(5.0, plan.interval_s * 0.8), 0.005)
        # Pause state. `_want` is written by pause()/resume() (any thread, under `_pause_lock`); the
        # rest only by the lifecycle thread, which applies `_want` at its next wake-up.
        self._pause_lock = threading.Lock()
        self._want: Pause | None = None
        self._pause: Pause | None = None
        self._leave_pending = False  # paused, but the hub has not confirmed our DELETE yet
        self._resume_pending = False  # resumed, but the hub has not taken our join yet
        self._absent = False  # the hub confirmed the pause's DELETE: nothing of ours is on it

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
                    if self.stop.is_set():
                        return  # stopped meanwhile: send nothing more (leave() reads the flags next)
                    self.join_maybe_sent = True
                    landed_before, self.join_may_have_landed = self.join_may_have_landed, True
                    try:
                        data = self.client.join(
                            self.plan.code, self.plan.body(), timeout_s=self._join_timeout()
                        )
                    except HubUnavailable as exc:
                        if never_reached_the_hub(exc):
                            self.join_may_have_landed = landed_before
                        raise
                    # Under the lock: a leave() waiting for this request then knows it was joined.
                    self.joined = True
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
        self.status.state = "online"
        self.status.joined_at = self.clock()
        self.emit("joined", **self.plan.joined_event(data.get("participant", {})))

    def _join_timeout(self) -> float:
        return max(self.request_timeout_s, 2.0) if not self.joined else self.request_timeout_s

    def heartbeat_loop(self) -> None:
        """Beat on schedule until stopped, applying pause()/resume() as soon as they come; raises
        RoomNotFound (exit 3) or InvalidPassword."""
        assert self.status.joined_at is not None
        schedule = Schedule(self.status.joined_at, self.plan.interval_s)
        deadline = schedule.next_deadline(self.clock())
        while not self.stop.is_set():
            self._apply_pause()
            self._wake.wait(max(0.0, deadline - self.clock()))
            # Cleared before the flags are read: a pause() after this line wakes the next wait.
            self._wake.clear()
            if self.stop.is_set():
                return
            if self._pause_wanted_changed():
                continue
            if self.clock() >= deadline:
                self._tick()
                deadline = schedule.next_deadline(self.clock())

    def _tick(self) -> None:
        """One interval's work: a heartbeat; while paused none (we are not in the room), only a
        DELETE the hub has not confirmed yet; after a resume, the join until the hub takes it."""
        if self._pause is not None:
            if self._leave_pending:
                self._pause_leave()
            return
        if self._resume_pending:
            self._resume_join()
            return
        self.beat()

    # -- pause / resume -----------------------------------------------------------------------------

    def pause(self, reason: str, cause: str = "server_down") -> None:
        """Stop being served (thread-safe, returns at once). On a v0.1 hub the only honest signal is to
        leave: the hub connects to our endpoint itself and knows no "not serving" state, so the
        lifecycle thread DELETEs the participant (the room stops routing to it at once) and sends no
        heartbeat while paused, so nothing re-joins it, a hub outage included. Calling it again
        while paused only updates the reason."""
        with self._pause_lock:
            self._want = Pause(reason, cause)
        self._wake.set()

    def resume(self) -> None:
        """Be served again (thread-safe, returns at once): the lifecycle thread joins again with the
        same id and body, retrying each interval until the hub takes it."""
        with self._pause_lock:
            self._want = None
        self._wake.set()

    @property
    def paused(self) -> bool:
        """True from the moment pause() is applied until resume() is."""
        return self._pause is not None

    def _pause_wanted_changed(self) -> bool:
        with self._pause_lock:
            return self._want != self._pause

    def _apply_pause(self) -> None:
        with self._pause_lock:
            want = self._want
        if want == self._pause:
            return
        if want is not None:
            first = self._pause is None
            self._pause = want
            self.status.paused, self.status.pause_cause = want.reason, want.cause
            if first:
                self._resume_pending = False
                self._leave_pending = True
                self._pause_leave(announce=True)
            else:  # a new reason (say the GPU got busy while the server was down): say it
                self.emit("paused", reason=want.reason, cause=want.cause)
            return
        self._pause = None
        self.status.paused = self.status.pause_cause = None
        self._leave_pending = False
        self._resume_pending = True
        self._resume_join()

    def _pause_leave(self, announce: bool = False) -> None:
        """The DELETE of a pause; a failure is hub trouble, retried each interval while paused."""
        pause = self._pause
        assert pause is not None
        error: LlmroomError | None = None
        try:
            with self._in_flight:
                self.client.leave(self.plan.code, self.plan.participant_id, timeout_s=self.request_timeout_s)
        except (ParticipantNotFound, RoomNotFound):
            pass  # nothing of ours is on the hub: that is what a pause wants
        except LlmroomError as exc:
            error = exc
        if error is None:
            self._leave_pending = False
            self._absent = True
        if announce or (error is None and self.status.state == "reconnecting"):
            # "paused" also ends a stretch of hub trouble during the pause: the state is paused again.
            self.status.state = "paused"
            self.status.attempt = 0
            self.status.last_error = None
            self.emit("paused", reason=pause.reason, cause=pause.cause)
        if error is not None:
            self._trouble(
                HubUnavailable(f"paused, but the hub did not confirm the leave yet: {error.message}")
            )

    def _resume_join(self) -> None:
        try:
            with self._in_flight:
                self._absent = False
                self.client.join(self.plan.code, self.plan.body(), timeout_s=self.request_timeout_s)
        except (HubUnavailable, HubRejected) as exc:
            self._trouble(exc)
            return
        except InvalidPassword:
            self._trouble(
                HubUnavailable(f"the hub at {self.plan.hub_url} refused the join: invalid password")
            )
            return
        self._resume_pending = False
        self.status.beats += 1
        self.status.last_beat_at = self.clock()
        self.status.attempt = 0
        self.status.last_error = None
        self.status.state = "online"
        self.emit("resumed", id=self.plan.participant_id)

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
            if got and not self.join_may_have_landed:
                # Every join attempt was refused at the connection (the hub is down): nothing of
                # ours can be on it. Read under the lock: an attempt that got out has set it.
                self.left = True
                self.status.state = "left"
                return True
            if got and self._absent:
                # Paused, and the hub confirmed that DELETE already: nothing of ours is on it, so a
                # hub that is down by now cannot make this leave "unconfirmed".
                raise ParticipantNotFound("already left while paused", 404)
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
    """How a run ended, decided here so the CLI only reads it (issue 14 item 10):

    - `error`: None for a stop by signal (or `wake`), else what ended the run;
    - `joined`: the hub confirmed the join at some point;
    - `stopped_before_joining`: a stop (no error) before any join was confirmed, say Ctrl-C during the
      start-up retry against a hub that is down: there is no "left" event and no leave warning;
    - `confirmed`: for a joined run, whether the hub confirmed the leave (None: no leave was sent);
    - `reached_hub`: a join attempt may have reached the hub (False: every one was refused at the
      connection, the hub is down);
    - `left_behind`: not joined, but a join attempt may have reached the hub (it timed out) and the
      clean-up DELETE was not confirmed either: the hub may list us, so the CLI gives the command.
    """

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.confirmed: bool | None = None
        self.joined = False
        self.reached_hub = False
        self.left_behind = False

    @property
    def stopped_before_joining(self) -> bool:
        return self.error is None and not self.joined


class Lifecycle(Protocol):
    """What `run_session` drives: the v0.1 `Session` and the v0.6 `TunnelSession` alike."""

    stop: threading.Event
    joined: bool
    join_maybe_sent: bool
    join_may_have_landed: bool

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
    confirmed = session.leave()  # waits for a join in flight first, so `joined` is settled after it
    outcome.joined = session.joined
    outcome.reached_hub = session.join_may_have_landed
    if not session.joined:
        # Start-up failed or was stopped before the hub confirmed the join. When every attempt was
        # refused at the connection, nothing reached the hub and leave() sent nothing. Otherwise (a
        # timeout) the join may still have landed and leave() took it back, quietly: the run's
        # events are just the error, or nothing.
        outcome.left_behind = not confirmed
        return outcome
    outcome.confirmed = confirmed
    session.emit("left", confirmed=confirmed)
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
