"""Hermetic test environment: user dirs in tmp, no proxies, no colour, no terminal tricks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from llmroom_cli.hub import RunningHub

_SCRUBBED = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "LLMROOM_HUB",
    "LLMROOM_ENDPOINT",
    "LLMROOM_MODEL",
    "LLMROOM_NICKNAME",
    "LLMROOM_PASSWORD",
    "LLMROOM_HUB_API",
    "LLMROOM_API_KEY",
)


@pytest.fixture(autouse=True)
def _hermetic_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")


@pytest.fixture
def hub() -> Iterator[RunningHub]:
    """A real embedded hub on an ephemeral port, stopped after the test."""
    from llmroom_cli.hub import start_hub

    with start_hub(port=0, test_hooks=True) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_agent_left_behind() -> Iterator[None]:
    yield
    from tests.helpers import Agent

    Agent.kill_all()


@pytest.fixture(autouse=True)
def _no_process_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that fails before it stops the process it started must not leave it running: an agent
    left behind keeps retrying a hub that is gone for as long as the machine is up. Processes started
    by wider-scoped fixtures (set up before this one) are not tracked."""
    import subprocess

    started: list[subprocess.Popen[Any]] = []

    class Tracked(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Tracked)
    yield
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment for a CLI subprocess (the autouse fixture has already scrubbed os.environ)."""
    return dict(os.environ)
