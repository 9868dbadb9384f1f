"""Every command but `join` against a v0.6 hub, as a user and a script meet them: real subprocesses
against the fake reference hub (v0.6 only: its v0.1 routes answer 404) and against our own hub (both
generations, spoken to through v0.6), each on an ephemeral port."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.hub import RunningHub, start_hub
from tests.fake_gambi_v06 import FakeGambiV06
from tests.helpers import cli

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class V06Hub:
    """What a test needs of either v0.6 hub: its URL, and a way to register a participant over HTTP."""

    def __init__(self, url: str, kind: str) -> None:
        self.url = url
        self.kind = kind

    def put(self, code: str, pid: str, nickname: str, model: str = "llama3.2:3b") -> dict[str, Any]:
        body = {
            "nickname": nickname,
            "model": model,
            "endpoint": "http://127.0.0.1:11434",
            "specs": {"gpu": "NVIDIA H200", "vram": 140, "ram": 64},
        }
        r = httpx.put(f"{self.url}/v1/rooms/{code}/participants/{pid}", json=body, trust_env=False)
        r.raise_for_status()
        data: dict[str, Any] = r.json()["data"]["participant"]
        return data

    def participants(self, code: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/v1/rooms/{code}/participants", trust_env=False)
        r.raise_for_status()
        data: list[dict[str, Any]] = r.json()["data"]
        return data


@pytest.fixture(params=["fake", "ours"])
def v06(request: pytest.FixtureRequest) -> Iterator[V06Hub]:
    if request.param == "fake":
        with FakeGambiV06() as fake:
            yield V06Hub(fake.url, "fake")
    else:
        running: RunningHub
        with start_hub(port=0) as running:
            yield V06Hub(running.url, "ours")


def _create(hub: V06Hub, name: str, *extra: str, input: str | None = None) -> str:
    r = cli("create", name, "--hub", hub.url, *extra, input=input)
    assert r.returncode == 0, r.stderr
    code = r.stdout.strip()
    assert re.fullmatch(r"[A-Z0-9_-]{6}", code), r.stdout
    return code


def test_create_and_list_rooms_piped_and_json(v06: V06Hub) -> None:
    code = _create(v06, "Hack night")
    locked = _create(v06, "Locked", "--password-stdin", input="s3cret\n")
    r = cli("list", "--hub", v06.url)
    assert r.returncode == 0, r.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in r.stdout.splitlines()}
    assert rows[code][1:3] == ["Hack night", "0"] and re.fullmatch(ISO, rows[code][3])
    assert rows[code][4] == "no" and rows[locked][4] == "yes"  # protected rooms are marked
    body = json.loads(cli("list", "--hub", v06.url, "--json").stdout)
    assert {room["code"] for room in body["rooms"]} >= {code, locked}
    assert "s3cret" not in json.dumps(body)


def test_list_code_shows_ids_and_the_tunnel_state(v06: V06Hub) -> None:
    code = _create(v06, "R")
    v06.put(code, "4f1c9a2e-0000-4000-8000-000000000001", "alice@box")
    r = cli("list", code, "--hub", v06.url)
    assert r.returncode == 0, r.stderr
    cols = r.stdout.rstrip("\n").split("\t")
    # Registered, no tunnel yet: a v0.6 hub shows it offline, and the row says the tunnel is down.
    assert cols[:8] == [
        "4f1c9a2e-0000-4000-8000-000000000001",
        "alice@box",
        "llama3.2:3b",
        "offline, tunnel down",
        "NVIDIA H200",
        "140",
        "64",
        "http://127.0.0.1:11434",
    ]
    assert re.fullmatch(ISO, cols[8])
    listed = json.loads(cli("list", code, "--hub", v06.url, "--json").stdout)
    assert listed == {"participants": v06.participants(code)}
    assert listed["participants"][0]["connection"]["connected"] is False


def test_leave_by_id_nickname_and_prefix_and_ambiguity(v06: V06Hub) -> None:
    code = _create(v06, "R")
    v06.put(code, "aaaa1111-x", "alice")
    v06.put(code, "aaaa2222-y", "bob")
    v06.put(code, "cccc3333-z", "carol")
    ambiguous = cli("leave", code, "aaaa", "--hub", v06.url)
    assert ambiguous.returncode == 2
    assert "aaaa1111-x (alice)" in ambiguous.stderr and "aaaa2222-y (bob)" in ambiguous.stderr
    assert len(v06.participants(code)) == 3
    assert cli("leave", code, "aaaa1", "--hub", v06.url).returncode == 0  # a unique prefix
    assert cli("leave", code, "BOB", "--hub", v06.url).returncode == 0  # a nickname, any case
    assert cli("leave", code, "cccc3333-z", "--hub", v06.url).returncode == 0  # the whole id
    assert v06.participants(code) == []
    again = cli("leave", code, "cccc3333-z", "--hub", v06.url)
    assert again.returncode == 0 and "nothing to remove" in again.stderr


def test_leave_without_an_id_removes_this_machines_own_participant(v06: V06Hub) -> None:
    from llmroom_cli.identity import stable_participant_id

    code = _create(v06, "R")
    # The id `join CODE --hub URL` would use here for the default endpoint (the same user key: the
    # subprocess shares XDG_CONFIG_HOME with this test).
    own = stable_participant_id(v06.url, code, "http://localhost:11434")
    v06.put(code, own, "me")
    v06.put(code, "someone-else", "other")
    r = cli("leave", code, "--hub", v06.url)
    assert r.returncode == 0, r.stderr
    assert own in r.stderr and "this machine" in r.stderr
    assert [p["id"] for p in v06.participants(code)] == ["someone-else"]
    none = cli("leave", code, "--hub", v06.url)
    assert none.returncode == 0 and "no participant of this machine" in none.stderr


def test_room_defaults_from_config_go_to_a_v06_hub(v06: V06Hub, tmp_path: Any) -> None:
    cfg = tmp_path / "defaults.json"
    cfg.write_text(json.dumps({"max_tokens": 64}))
    r = cli(
        "create",
        "Tuned",
        "--hub",
        v06.url,
        "-c",
        "temperature=0.3",
        "-c",
        "temprature=0.7",
        "--config-file",
        str(cfg),
    )
    assert r.returncode == 0, r.stderr
    # A typo is sent (hubs keep or drop what they do not know) but the user is told the likely key.
    assert "unknown config key 'temprature' (did you mean temperature?)" in r.stderr
    room = {x["code"]: x for x in json.loads(cli("list", "--hub", v06.url, "--json").stdout)["rooms"]}
    defaults = room[r.stdout.strip()]["defaults"]
    assert defaults["temperature"] == 0.3 and defaults["max_tokens"] == 64


def test_room_defaults_on_a_v01_hub_are_refused_not_dropped(hub: RunningHub) -> None:
    r = cli("create", "R", "--hub", hub.url, "--hub-api", "v0.1", "-c", "temperature=0.3")
    assert r.returncode == 2 and "no room defaults" in r.stderr
    assert hub.state.rooms_v01() == []  # no room was created without them


def test_a_room_default_the_hub_refuses_shows_its_hint(v06: V06Hub) -> None:
    r = cli("create", "Bad", "--hub", v06.url, "-c", "instructions=5")
    assert r.returncode == 1, r.stderr
    assert "Invalid room defaults" in r.stderr or "invalid" in r.stderr.lower()
    if v06.kind == "fake":  # the reference's envelope hint, shown as it came
        assert "(Check the runtime config payload and retry.)" in r.stderr


def test_unknown_room_is_exit_3_with_the_hubs_hint(v06: V06Hub) -> None:
    r = cli("list", "ZZZZZZ", "--hub", v06.url)
    assert r.returncode == 3, r.stderr
    if v06.kind == "fake":
        assert "Run 'gambi room list' to inspect available rooms." in r.stderr


def test_doctor_shows_the_generation(v06: V06Hub) -> None:
    r = cli("doctor", "--hub", v06.url, "--json", "--endpoint", "http://127.0.0.1:9")
    data = json.loads(r.stdout)
    assert data["hub"]["reachable"] is True
    assert data["hub"]["generation"] == ("v0.6" if v06.kind == "fake" else "both")
    shown = cli("doctor", "--hub", v06.url, "--endpoint", "http://127.0.0.1:9")
    assert ("speaks v0.6" if v06.kind == "fake" else "speaks v0.1 + v0.6") in shown.stdout


def test_forcing_v01_on_a_v06_only_hub_says_it_is_not_the_hub_api() -> None:
    with FakeGambiV06() as fake:
        r = cli("list", "--hub", fake.url, "--hub-api", "v0.1")
        assert r.returncode == 5, r.stderr
        assert fake.url in r.stderr and "hub API" in r.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "args",
    [
        ["create", "R"],
        ["list"],
        ["list", "ABCDEF", "--watch"],
        ["leave", "ABCDEF", "x"],
        ["doctor"],
    ],
)
def test_a_bad_hub_api_is_exit_2_before_any_request(args: list[str]) -> None:
    # Nothing listens at the hub URL: a request would be exit 5, so exit 2 means none was made.
    r = cli(*args, "--hub", f"http://127.0.0.1:{_closed_port()}", "--hub-api", "v0.3")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --hub-api 'v0.3': expected v0.1 or v0.6"


def test_legacy_v01_routes_are_never_called_on_a_v06_hub() -> None:
    with FakeGambiV06() as fake:
        code = _create(V06Hub(fake.url, "fake"), "R")
        V06Hub(fake.url, "fake").put(code, "p1", "n")
        for args in (["list"], ["list", code], ["leave", code, "p1"]):
            assert cli(*args, "--hub", fake.url).returncode == 0
        # The probe may ask GET /health once; nothing else of v0.1 is ever sent.
        legacy = [
            (r.method, r.path) for r in fake.requests if not r.path.startswith("/v1/") and r.path != "/health"
        ]
        assert legacy == []


def test_list_watch_follows_v1_events_and_reconnects_after_the_hub_cuts_the_stream() -> None:
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_for

    # The reference hub cuts a quiet event stream (Bun's idle timeout): here after 1 s.
    with FakeGambiV06(client_idle_timeout_s=1.0) as fake:
        hub = V06Hub(fake.url, "fake")
        code = _create(hub, "watched")
        p = subprocess.Popen(
            [sys.executable, "-m", "llmroom_cli", "list", code, "--hub", fake.url, "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert p.stdout is not None
            assert p.stdout.readline() == "\n"  # the empty room, then a blank separator

            def streams() -> int:
                return sum(1 for r in fake.requests if r.path == f"/v1/rooms/{code}/events")

            wait_for(lambda: streams() >= 2, "the watcher to open the v0.6 event stream again")
            hub.put(code, "w1", "carol", model="m")
            line = p.stdout.readline()
            while line == "\n":
                line = p.stdout.readline()
            assert line.startswith("w1\tcarol\tm\toffline, tunnel down")
            # Only v0.6 routes (and the one health probe) were asked.
            assert all(r.path.startswith("/v1/") or r.path == "/health" for r in fake.requests)
        finally:
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "Traceback" not in err
