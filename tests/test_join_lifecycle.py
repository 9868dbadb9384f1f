"""`llmroom join` as a real process, with real signals, against a real hub on an ephemeral port that
the tests make misbehave (slow, frozen, 500, HTML, forgetting participants, deleting rooms, going down
and coming back on the same port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from llmroom_cli.hub import RunningHub, start_hub
from llmroom_cli.standin import MODEL, StandIn
from tests.helpers import Agent, cli, wait_for

INTERVAL = "0.05"


@pytest.fixture
def llm() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


@pytest.fixture
def room(hub: RunningHub) -> str:
    code: str = hub.state.create_room("test room")["code"]
    return code


@pytest.fixture(autouse=True)
def _v01(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are the v0.1 lifecycle's tests: our hub speaks both, so the agent is told which (the v0.6
    join is tested in test_join_v06.py); every agent started here inherits it."""
    monkeypatch.setenv("LLMROOM_HUB_API", "v0.1")


def agent(hub: RunningHub, llm: StandIn, room: str, *extra: str, **kw: str) -> Agent:
    return Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", INTERVAL, *extra, **kw)  # type: ignore[arg-type]


def relayed(endpoint: object, llm: StandIn) -> bool:
    """The published endpoint is the agent's share relay on loopback, not the server itself."""
    return isinstance(endpoint, str) and endpoint.startswith("http://127.0.0.1:") and endpoint != llm.url


def listed(hub: RunningHub, room: str) -> list[dict[str, object]]:
    return hub.state.participants(room)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_join_heartbeat_and_leave_on_signal(hub: RunningHub, llm: StandIn, room: str, sig: int) -> None:
    a = agent(hub, llm, room, "--nickname", "alice")
    joined = a.wait_event("joined")
    assert joined["room"] == room and joined["model"] == MODEL and relayed(joined["endpoint"], llm)
    assert joined["nickname"] == "alice" and isinstance(joined["specs"], dict)
    assert joined["specs"]["llm"]["server"] == "ollama" and joined["specs"]["ram"] > 0
    beat = a.wait_event("heartbeat", count=3)
    assert beat["seq"] == 3 and beat["rtt_ms"] >= 0
    (p,) = listed(hub, room)
    assert p["status"] == "online" and p["nickname"] == "alice" and p["model"] == MODEL
    a.signal(sig)
    assert a.finish() == 0, a.stderr
    assert a.events[0]["event"] == "joined"
    assert a.events[-1] == {"event": "left", "ts": a.events[-1]["ts"], "confirmed": True}
    assert listed(hub, room) == []
    assert "Traceback" not in a.stderr


def test_first_beat_one_interval_after_join_and_one_per_interval(
    hub: RunningHub, llm: StandIn, room: str
) -> None:
    a = agent(hub, llm, room)
    a.wait_event("heartbeat", count=5)
    a.signal()
    a.finish()
    joined_ts = a.events[0]["ts"]
    beats = [e["ts"] for e in a.events if e["event"] == "heartbeat"]
    # Each beat comes after the join plus its own slot of the schedule (never early, never bunched).
    for k, ts in enumerate(beats, 1):
        assert ts >= joined_ts + k * 50 - 5
    assert len({e["seq"] for e in a.events if e["event"] == "heartbeat"}) == len(beats)


def test_rides_out_500_and_html_and_says_when_back(hub: RunningHub, llm: StandIn, room: str) -> None:
    a = agent(hub, llm, room)
    a.wait_event("heartbeat")
    hub.fault = "500"
    first = a.wait_event("reconnecting")
    assert first["attempt"] == 1 and "500" in first["reason"]
    hub.fault = "html"
    a.wait_event("reconnecting", count=3)
    hub.fault = None
    a.wait_event("online")
    n = len([e for e in a.events if e["event"] == "heartbeat"])
    a.wait_event("heartbeat", count=n + 1)
    a.signal()
    assert a.finish() == 0
    assert listed(hub, room) == []


def test_frozen_hub_times_out_beats_and_leave_still_exits_zero(
    hub: RunningHub, llm: StandIn, room: str
) -> None:
    a = agent(hub, llm, room, "--interval", "0.2")
    a.wait_event("heartbeat")
    hub.fault = "freeze"
    reason = a.wait_event("reconnecting")["reason"]
    assert "did not answer in time" in reason
    a.signal(signal.SIGTERM)
    assert a.finish() == 0
    assert a.events[-1]["event"] == "left" and a.events[-1]["confirmed"] is False
    assert "did not confirm" in a.stderr
    hub.fault = None


def test_second_ctrl_c_exits_at_once(hub: RunningHub, llm: StandIn, room: str) -> None:
    a = agent(hub, llm, room)
    a.wait_event("heartbeat")
    hub.fault = "freeze"
    a.signal(signal.SIGINT)
    wait_for(lambda: hub.frozen_requests() > 0, "the leave to reach the frozen hub")
    a.signal(signal.SIGINT)
    assert a.finish() == 130
    assert "interrupted again" in a.stderr and "Traceback" not in a.stderr
    assert f"llmroom leave --hub {hub.url} {room} " in a.stderr  # how to clean up what is left
    hub.fault = None


def test_forgotten_participant_rejoins_with_same_id(hub: RunningHub, llm: StandIn, room: str) -> None:
    a = agent(hub, llm, room)
    pid = a.wait_event("joined")["id"]
    a.wait_event("heartbeat")
    assert hub.state.forget_participant(room, pid)
    a.wait_event("rejoined")
    wait_for(lambda: [p["id"] for p in listed(hub, room)] == [pid], "the participant to be listed again")
    a.signal()
    assert a.finish() == 0


def test_room_deleted_exits_3_with_error_event(hub: RunningHub, llm: StandIn, room: str) -> None:
    a = agent(hub, llm, room)
    a.wait_event("heartbeat")
    hub.state.delete_room(room)
    assert a.finish() == 3
    assert a.events[-1]["event"] == "error" and a.events[-1]["code"] == 3
    assert "gone" in a.stderr and len(a.stderr.strip().splitlines()) == 1


def test_hub_down_then_back_on_same_port_with_its_rooms(llm: StandIn) -> None:
    hub = start_hub(port=0)
    room = hub.state.create_room("r")["code"]
    a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", INTERVAL)
    try:
        a.wait_event("heartbeat")
        state, port = hub.state, hub.port
        hub.stop()
        a.wait_event("reconnecting")
        hub = start_hub(port=port, state=state)
        a.wait_event("online")
        assert [p["status"] for p in hub.state.participants(room)] == ["online"]
        a.signal()
        assert a.finish() == 0
        assert hub.state.participants(room) == []
    finally:
        a.kill()
        hub.stop()


def test_restarted_hub_without_rooms_exits_3(llm: StandIn) -> None:
    hub = start_hub(port=0)
    room = hub.state.create_room("r")["code"]
    a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", INTERVAL)
    try:
        a.wait_event("heartbeat")
        port = hub.port
        hub.stop()
        hub = start_hub(port=port)
        assert a.finish() == 3
        assert a.events[-1]["event"] == "error"
    finally:
        a.kill()
        hub.stop()


def test_stable_id_upserts_instead_of_listing_a_ghost(hub: RunningHub, llm: StandIn, room: str) -> None:
    ids = []
    for _ in range(2):
        a = agent(hub, llm, room)
        ids.append(a.wait_event("joined")["id"])
        a.proc.kill()  # a crash: no leave
        a.proc.wait()
    assert ids[0] == ids[1]
    assert len(listed(hub, room)) == 1
    assert cli("leave", room, ids[0], "--hub", hub.url).returncode == 0
    assert listed(hub, room) == []


def test_room_not_found_at_join_is_exit_3(hub: RunningHub, llm: StandIn) -> None:
    a = Agent("ZZZ999", "--hub", hub.url, "-e", llm.url, "--json")
    assert a.finish() == 3
    assert a.names() == ["error"]


def test_password_protected_room(hub: RunningHub, llm: StandIn) -> None:
    room = hub.state.create_room("secret room", password="hunter22")["code"]
    wrong = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--password-stdin", stdin="nope\n")
    assert wrong.finish() == 4
    assert wrong.names() == ["error"] and "password" in wrong.stderr
    env = dict(os.environ, LLMROOM_PASSWORD="hunter22")
    ok = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", INTERVAL, env=env)
    ok.wait_event("heartbeat")
    ok.signal()
    assert ok.finish() == 0
    piped = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--password-stdin", stdin="hunter22\n")
    piped.wait_event("joined")
    piped.signal()
    assert piped.finish() == 0
    for a in (wrong, ok, piped):
        assert "hunter22" not in "".join(a.raw) + a.stderr


def test_password_on_command_line_warns(hub: RunningHub, llm: StandIn) -> None:
    room = hub.state.create_room("r", password="pw123")["code"]
    a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--password", "pw123")
    a.wait_event("joined")
    a.signal()
    assert a.finish() == 0
    assert "process list" in a.stderr and "pw123" not in a.stderr + "".join(a.raw)


def test_endpoint_down_is_exit_6_before_any_hub_request(hub: RunningHub, room: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("join", room, "--hub", hub.url, "-e", dead)
    assert r.returncode == 6, r.stderr
    assert dead in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert hub.requests_seen() == 0


def test_unknown_model_is_exit_6_listing_served_models(hub: RunningHub, llm: StandIn, room: str) -> None:
    r = cli("join", room, "--hub", hub.url, "-e", llm.url, "-m", "mistral")
    assert r.returncode == 6
    assert MODEL in r.stderr
    assert hub.requests_seen() == 0


def test_ollama_short_name_means_latest(hub: RunningHub, llm: StandIn, room: str) -> None:
    a = agent(hub, llm, room, "-m", MODEL.removesuffix(":latest"))
    assert a.wait_event("joined")["model"] == MODEL
    a.signal()
    assert a.finish() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["BAD"],
        ["ABC123", "--interval", "0.001"],
        ["ABC123", "-e", "ftp://x"],
        ["ABC123", "--hub", "http://h:badport"],
        ["ABC123", "-c", "temperature=9"],
        ["ABC123", "-c", "oops"],
        ["ABC123", "--config-file", "/nonexistent.json"],
        ["ABC123", "--nickname", ""],
        ["ABC123", "--bogus-flag"],
    ],
)
def test_usage_errors_are_exit_2_one_line_no_request(args: list[str]) -> None:
    # The hub and endpoint URLs point at a listener that would record any connection.
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(0.0)
        url = f"http://127.0.0.1:{trap.getsockname()[1]}"
        extra = [] if any(a in ("--hub", "-e") for a in args) else ["--hub", url, "-e", url]
        r = cli("join", *args, *extra)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")
        with pytest.raises(BlockingIOError):
            trap.accept()


def test_code_starting_with_dash_after_double_dash(hub: RunningHub, llm: StandIn) -> None:
    r = cli("join", "--hub", hub.url, "-e", llm.url, "--", "-YLUHJ")
    assert r.returncode == 3  # parsed as a code, and the hub has no such room
    assert "room not found" in r.stderr


def test_hub_unreachable_at_startup_is_exit_5(llm: StandIn) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("join", "ABC123", "--hub", dead, "-e", llm.url)
    assert r.returncode == 5
    assert dead in r.stderr and "Traceback" not in r.stderr


def test_plain_output_has_one_line_per_state_change(hub: RunningHub, llm: StandIn, room: str) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmroom_cli",
            "join",
            room,
            "--hub",
            hub.url,
            "-e",
            llm.url,
            "--interval",
            INTERVAL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout is not None
    first = p.stdout.readline()
    assert first.startswith(f"joined room {room} on {hub.url}")
    wait_for(lambda: any(x["status"] == "online" for x in listed(hub, room)), "the participant online")
    hub.fault = "500"
    assert p.stdout.readline().startswith("reconnecting:")
    hub.fault = None
    assert p.stdout.readline().strip() == "back online"
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert rest.strip() == "left the room"


def test_shell_script_joins_in_background_and_kill_leaves_nothing(
    hub: RunningHub, llm: StandIn, room: str
) -> None:
    script = textwrap.dedent(
        f"""
        set -e
        {sys.executable} -m llmroom_cli join {room} --hub {hub.url} -e {llm.url} --json \\
            --interval 0.05 > "$EV" &
        pid=$!
        until grep -q '"event":"joined"' "$EV"; do sleep 0.05; done
        kill "$pid"
        wait "$pid"
        echo "exit=$?"
        """
    )
    env = dict(os.environ, EV=str(hub_tmp_file()))
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert "exit=0" in r.stdout, r.stderr
    assert listed(hub, room) == []


def hub_tmp_file() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_startup_exits_zero_and_sends_nothing(hub: RunningHub, room: str, sig: int) -> None:
    # An endpoint that accepts the connection and never answers: the probe is in progress.
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen()
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        a = Agent(room, "--hub", hub.url, "-e", url, "--json")
        conn, _ = frozen.accept()  # the probe has started
        a.signal(sig)
        assert a.finish() == 0, a.stderr
        conn.close()
    assert "stopped before joining" in a.stderr and "Traceback" not in a.stderr
    assert a.events == []
    assert hub.requests_seen() == 0


def test_signal_while_the_join_is_in_flight_still_leaves(hub: RunningHub, llm: StandIn, room: str) -> None:
    hub.fault = "slow:0.6"
    a = agent(hub, llm, room)
    wait_for(lambda: hub.requests_seen() > 0, "the join to reach the hub")
    a.signal(signal.SIGINT)
    assert a.finish() == 0, a.stderr
    hub.fault = None
    assert a.events[-1]["event"] == "left"
    assert listed(hub, room) == []


def test_join_picks_the_loaded_model_of_a_real_kind_and_reports_it_in_specs(
    hub: RunningHub, room: str
) -> None:
    from tests.fake_llm_servers import FakeLLMServer

    with FakeLLMServer("ollama") as ollama:
        a = Agent(room, "--hub", hub.url, "-e", ollama.url, "--json", "--interval", INTERVAL)
        joined = a.wait_event("joined")
        a.signal()
        assert a.finish() == 0
    assert joined["model"] == "mistral:latest"  # the one loaded, among several installed
    assert joined["specs"]["llm"] == {
        "server": "ollama",
        "version": "0.12.6",
        "context_length": 4096,
        "quantization": "Q4_0",
        "loaded": True,
    }


def test_unknown_model_lists_only_chat_models_with_loaded_marked(hub: RunningHub, room: str) -> None:
    from tests.fake_llm_servers import FakeLLMServer

    with FakeLLMServer("lmstudio", "0.3") as lm:
        r = cli("join", room, "--hub", hub.url, "-e", lm.url, "-m", "nope")
    assert r.returncode == 6
    assert "meta-llama-3.1-8b-instruct (loaded)" in r.stderr and "nomic-embed" not in r.stderr
    assert hub.requests_seen() == 0


def test_loading_server_is_exit_6_or_waited_for(hub: RunningHub, room: str) -> None:
    from tests.fake_llm_servers import FakeLLMServer

    with FakeLLMServer("llamacpp", "loading") as server:
        r = cli("join", room, "--hub", hub.url, "-e", server.url)
        assert r.returncode == 6 and "loading" in r.stderr
        seen = len(server.requests)
        a = Agent(room, "--hub", hub.url, "-e", server.url, "--wait", "--json", "--interval", INTERVAL)
        # It keeps probing while the server loads, and joins nobody meanwhile.
        wait_for(lambda: len(server.requests) > seen + 4, "the agent to poll the loading server")
        assert hub.requests_seen() == 0
        server.set_ready()
        endpoint = a.wait_event("joined")["endpoint"]
        assert endpoint.startswith("http://127.0.0.1:") and endpoint != server.url  # the share relay
        a.signal()
        assert a.finish() == 0


def test_advertise_publishes_that_url_after_checking_it(hub: RunningHub, llm: StandIn, room: str) -> None:
    advertised = llm.url.replace("127.0.0.1", "localhost") + "/v1/"
    a = agent(hub, llm, room, "--advertise", advertised)
    assert a.wait_event("joined")["endpoint"] == advertised.removesuffix("/v1/")
    a.signal()
    assert a.finish() == 0


def test_advertise_that_does_not_answer_is_exit_6_unless_forced(
    hub: RunningHub, llm: StandIn, room: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("join", room, "--hub", hub.url, "-e", llm.url, "--advertise", dead)
    assert r.returncode == 6, r.stderr
    assert hub.requests_seen() == 0
    forced = agent(hub, llm, room, "--advertise", dead, "--force")
    assert forced.wait_event("joined")["endpoint"] == dead
    forced.signal()
    assert forced.finish() == 0
    assert "warning" in forced.stderr


def test_id_config_no_specs_env_defaults_and_quiet_reach_the_hub(
    hub: RunningHub, llm: StandIn, room: str, tmp_path: os.PathLike[str]
) -> None:
    cfg = os.path.join(tmp_path, "gen.toml")
    with open(cfg, "w") as f:
        f.write('top_p = 0.9\nstop = ["END"]\nmirostat = 2\n')
    env = dict(
        os.environ, LLMROOM_ENDPOINT=llm.url, LLMROOM_MODEL="llmroom-demo", LLMROOM_NICKNAME="env-nick"
    )
    args = ["join", room, "--hub", hub.url, "--id", "fixed-id-1", "--no-specs", "-c", "temperature=0.25"]
    args += ["-c", "max_tokens=512", "--config-file", cfg, "--quiet", "--interval", INTERVAL]
    p = subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    wait_for(lambda: listed(hub, room), "the participant to join")
    (part,) = listed(hub, room)
    assert part["id"] == "fixed-id-1" and part["nickname"] == "env-nick" and part["model"] == MODEL
    assert relayed(part["endpoint"], llm) and "specs" not in part
    assert part["config"] == {
        "top_p": 0.9,
        "stop": ["END"],
        "mirostat": 2,
        "temperature": 0.25,
        "max_tokens": 512,
    }
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == "" and err == ""  # --quiet: nothing but errors
    assert listed(hub, room) == []


def test_debug_traces_http_but_never_the_password(hub: RunningHub, llm: StandIn) -> None:
    room = hub.state.create_room("traced", password="s3cr3t-pw")["code"]
    a = Agent(
        room,
        "--hub",
        hub.url,
        "-e",
        llm.url,
        "--json",
        "--debug",
        "--password-stdin",
        "--interval",
        INTERVAL,
        stdin="s3cr3t-pw\n",
    )
    a.wait_event("heartbeat")
    a.signal()
    assert a.finish() == 0
    assert "HTTP Request: POST" in a.stderr and "/join" in a.stderr
    assert "s3cr3t-pw" not in a.stderr + "".join(a.raw)


def test_debug_trace_redacts_what_it_would_otherwise_print(capsys: pytest.CaptureFixture[str]) -> None:
    """The filter itself: a line that carries the password, URL credentials or a token is blanked."""
    import logging

    from llmroom_cli import cli as cli_module

    cli_module._secrets.add("s3cr3t-pw")
    logger = logging.getLogger("httpx")
    before = list(logger.handlers)
    try:
        cli_module._enable_http_trace()
        logger.info(
            "HTTP Request: %s %s", "POST", "http://bob:hunter2@hub:3000/rooms?token=abc123&x=1 (s3cr3t-pw)"
        )
    finally:
        for handler in logger.handlers[len(before) :]:
            logger.removeHandler(handler)
        cli_module._secrets.discard("s3cr3t-pw")
    err = capsys.readouterr().err
    assert "debug: httpx: HTTP Request: POST http://***@hub:3000/rooms?token=[redacted]&x=1" in err
    for secret in ("s3cr3t-pw", "hunter2", "abc123"):
        assert secret not in err


def test_json_error_event_is_compact_like_the_others(hub: RunningHub, llm: StandIn, room: str) -> None:
    r = cli("join", room, "--hub", hub.url, "-e", llm.url, "-m", "nope", "--json")
    assert r.returncode == 6
    assert r.stdout.startswith('{"event":"error","ts":')


def test_reader_going_away_makes_the_agent_leave_quietly(hub: RunningHub, llm: StandIn, room: str) -> None:
    script = (
        f"{sys.executable} -m llmroom_cli join {room} --hub {hub.url} -e {llm.url} --json --interval 0.05"
        " | head -1; echo rc=${PIPESTATUS[0]}"
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith('{"event":"joined"') and "rc=0" in r.stdout, r.stderr
    assert "unexpected" not in r.stderr and "Traceback" not in r.stderr
    assert listed(hub, room) == []


def test_cleanup_command_is_given_when_the_leave_is_not_confirmed(
    hub: RunningHub, llm: StandIn, room: str
) -> None:
    a = agent(hub, llm, room)
    pid = a.wait_event("joined")["id"]
    a.wait_event("heartbeat")
    hub.fault = "freeze"
    a.signal(signal.SIGTERM)
    assert a.finish() == 0
    hub.fault = None
    assert f"llmroom leave --hub {hub.url} {room} {pid}" in a.stderr
    assert len(a.stderr.strip().splitlines()) == 1


def test_missing_password_says_the_room_is_protected(hub: RunningHub, llm: StandIn) -> None:
    room = hub.state.create_room("locked", password="pw")["code"]
    r = cli("join", room, "--hub", hub.url, "-e", llm.url)
    assert r.returncode == 4
    assert "protected and no password was given" in r.stderr


def test_unreachable_hub_at_startup_says_it_is_retrying(llm: StandIn) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("join", "ABC123", "--hub", dead, "-e", llm.url, "--json")
    assert r.returncode == 5
    lines = r.stderr.strip().splitlines()
    assert "retrying for up to" in lines[0] and lines[-1].startswith("error:")
    assert [json.loads(x)["event"] for x in r.stdout.splitlines()] == ["error"]
