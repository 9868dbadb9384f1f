"""`join` with the finished extras wired in, as a real process (issue 14 items 2, 6, 8, 12, 14-16):
the config file's defaults under flags and env, config typos warned, --share/--bench checks, a
--bench that fails, `demo --port` and its next step, and the help text.

`--dry-run` is how most of these look at what join would send: it asks only the local server.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmroom_cli.hub import RunningHub
from llmroom_cli.standin import StandIn
from tests.fake_llm_servers import FakeLLMServer
from tests.helpers import Agent, cli, wait_for

DOWN_HUB = "http://127.0.0.1:1"  # nothing listens: a dry run never notices


@pytest.fixture
def llm() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


def _config_file(tmp_path: Path, text: str) -> dict[str, str]:
    """An environment whose XDG_CONFIG_HOME holds `text` as llmroom's config.toml."""
    home = tmp_path / "xdg"
    (home / "llmroom").mkdir(parents=True)
    (home / "llmroom" / "config.toml").write_text(text)
    return dict(os.environ, XDG_CONFIG_HOME=str(home))


def _bodies(stdout: str) -> list[dict[str, Any]]:
    return [q["body"] for q in json.loads(stdout)["requests"]]


def test_the_config_file_gives_endpoint_nickname_and_model(tmp_path: Path, llm: StandIn) -> None:
    env = _config_file(tmp_path, f'endpoint = "{llm.url}"\nnickname = "from-file"\nmodel = "llmroom-demo"\n')
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "using the" not in r.stderr  # the config file named the server: no search
    assert json.loads(r.stdout)["shares"] == llm.url
    for body in _bodies(r.stdout):
        assert body["nickname"] == "from-file"
        assert body["model"].startswith("llmroom-demo")


def test_flags_and_env_win_over_the_config_file(tmp_path: Path, llm: StandIn) -> None:
    env = _config_file(tmp_path, 'endpoint = "http://127.0.0.1:1"\nnickname = "from-file"\n')
    env["LLMROOM_NICKNAME"] = "from-env"
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "--dry-run", "-e", llm.url, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shares"] == llm.url
    assert all(b["nickname"] == "from-env" for b in _bodies(r.stdout))
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "--dry-run", "-e", llm.url, "-n", "from-flag", env=env)
    assert all(b["nickname"] == "from-flag" for b in _bodies(r.stdout))


def test_the_config_files_hub_is_joined(tmp_path: Path, hub: RunningHub, llm: StandIn) -> None:
    room: str = hub.state.create_room("cfg")["code"]
    env = _config_file(tmp_path, f'hub = "{hub.url}"\nendpoint = "{llm.url}"\nnickname = "cfg-nick"\n')
    a = Agent(room, "--json", "--interval", "0.05", env=env)
    joined = a.wait_event("joined")
    assert joined["hub"] == hub.url
    (p,) = wait_for(lambda: hub.state.participants(room), "the participant")
    assert p["nickname"] == "cfg-nick"
    a.signal()
    assert a.finish() == 0, a.stderr


def test_a_config_typo_warns_with_the_closest_key_and_is_still_sent(llm: StandIn) -> None:
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "-e", llm.url, "--dry-run", "-c", "temprature=0.7")
    assert r.returncode == 0, r.stderr
    assert "warning: unknown config key 'temprature' (did you mean temperature?)" in r.stderr
    assert all(b["config"]["temprature"] == 0.7 for b in _bodies(r.stdout))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--no-specs", "--share", "gpu"), "--no-specs sends no specs"),
        (("--no-specs", "--bench"), "--no-specs sends no specs"),
        (("--bench", "--share", "gpu,ram"), "add llm to --share"),
        (("--share", ","), "--share needs at least one field"),
    ],
)
def test_share_and_bench_combinations_that_cannot_work_are_exit_2(
    llm: StandIn, args: tuple[str, ...], expected: str
) -> None:
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "-e", llm.url, *args)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_a_failing_bench_is_a_warning_and_the_join_goes_on() -> None:
    # This fake Ollama lists models but has no chat route (404): the measurement fails.
    with FakeLLMServer("ollama") as server:
        r = cli(
            "join", "ABC123", "--hub", DOWN_HUB, "-e", server.url, "-m", "llama3.2:latest", "--dry-run",
            "--bench",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning: --bench:" in r.stderr
    for body in _bodies(r.stdout):
        assert body["specs"]["llm"]["server"] == "ollama" and "ttftMs" not in body["specs"]["llm"]


def test_a_dry_run_without_a_password_and_a_down_hub_exits_at_once_with_both_generations(
    llm: StandIn,
) -> None:
    r = cli("join", "ABC123", "--hub", DOWN_HUB, "-e", llm.url, "--dry-run", "--hub-api", "v0.1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [q["hub_api"] for q in out["requests"]] == ["v0.1"]  # --hub-api picks the one shown
    assert out["requests"][0]["url"] == f"{DOWN_HUB}/rooms/ABC123/join"
    assert "never answered" not in r.stderr and "retry" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_demo_port_and_it_ends_with_the_next_step() -> None:
    port = _free_port()
    r = cli("demo", "--duration", "1", "--interval", "0.2", "--port", str(port))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"embedded hub on http://127.0.0.1:{port}" in out
    assert f"http://127.0.0.1:{port}/rooms/" in out  # the live room's URL while it runs
    tail = out[out.index("left the room") :]
    assert "next: " in tail and "llmroom join CODE" in tail
    assert "http://localhost:3000/rooms/CODE/v1" in tail and "curl http://localhost:3000/rooms/CODE" in tail


def test_demo_on_a_port_in_use_is_one_line_as_serve_says_it() -> None:
    from llmroom_cli.hub.runner import PortInUse

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("demo", "--duration", "1", "--port", str(port))
    assert (r.returncode, r.stdout) == (PortInUse.exit_code, "")
    assert r.stderr == f"error: port {port} is already in use on 127.0.0.1 (pick another with --port)\n"


@pytest.mark.parametrize("command", ["join", "demo"])
def test_help_has_examples_and_no_stray_spaces(command: str) -> None:
    text = cli(command, "--help").stdout
    assert "Examples:" in text and f"llmroom {command}" in text.split("Examples:", 1)[1]
    assert " ." not in text.replace("...", "")
    if command == "join":
        flat = " ".join(text.split())
        assert "default: (the config file's nickname, else user@host)" in flat
        assert "default: (stable per hub, room and endpoint)" in flat
        assert "[default: user@host]" not in flat


# -- no --endpoint: the server found gives the stable id ---------------------------------------------


@pytest.fixture
def net() -> Iterator[list[str]]:
    from tests.netns_helpers import own_network

    with own_network() as prefix:
        if prefix is None:
            pytest.skip("needs a network namespace of its own (root and iproute2)")
        yield prefix


def test_the_server_found_gives_the_stable_id_and_json_mode_says_nothing(net: list[str]) -> None:
    from llmroom_cli.identity import stable_participant_id
    from llmroom_cli.options import DEFAULT_HUB
    from tests.netns_helpers import standin_in

    with standin_in(net, port=1234):
        r = cli("join", "ABC123", "--dry-run", "--json", "--hub-api", "v0.1", prefix=net)
    assert r.returncode == 0, r.stderr
    assert "using the" not in r.stderr  # --json: stdout is the preview, stderr stays quiet
    (body,) = _bodies(r.stdout)
    assert json.loads(r.stdout)["shares"] == "http://127.0.0.1:1234"
    assert body["endpoint"] == "http://127.0.0.1:PORT"  # v0.1: the share relay's address
    # The same id a later `join -e http://127.0.0.1:1234` (or `leave CODE`) computes: same user key.
    assert body["id"] == stable_participant_id(DEFAULT_HUB, "ABC123", "http://127.0.0.1:1234")


@pytest.mark.parametrize("api", ["v0.1", "v0.6"])
def test_bench_figures_reach_a_v01_room_and_a_v06_join_says_they_will_not(
    hub: RunningHub, llm: StandIn, api: str
) -> None:
    room = hub.state.create_room("r")["code"]
    a = Agent(room, "--hub", hub.url, "-e", llm.url, "--hub-api", api, "--json", "--bench")
    try:
        a.wait_event("joined")
        (part,) = hub.state.participants(room)
        if api == "v0.1":
            assert part["specs"]["llm"]["tokensPerSecond"] > 0 and part["specs"]["llm"]["ttftMs"] > 0
        else:
            assert "llm" not in part.get("specs", {})  # what the v0.6 registration keeps
        a.signal()
        assert a.finish() == 0, a.stderr
    finally:
        a.proc.kill()
    warned = "a v0.6 hub keeps only gpu, vram, ram and cpu" in a.stderr
    assert warned == (api == "v0.6"), a.stderr


def test_a_dry_run_shows_the_relay_address_a_v01_hub_would_get_not_the_server(llm: StandIn) -> None:
    args = ["join", "ABC123", "--hub", DOWN_HUB, "-e", llm.url, "--dry-run"]
    relayed = {b["hub_api"]: b for b in json.loads(cli(*args).stdout)["requests"]}
    assert relayed["v0.1"]["body"]["endpoint"] == "http://127.0.0.1:PORT"  # the share relay, not it
    assert relayed["v0.6"]["body"]["endpoint"] == llm.url  # shown by a v0.6 hub, never connected to
    direct = json.loads(cli(*args, "--direct", "--hub-api", "v0.1").stdout)["requests"]
    assert [b["body"]["endpoint"] for b in direct] == [llm.url]
