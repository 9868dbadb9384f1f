"""watch.ServerWatch with fakes: a scripted ping, a scripted GPU reading and a session that records
pause/resume. Rounds are run with check_now() (no timers) except where the thread itself is tested."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from llmroom_cli.gpu import BusyReading
from llmroom_cli.watch import ServerWatch, server_pids
from tests.helpers import WAIT_S


class FakeSession:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.changed = threading.Event()

    def pause(self, reason: str, cause: str = "server_down") -> None:
        self.calls.append(("pause", cause, reason))
        self.changed.set()

    def resume(self) -> None:
        self.calls.append(("resume",))
        self.changed.set()

    def kinds(self) -> list[str]:
        return [c[0] if c[0] == "resume" else f"pause:{c[1]}" for c in self.calls]


class Script:
    """Returns the next scripted value at each call (the last one forever)."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        if isinstance(value, Exception):
            raise value
        return value


def busy(reason: str = "other processes use the GPU: 60% utilisation, 3.0 GiB (pid 4242)") -> BusyReading:
    return BusyReading(True, reason)


FREE = BusyReading(False, "other processes use the GPU: 0% utilisation, 0.0 GiB")


def watch(ping: Callable[[], bool], **kw: Any) -> tuple[ServerWatch, FakeSession, list[str]]:
    session = FakeSession()
    notes: list[str] = []
    w = ServerWatch(session, ping, interval_s=0.05, note=notes.append, server="the server at :11434", **kw)
    return w, session, notes


def test_down_pauses_once_and_up_resumes_once() -> None:
    w, session, _ = watch(Script(True, False, False, False, True, True))
    for _ in range(6):
        w.check_now()
    assert session.kinds() == ["pause:server_down", "resume"]
    assert session.calls[0][2] == "the server at :11434 is not answering"


def test_a_ping_that_raises_counts_as_down() -> None:
    w, session, _ = watch(Script(OSError("boom")))
    w.check_now()
    assert session.kinds() == ["pause:server_down"]


def test_a_ping_that_hangs_counts_as_down_and_is_not_started_twice() -> None:
    release = threading.Event()
    started: list[int] = []

    def hanging() -> bool:
        started.append(1)
        release.wait(WAIT_S)
        return True

    w, session, _ = watch(hanging, check_timeout_s=0.02)
    try:
        w.check_now()
        w.check_now()
        assert session.kinds() == ["pause:server_down"]
        assert len(started) == 1  # the second round did not pile another hung ping on the first
    finally:
        release.set()


def test_server_down_from_the_relay_pauses_at_once_and_the_next_good_ping_resumes() -> None:
    w, session, _ = watch(Script(True))
    w.check_now()
    w.server_down()
    w.server_down()  # a burst of failed requests is one pause
    assert session.kinds() == ["pause:server_down"]
    w.check_now()
    assert session.kinds() == ["pause:server_down", "resume"]


def test_gpu_busy_pauses_free_resumes_and_new_figures_are_no_news() -> None:
    readings = Script(FREE, busy(), busy("other processes use the GPU: 80% utilisation"), FREE)
    w, session, _ = watch(Script(True), pause_when_busy=True, busy=readings)
    for _ in range(4):
        w.check_now()
    assert session.kinds() == ["pause:gpu_busy", "resume"]
    assert "the GPU is busy: other processes use the GPU: 60%" in session.calls[0][2]


def test_server_down_wins_over_a_busy_gpu_and_the_cause_is_updated() -> None:
    w, session, _ = watch(Script(True, False, True, True), pause_when_busy=True, busy=Script(busy()))
    w.check_now()  # busy GPU
    w.check_now()  # server down too
    w.check_now()  # server back, GPU still busy
    assert session.kinds() == ["pause:gpu_busy", "pause:server_down", "pause:gpu_busy"]


def test_without_pause_when_busy_the_gpu_is_never_read() -> None:
    readings = Script(busy())
    w, session, _ = watch(Script(True), busy=None)
    w.check_now()
    assert readings.calls == 0 and session.calls == []


def test_no_gpu_does_nothing_and_says_so_once() -> None:
    gone = BusyReading(None, "no NVIDIA GPU to watch (NVML: NVMLError_LibraryNotFound)", final=True)
    w, session, notes = watch(Script(True), pause_when_busy=True, busy=Script(gone))
    for _ in range(5):
        w.check_now()
    assert session.calls == []
    assert notes == [
        "--pause-when-busy does nothing: no NVIDIA GPU to watch (NVML: NVMLError_LibraryNotFound)"
    ]


def test_an_nvml_error_keeps_the_state_and_is_said_once_per_stretch() -> None:
    error = BusyReading(None, "the GPU could not be read (NVMLError_Unknown: Unknown Error)")
    readings = Script(busy(), error, error, busy(), error, FREE)
    w, session, notes = watch(Script(True), pause_when_busy=True, busy=readings)
    for _ in range(6):
        w.check_now()
    # The errors changed nothing: paused while busy, still paused through the errors, free resumes.
    assert session.kinds() == ["pause:gpu_busy", "resume"]
    assert len(notes) == 2 and all("could not be read" in n for n in notes)


def test_the_thread_checks_every_interval_and_close_stops_it() -> None:
    ping = Script(True, True, False)
    w, session, _ = watch(ping)
    w.start()
    try:
        assert session.changed.wait(WAIT_S)  # the third round (two intervals in) paused
        assert session.kinds() == ["pause:server_down"]
    finally:
        w.close()
    calls = ping.calls
    time.sleep(w.interval_s * 3)
    assert ping.calls == calls  # closed: no more checks


def test_a_broken_session_never_raises_out_of_the_watch() -> None:
    class Broken(FakeSession):
        def pause(self, reason: str, cause: str = "server_down") -> None:
            raise RuntimeError("session bug")

    notes: list[str] = []
    w = ServerWatch(Broken(), Script(False), interval_s=0.05, note=notes.append)
    w.check_now()
    w.check_now()
    assert len(notes) == 1 and "session bug" in notes[0]


def test_unknown_server_pids_mean_no_gpu_verdict_not_a_permanent_pause() -> None:
    from tests import fakes_nvml

    nvml = fakes_nvml.one_h200()
    nvml.devices[0]["compute"] = [{"pid": 4242, "used": 20 * 2**30}]  # the server itself, say
    w, session, notes = watch(Script(True), pause_when_busy=True, server_pids=lambda: set())
    w._meter._nvml = nvml  # the real meter, on the fake NVML
    w.check_now()
    assert session.calls == []
    assert notes and "cannot tell which processes are the LLM server" in notes[0]
    w.close()


def test_server_pids_finds_the_listener_of_a_local_port_and_nothing_for_a_remote_one() -> None:
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        try:
            found = server_pids(f"http://127.0.0.1:{port}")
        except Exception as exc:  # psutil.AccessDenied on a platform that hides sockets
            pytest.skip(f"this platform does not show listening sockets: {exc!r}")
        assert os.getpid() in found
    assert server_pids("http://192.0.2.1:11434") == set()


def test_a_failure_reported_while_a_ping_runs_outranks_that_ping() -> None:
    holder: list[ServerWatch] = []

    def ping_that_races() -> bool:
        holder[0].server_down()  # a relayed request fails while this (good) ping is in flight
        return True

    w, session, _ = watch(ping_that_races)
    holder.append(w)
    w.check_now()
    assert session.kinds() == ["pause:server_down"]  # not paused then resumed by the stale ping
