"""LAN discovery through the CLI: `serve --mdns` in one process, `hubs`, `--hub auto`, LLMROOM_HUB=auto
and the fallback from an unanswering default hub, in others."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import WAIT_S, cli
from tests.test_discovery import _need_multicast


def _default_hub_answers() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 3000)) == 0


@pytest.fixture
def announced() -> Iterator[tuple[str, int]]:
    """`llmroom serve --port 0 --mdns` on loopback, until the test ends (then SIGINT, exit 0)."""
    _need_multicast("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", "serve", "--port", "0", "--mdns", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    url = ""
    try:
        for line in proc.stderr:
            if line.startswith("llmroom hub listening on "):
                url = line.split()[4]
            if line.startswith("announced as"):
                break
            if line.startswith("warning"):
                pytest.skip(f"multicast announce failed here: {line.strip()}")
        assert url, "serve did not say where it listens"
        yield url, int(url.rsplit(":", 1)[1])
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=WAIT_S)[1]
        assert proc.returncode == 0, rest
        assert "Traceback" not in rest


def test_hubs_json_finds_the_announced_hub(announced: tuple[str, int]) -> None:
    url, port = announced
    r = cli("hubs", "--json", "--timeout", "2")
    assert r.returncode == 0, r.stderr
    found = {h["port"]: h for h in json.loads(r.stdout)}
    mine = found[port]
    assert mine["name"] == f"gambiarra-hub-{port}"
    assert mine["url"] == url and mine["healthy"] is True
    assert mine["txt"] == {"version": "1.0", "protocol": "http"}
    assert {"name", "url", "host", "port", "addresses", "txt", "healthy"} <= set(mine)


def test_hub_auto_and_env_auto_use_the_discovered_hub(announced: tuple[str, int]) -> None:
    url, _ = announced
    created = cli("create", "found me", "--hub", "auto")
    assert created.returncode == 0, created.stderr
    assert url in created.stderr
    env = dict(os.environ, LLMROOM_HUB="auto")
    listed = cli("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "found me" in listed.stdout


def test_list_without_hub_falls_back_to_discovery(announced: tuple[str, int]) -> None:
    if _default_hub_answers():
        pytest.skip("something answers on localhost:3000 here, so no fallback would happen")
    url, _ = announced
    r = cli("list")
    assert r.returncode == 0, r.stderr
    assert "looking for one on the local network" in r.stderr and url in r.stderr


def test_no_hub_anywhere_is_exit_5() -> None:
    _need_multicast("127.0.0.1")
    r = cli("hubs", "--timeout", "0.5")
    if r.returncode == 0:
        pytest.skip("some hub is announced on this network")
    assert r.returncode == 5 and "no hub found" in r.stderr
    auto = cli("list", "--hub", "auto")
    assert auto.returncode == 5 and len(auto.stderr.strip().splitlines()) == 1


def test_join_without_hub_falls_back_to_discovery(announced: tuple[str, int]) -> None:
    if _default_hub_answers():
        pytest.skip("something answers on localhost:3000 here, so no fallback would happen")
    from llmroom_cli.standin import StandIn
    from tests.helpers import Agent

    url, _ = announced
    code = cli("create", "lan party", "--hub", url).stdout.strip()
    with StandIn() as llm:
        a = Agent(code, "-e", llm.url, "--json", "--interval", "0.05")
        joined = a.wait_event("joined")
        a.signal()
        assert a.finish() == 0
    assert joined["hub"] == url
    assert "looking for one on the local network" in a.stderr
