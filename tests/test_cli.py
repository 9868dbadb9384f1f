"""The CLI as a user and a script meet it: real subprocesses against a real hub on port 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from llmroom_cli import __version__
from llmroom_cli.hub import RunningHub
from llmroom_cli.standin import StandIn
from tests.helpers import cli

HEAVY = (
    "httpx",
    "rich",
    "psutil",
    "pynvml",
    "llmroom_cli.server",
    "llmroom_cli.hub",
    "aiohttp",
    "zeroconf",
    "websockets",
)


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmroom {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["join", "--help"], ["list", "--help"]])
def test_help_and_version_import_nothing_heavy(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llmroom_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
    }
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []


def test_help_lists_commands_and_exit_codes() -> None:
    r = cli("--help")
    for word in ("join", "leave", "create", "list", "serve", "specs", "demo", "Exit codes"):
        assert word in r.stdout
    assert "llmroom join -- -YLUHJ" in cli("join", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_create_prints_only_the_code_when_piped_and_list_shows_it(hub: RunningHub) -> None:
    r = cli("create", "Hack night", "--hub", hub.url)
    assert r.returncode == 0, r.stderr
    code = r.stdout.strip()
    assert re.fullmatch(r"[A-Z0-9_-]{6}", code)
    rooms = cli("list", "--hub", hub.url)
    assert rooms.returncode == 0
    line = rooms.stdout.strip().split("\t")
    assert line[:3] == [code, "Hack night", "0"]
    # Piped: an ISO-8601 UTC creation time and whether the room is protected, for scripts.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line[3]) and line[4] == "no"


def test_create_json_prints_the_hub_body(hub: RunningHub) -> None:
    r = cli("create", "R", "--hub", hub.url, "--json")
    body = json.loads(r.stdout)
    assert set(body) == {"room", "hostId"} and body["room"]["name"] == "R"


def test_create_with_password_stdin(hub: RunningHub) -> None:
    r = cli(
        "create", "Locked", "--hub", hub.url.removeprefix("http://"), "--password-stdin", input="s3cret\n"
    )
    assert r.returncode == 0, r.stderr
    code = r.stdout.strip()
    room = {r["code"]: r for r in json.loads(cli("list", "--hub", hub.url, "--json").stdout)["rooms"]}[code]
    assert "s3cret" not in json.dumps(room) and "s3cret" not in r.stderr + r.stdout
    assert room["passwordProtected"] is True
    piped = {
        line.split("\t")[0]: line.split("\t") for line in cli("list", "--hub", hub.url).stdout.splitlines()
    }
    assert piped[code][4] == "yes"  # protected rooms are marked


def test_list_participants_piped_and_json(hub: RunningHub) -> None:
    code = hub.state.create_room("room two")["code"]
    import httpx

    body = {
        "id": "p1",
        "nickname": "bob",
        "model": "llama3.2:3b",
        "endpoint": "http://10.0.0.2:11434",
        "specs": {"gpu": "NVIDIA H200", "vram": 140, "ram": 64, "extra": {"nested": [1]}},
    }
    httpx.post(f"{hub.url}/rooms/{code}/join", json=body, trust_env=False).raise_for_status()
    r = cli("list", code, "--hub", hub.url)
    assert r.returncode == 0, r.stderr
    cols = r.stdout.rstrip("\n").split("\t")
    # Piped: the whole id first, plain numbers (GB) and an ISO-8601 UTC time.
    assert cols[:8] == [
        "p1",
        "bob",
        "llama3.2:3b",
        "online",
        "NVIDIA H200",
        "140",
        "64",
        "http://10.0.0.2:11434",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cols[8])
    # --json keeps the hub's own objects, in the one {"participants": [...]} shape on both generations.
    raw = httpx.get(f"{hub.url}/rooms/{code}/participants", trust_env=False).json()
    assert json.loads(cli("list", code, "--hub", hub.url, "--json", "--hub-api", "v0.1").stdout) == raw
    v06 = httpx.get(f"{hub.url}/v1/rooms/{code}/participants", trust_env=False).json()["data"]
    assert json.loads(cli("list", code, "--hub", hub.url, "--json").stdout) == {"participants": v06}


def test_leave_removes_a_participant(hub: RunningHub) -> None:
    import httpx

    code = hub.state.create_room("r")["code"]
    body = {"id": "p1", "nickname": "n", "model": "m", "endpoint": "http://127.0.0.1:1"}
    httpx.post(f"{hub.url}/rooms/{code}/join", json=body, trust_env=False).raise_for_status()
    removed = cli("leave", code, "p1", "--hub", hub.url)
    assert removed.returncode == 0 and removed.stdout == ""
    assert f"removed p1 (n) from room {code}" in removed.stderr  # said even piped
    assert hub.state.participants(code) == []
    again = cli("leave", code, "p1", "--hub", hub.url)  # cleanup is idempotent
    assert again.returncode == 0 and "nothing to remove" in again.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["list", "BAD!!!"], 2),
        (["list", "ZZZ999"], 3),
        (["leave", "ABC12", "x"], 2),
        (["create", ""], 2),
        (["create", "x" * 300], 2),
        (["list", "--hub", "ftp://nope"], 2),
        (["nonsense"], 2),
        (["list", "--unknown"], 2),
    ],
)
def test_errors_are_one_line_with_their_exit_code(hub: RunningHub, args: list[str], code: int) -> None:
    extra = [] if "--hub" in args or args == ["nonsense"] else ["--hub", hub.url]
    r = cli(*args, *extra)
    assert r.returncode == code, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


def test_hub_unreachable_is_exit_5_naming_the_url() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("list", "--hub", url)
    assert r.returncode == 5
    assert url in r.stderr and "llmroom serve" in r.stderr and "Traceback" not in r.stderr


def test_not_a_hub_is_exit_5() -> None:
    with StandIn() as llm:  # something that speaks HTTP, but not the hub API
        r = cli("list", "--hub", llm.url)
    assert r.returncode == 5
    assert "not a hub" in r.stderr or "not the hub API" in r.stderr


def test_env_var_sets_the_hub(hub: RunningHub) -> None:
    import os

    env = dict(os.environ, LLMROOM_HUB=hub.url)
    hub.state.create_room("from env")
    r = cli("list", env=env)
    assert "from env" in r.stdout


def test_debug_shows_a_traceback_on_error() -> None:
    r = cli("list", "--hub", "http://127.0.0.1:1", "--debug")
    assert r.returncode == 5 and "Traceback" in r.stderr


def test_demo_runs_end_to_end() -> None:
    r = cli("demo", "--duration", "1", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "room" in out and "Hello from the llmroom stand-in model" in out
    assert "joined room" in out and "left the room" in out
    assert out.index("left the room") < out.index("next: ")  # it ends with the next step


def test_specs_json_is_what_join_sends() -> None:
    r = cli("specs", "--json")
    assert r.returncode == 0, r.stderr
    specs = json.loads(r.stdout)
    assert isinstance(specs["ram"], int) and specs["ram"] > 0 and specs["cpu"]
    assert all(v not in (None, "", "Unknown") for v in specs.values())
    table = cli("specs")
    assert table.returncode == 0 and table.stdout.startswith("CPU\t")


def test_probe_names_the_server_and_its_models() -> None:
    with StandIn() as llm:
        r = cli("probe", llm.url + "/v1/", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["url"] == llm.url and info["kind"] == "ollama" and info["status"] == "ready"
    assert [m["id"] for m in info["models"]] == ["llmroom-demo:latest"]


def test_probe_nothing_answering_is_exit_6() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = cli("probe", url)
    assert r.returncode == 6 and url in r.stderr


def test_doctor_all_well_and_with_the_hub_down(hub: RunningHub) -> None:
    with StandIn() as llm:
        ok = cli("doctor", "--hub", hub.url, "-e", llm.url, "--json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        report = json.loads(ok.stdout)
        assert report["hub"]["reachable"] is True and report["exit_code"] == 0
        down = cli("doctor", "--hub", "http://127.0.0.1:1", "-e", llm.url)
    assert down.returncode == 5
    assert "PROBLEM" in down.stdout


def test_list_watch_piped_repeats_and_ctrl_c_exits_zero(hub: RunningHub) -> None:
    import signal

    import httpx

    code = hub.state.create_room("watched")["code"]
    p = subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", "list", code, "--hub", hub.url, "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "\n"  # the empty room, then a blank separator
    body = {"id": "w1", "nickname": "carol", "model": "m", "endpoint": "http://127.0.0.1:9"}
    httpx.post(f"{hub.url}/rooms/{code}/join", json=body, trust_env=False).raise_for_status()
    # The event stream wakes the view at once: the next block lists carol.
    line = p.stdout.readline()
    while line == "\n":
        line = p.stdout.readline()
    assert line.startswith("w1\tcarol\tm\tonline")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "Traceback" not in err


def test_a_dash_code_without_double_dash_gets_the_hint(hub: RunningHub) -> None:
    r = cli("list", "-YLUHJ", "--hub", hub.url)
    assert r.returncode == 2
    assert "llmroom list -- -YLUHJ" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_broken_pipe_on_list_is_quiet(hub: RunningHub) -> None:
    for i in range(300):
        hub.state.create_room(f"room {i}")
    r = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -m llmroom_cli list --hub {hub.url} | head -1; echo rc=${{PIPESTATUS[0]}}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr
    assert r.stdout.count("\n") == 2


@pytest.mark.parametrize(
    "args",
    [
        ("list", "--hub", "http://[::1"),
        ("serve", "--port", "0", "--participant-timeout", "nan"),
        ("hubs", "--timeout", "nan"),
    ],
)
def test_malformed_numbers_and_urls_are_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_help_into_a_full_stdout_is_no_traceback() -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "llmroom_cli", "--help"], stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_output_into_a_full_stdout_is_one_line_and_exit_1() -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "llmroom_cli", "specs", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr == "error: write failed: No space left on device\n"
