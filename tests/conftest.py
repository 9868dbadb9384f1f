"""Hermetic test environment: user dirs in tmp, no proxies, no colour, no terminal tricks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment for a CLI subprocess (the autouse fixture has already scrubbed os.environ)."""
    return dict(os.environ)
