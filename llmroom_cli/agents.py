"""State files of the agents running on this machine, read by `llmroom status`.

Each running `join` keeps one JSON file under `$XDG_STATE_HOME/llmroom/agents/` (default
`~/.local/state/llmroom/agents/`), named by its pid. It is written atomically (temp file + rename, so a
reader never sees half a file), at most once a second unless forced, and removed when the agent exits.
A file whose pid is no longer alive is stale: `list_agents` ignores and removes it.
Stdlib only: `llmroom status` must stay cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Writes closer together than this are coalesced (the panel may change many times a second).
MIN_WRITE_INTERVAL_S = 1.0
#: Bound on what we read from a state file: they are small; a huge one is not ours.
MAX_STATE_BYTES = 64 * 1024


def state_dir(env: dict[str, str] | None = None) -> Path:
    """The directory holding the agents' state files (not created here)."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local" / "state")
    return Path(base) / "llmroom" / "agents"


@dataclass
class AgentState:
    """What `llmroom status` shows about one agent."""

    pid: int
    room: str
    hub: str
    state: str
    started_at: float
    participant_id: str = ""
    requests_served: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def uptime_s(self, now: float | None = None) -> float:
        """Seconds since the agent started (never negative)."""
        return max(0.0, (time.time() if now is None else now) - self.started_at)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class StateFile:
    """One agent's state file: `update` writes (rate-limited), `remove` deletes it on exit."""

    def __init__(
        self,
        state: AgentState,
        directory: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.directory = directory if directory is not None else state_dir()
        self.path = self.directory / f"{state.pid}.json"
        self._clock = clock
        self._last_write: float | None = None
        self._dirty = False

    def update(self, *, force: bool = False, **changes: Any) -> bool:
        """Apply `changes` to the state and write it unless a write happened under a second ago.

        Returns True when the file was written. A skipped write is kept dirty and goes out with the
        next `update` or `flush`.
        """
        for name, value in changes.items():
            setattr(self.state, name, value)
        self._dirty = True
        now = self._clock()
        if not force and self._last_write is not None and now - self._last_write < MIN_WRITE_INTERVAL_S:
            return False
        self._write(now)
        return True

    def flush(self) -> None:
        """Write a pending change now."""
        if self._dirty:
            self._write(self._clock())

    def _write(self, now: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(asdict(self.state), fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last_write = now
        self._dirty = False

    def remove(self) -> None:
        """Delete the file (the agent is exiting); a file that cannot be deleted is stale soon anyway."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def _parse(data: Any) -> AgentState | None:
    if not isinstance(data, dict):
        return None
    extra = data.get("extra")
    try:
        return AgentState(
            pid=int(data["pid"]),
            room=str(data["room"]),
            hub=str(data["hub"]),
            state=str(data["state"]),
            started_at=float(data["started_at"]),
            participant_id=str(data.get("participant_id", "")),
            requests_served=int(data.get("requests_served", 0)),
            last_error=None if data.get("last_error") is None else str(data["last_error"]),
            extra=extra if isinstance(extra, dict) else {},
        )
    except (KeyError, TypeError, ValueError):
        return None


def list_agents(
    directory: Path | None = None, is_alive: Callable[[int], bool] = _pid_alive
) -> list[AgentState]:
    """The live agents, sorted by start time; stale (dead pid) files are removed, junk is skipped."""
    directory = directory if directory is not None else state_dir()
    if not directory.is_dir():
        return []
    agents: list[AgentState] = []
    for path in sorted(directory.glob("*.json")):
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_STATE_BYTES + 1)
        except OSError:
            continue
        if len(raw) > MAX_STATE_BYTES:
            continue
        try:
            agent = _parse(json.loads(raw))
        except ValueError:
            continue
        if agent is None:
            continue
        if not is_alive(agent.pid):
            path.unlink(missing_ok=True)
            continue
        agents.append(agent)
    agents.sort(key=lambda a: a.started_at)
    return agents
