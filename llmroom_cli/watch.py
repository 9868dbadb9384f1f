"""The agent watches the server it shares: pause the participant while the server is down (or, with
--pause-when-busy, while other processes use the GPU) and resume it when it is back. Never prints.

    watch = ServerWatch(session, ping=lambda: core.ping(timeout_s=1.0), interval_s=plan.interval_s,
                        pause_when_busy=True, server_pids=lambda: server_pids(plan.endpoint),
                        note=lambda text: err(f"note: {text}"), server="the local LLM server at ...")
    core.on_server_down = watch.server_down     # a relayed request could not connect: pause at once
    watch.start()                                # in on_started, once joined
    ...
    watch.close()                                # before the leave

Each interval (and once at start) it pings the server and, with pause_when_busy, reads the GPU
(gpu.GpuBusyMeter). Each check runs under a deadline in a helper thread: a check that hangs counts as
"server down" (ping) or "cannot tell" (GPU), and no second copy of it starts while it still hangs.
Transitions call `session.pause(reason, cause)` / `session.resume()`, which return at once; the server
being down wins over a busy GPU. Nothing here raises into the session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from llmroom_cli.gpu import BusyReading

# A check gets this share of the interval, at most CHECK_MAX_S: a local server that takes longer to
# answer GET /v1/models than that is, for the room, not serving. At least CHECK_MIN_S, though: with a
# short interval on a loaded machine a healthy server was taken for dead (a dead one refuses the
# connection at once, so short intervals still pause within one).
CHECK_SHARE = 0.8
CHECK_MAX_S = 2.0
CHECK_MIN_S = 1.0


class Pausable(Protocol):
    """What the watch drives: the v0.1 Session and the v0.6 TunnelSession alike."""

    def pause(self, reason: str, cause: str = "server_down") -> None: ...
    def resume(self) -> None: ...


class _Bounded:
    """Calls `fn` in a helper thread and waits at most `timeout_s`; `default` when it is late or
    raises. While a late call still runs, later calls return `default` without starting another."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self._running: threading.Thread | None = None

    def __call__(self, timeout_s: float, default: Any) -> Any:
        if self._running is not None and self._running.is_alive():
            return default
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(self.fn())
            except Exception:  # noqa: BLE001  (a broken check is a failed check, never a crash)
                pass

        thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._running = thread
        thread.start()
        thread.join(timeout_s)
        return box[0] if box else default


class ServerWatch:
    """Pauses `session` while the local server is down or (pause_when_busy) the GPU is busy.

    - `ping()`: True when the server answers (RelayCore.ping); False, an exception or a hang past
      the deadline is "down". One failed ping pauses, one good ping resumes: the room stops being sent
      requests within one interval, and gets the participant back within one interval.
    - `server_down()`: for RelayCore's `on_server_down`; quick and thread-safe: pauses at once.
    - `pause_when_busy`: also read the GPU each interval through `busy` (default: a
      gpu.GpuBusyMeter excluding `server_pids()`). Without a GPU (or when the server's processes
      cannot be found) it does nothing and says so once through `note`.
    """

    def __init__(
        self,
        session: Pausable,
        ping: Callable[[], bool],
        *,
        interval_s: float,
        pause_when_busy: bool = False,
        server_pids: Callable[[], Collection[int]] | None = None,
        busy: Callable[[], BusyReading] | None = None,
        note: Callable[[str], None] | None = None,
        server: str = "the local LLM server",
        check_timeout_s: float | None = None,
    ) -> None:
        self.session = session
        self.interval_s = interval_s
        self.pause_when_busy = pause_when_busy
        self.server = server
        self.check_timeout_s = check_timeout_s or max(min(CHECK_MAX_S, interval_s * CHECK_SHARE), CHECK_MIN_S)
        self._note = note
        self._noted: set[str] = set()
        self._ping = _Bounded(ping, "llmroom-watch-ping")
        self._server_pids = server_pids
        self._meter: Any = None
        if pause_when_busy and busy is None:
            from llmroom_cli.gpu import GpuBusyMeter

            self._meter = GpuBusyMeter(self._pids_or_unknown)
            busy = self._meter.check
        self._busy = _Bounded(busy, "llmroom-watch-gpu") if busy is not None else None
        self._lock = threading.Lock()
        self._down = False
        self._down_reports = 0  # server_down() calls so far: one during a ping outranks that ping
        self._gpu: BusyReading | None = None  # the last reading that said busy
        self._applied: tuple[str, str] | None = None  # (cause, reason) last sent to the session
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the three entry points -------------------------------------------------------------------

    def start(self) -> ServerWatch:
        """Check at once, then every interval, in a daemon thread, until close()."""
        self._thread = threading.Thread(target=self._loop, name="llmroom-watch", daemon=True)
        self._thread.start()
        return self

    def server_down(self) -> None:
        """A relayed request failed to connect to the server: pause now, not at the next interval."""
        with self._lock:
            self._down = True
            self._down_reports += 1
            self._apply()

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop checking (a check in flight is abandoned, not waited for beyond `timeout_s`)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._meter is not None:
            self._meter.close()

    # -- one round ----------------------------------------------------------------------------------

    def check_now(self) -> None:
        """One round of checks and the transition it implies (the thread calls it; so may tests)."""
        try:
            with self._lock:
                reports = self._down_reports
            up = self._ping(self.check_timeout_s, False) is True
            reading = self._read_gpu()
            with self._lock:
                # A relayed request that failed while this ping ran is newer news than the ping.
                self._down = not up or self._down_reports != reports
                if reading is not None and reading.busy is not None:
                    self._gpu = reading if reading.busy else None
                self._apply()
        except Exception as exc:  # noqa: BLE001  (the watch must never take the session down)
            self._say_once("watch-error", f"the server watch failed: {type(exc).__name__}: {exc}")

    def _read_gpu(self) -> BusyReading | None:
        if self._busy is None:
            return None
        reading: BusyReading | None = self._busy(self.check_timeout_s, None)
        if reading is None:
            self._say_once("gpu-late", "--pause-when-busy: reading the GPU took too long; not watched now")
            return None
        if reading.busy is None:
            # No GPU at all is said once for the run; a read error once per stretch of errors.
            key = "gpu-gone" if reading.final else "gpu-error"
            self._say_once(key, f"--pause-when-busy does nothing: {reading.reason}")
        else:
            self._noted.discard("gpu-error")
            self._noted.discard("gpu-late")
        return reading

    def _apply(self) -> None:
        """Called under the lock: tell the session when what it should be doing changed."""
        want: tuple[str, str] | None = None
        if self._down:
            want = ("server_down", f"{self.server} is not answering")
        elif self._gpu is not None:
            want = ("gpu_busy", f"the GPU is busy: {self._gpu.reason}")
        if want == self._applied or (want and self._applied and want[0] == self._applied[0]):
            return  # the same cause: a new utilisation figure is no news
        self._applied = want
        if want is None:
            self.session.resume()
        else:
            self.session.pause(want[1], want[0])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            if self._stop.wait(self.interval_s):
                return

    def _pids_or_unknown(self) -> Collection[int]:
        """The server's pids for the GPU meter; when they cannot be found the meter is not trusted
        (the server's own use would count as "other processes" and keep it paused for ever)."""
        pids = set(self._server_pids()) if self._server_pids is not None else set()
        if not pids:
            from llmroom_cli.gpu import BusyUnknown

            # Not for good: while the server restarts nothing listens on its port.
            raise BusyUnknown(
                "cannot tell which processes are the LLM server (not on this machine, or in a container)"
            )
        return pids

    def _say_once(self, key: str, text: str) -> None:
        if key in self._noted or self._note is None:
            return
        self._noted.add(key)
        try:
            self._note(text)
        except Exception:  # noqa: BLE001
            pass


def server_pids(endpoint: str) -> set[int]:
    """The pids of the process listening on `endpoint`'s port on this machine, and its children
    (Ollama's model runners, vLLM's workers hold the GPU, not the process that listens). Empty when
    the endpoint is not local or the listener cannot be seen (another user's process, a container)."""
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if host not in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "") and not host.startswith("127."):
        return set()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    import psutil  # type: ignore[import-untyped, unused-ignore]

    listeners: set[int] = set()
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                listeners.add(conn.pid)
    except (psutil.Error, OSError):
        return set()
    pids = set(listeners)
    for pid in listeners:
        try:
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except (psutil.Error, OSError):
            continue
    return pids
