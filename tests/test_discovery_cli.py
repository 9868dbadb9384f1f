"""LAN discovery through the CLI: `serve --mdns` in one process, `hubs`, `--hub auto`, LLMROOM_HUB=auto
and the fallback from an unanswering default hub, in others.

They run in a network namespace of their own where they can (tests/netns_helpers.py): no other hub
announced on the machine or the LAN can change what they see. Elsewhere they share the network, and
skip (saying why) when another hub is announced or localhost:3000 answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.helpers import WAIT_S, Agent, cli
from tests.netns_helpers import own_network, standin_in
from tests.test_discovery import _need_multicast


@pytest.fixture
def net() -> Iterator[list[str] | None]:
    """The command prefix of our own network namespace, or None: the shared network."""
    with own_network() as prefix:
        if prefix is None:
            _need_multicast("127.0.0.1")
        yield prefix


def _default_hub_answers() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 3000)) == 0


def _alone(net: list[str] | None, port: int | None = None, default_hub_too: bool = False) -> None:
    """On the shared network, skip unless ours (port) is the only hub announced."""
    if net is not None:
        return
    r = cli("hubs", "--json", "--timeout", "1.5")
    others = [h for h in (json.loads(r.stdout) if r.stdout.strip() else []) if h["port"] != port]
    if others:
        pytest.skip(f"other hubs are announced on this network: {[h['url'] for h in others]}")
    if default_hub_too and _default_hub_answers():
        pytest.skip("something answers on localhost:3000 here, so no fallback would happen")


@pytest.fixture
def announced(net: list[str] | None) -> Iterator[tuple[str, int]]:
    """`llmroom serve --port 0 --mdns` on loopback, until the test ends (then SIGINT, exit 0)."""
    proc = subprocess.Popen(
        [*(net or []), sys.executable, "-m", "llmroom_cli", "serve", "--port", "0", "--mdns", "--quiet"],
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


def test_hubs_json_finds_the_announced_hub(announced: tuple[str, int], net: list[str] | None) -> None:
    url, port = announced
    r = cli("hubs", "--json", "--timeout", "2", prefix=net)
    assert r.returncode == 0, r.stderr
    found = {h["port"]: h for h in json.loads(r.stdout)}
    mine = found[port]
    assert mine["name"] == f"gambiarra-hub-{port}"
    assert mine["url"] == url and mine["healthy"] is True
    assert mine["txt"] == {"version": "1.0", "protocol": "http"}
    assert {"name", "url", "host", "port", "addresses", "txt", "healthy"} <= set(mine)


def test_hub_auto_and_env_auto_use_the_discovered_hub(
    announced: tuple[str, int], net: list[str] | None
) -> None:
    url, port = announced
    _alone(net, port)
    created = cli("create", "found me", "--hub", "auto", prefix=net)
    assert created.returncode == 0, created.stderr
    assert url in created.stderr
    env = dict(os.environ, LLMROOM_HUB="auto")
    listed = cli("list", env=env, prefix=net)
    assert listed.returncode == 0, listed.stderr
    assert "found me" in listed.stdout


def test_list_without_hub_falls_back_to_discovery(announced: tuple[str, int], net: list[str] | None) -> None:
    url, port = announced
    _alone(net, port, default_hub_too=True)
    r = cli("list", prefix=net)
    assert r.returncode == 0, r.stderr
    assert "looking for one on the local network" in r.stderr and url in r.stderr


def test_create_and_doctor_fall_back_the_same_way_and_suggest_llmroom_hub(
    announced: tuple[str, int], net: list[str] | None
) -> None:
    url, port = announced
    _alone(net, port, default_hub_too=True)
    created = cli("create", "fallback room", prefix=net)
    assert created.returncode == 0, created.stderr
    assert "looking for one on the local network" in created.stderr
    assert f"export LLMROOM_HUB={url}" in created.stderr
    doctor = cli("doctor", "--json", "-e", "http://127.0.0.1:9", prefix=net)
    report = json.loads(doctor.stdout)
    assert report["hub"]["url"] == url and report["hub"]["reachable"] is True, doctor.stderr
    assert f"export LLMROOM_HUB={url}" in doctor.stderr


def test_no_hub_anywhere_is_exit_5(net: list[str] | None) -> None:
    _alone(net)
    r = cli("hubs", "--timeout", "0.5", prefix=net)
    assert r.returncode == 5 and "no hub found" in r.stderr
    auto = cli("list", "--hub", "auto", prefix=net)
    assert auto.returncode == 5 and len(auto.stderr.strip().splitlines()) == 1


def test_join_without_hub_falls_back_to_discovery(announced: tuple[str, int], net: list[str] | None) -> None:
    url, port = announced
    _alone(net, port, default_hub_too=True)
    code = cli("create", "lan party", "--hub", url, prefix=net).stdout.strip()
    with standin_in(net) as llm:
        a = Agent(code, "-e", llm, "--json", "--interval", "0.05", prefix=net)
        joined = a.wait_event("joined")
        a.signal()
        assert a.finish() == 0
    assert joined["hub"] == url
    assert "looking for one on the local network" in a.stderr


def test_the_password_never_goes_to_a_hub_nobody_named(
    announced: tuple[str, int], net: list[str] | None
) -> None:
    url, port = announced
    _alone(net, port, default_hub_too=True)
    made = cli("create", "secret", "--hub", url, "--password-stdin", input="hunter22\n", prefix=net)
    code = made.stdout.strip()
    assert made.returncode == 0 and code, made.stderr
    env = dict(os.environ, LLMROOM_PASSWORD="hunter22")
    with standin_in(net) as llm:
        # The implicit fallback: no --hub. Not on a terminal, so nobody can be asked: not sent.
        a = Agent(code, "-e", llm, "--json", "--interval", "0.05", env=env, prefix=net)
        assert a.finish() == 4
        assert "not sending the room password to hub" in a.stderr and url in a.stderr
        assert "hunter22" not in a.stderr + "".join(a.raw)
        # An open room on the same hub is joined all the same.
        open_code = cli("create", "open", "--hub", url, prefix=net).stdout.strip()
        b = Agent(open_code, "-e", llm, "--json", "--interval", "0.05", env=env, prefix=net)
        b.wait_event("joined")
        b.signal()
        assert b.finish() == 0
        # --hub auto is the user's explicit choice: the password is sent.
        c = Agent(code, "--hub", "auto", "-e", llm, "--json", "--interval", "0.05", env=env, prefix=net)
        assert c.wait_event("joined")["hub"] == url
        c.signal()
        assert c.finish() == 0
