"""Issue 14 on a real pseudo-terminal: the room URL, ids, narrow tables, colours, the password prompt."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from llmroom_cli.hub import RunningHub
from tests.pty_helpers import PtyProcess, plain

LONG = {
    "id": "4f1c9a2e-0000-4000-8000-000000000001",
    "nickname": "alice@laptop",
    "model": "llama3.2:latest",
    "endpoint": "http://192.168.1.20:11434",
    "specs": {"gpu": "NVIDIA GeForce RTX 4090", "vram": 24, "ram": 64},
}


def _run(*args: str, env: dict[str, str], cols: int = 120, input: str | None = None) -> str:
    p = PtyProcess(*args, env=env, cols=cols)
    try:
        if input is not None:
            p.send(input)
        code = p.wait()
        assert code == 0, plain(p.text)
        return plain(p.text)
    finally:
        p.close()


@pytest.fixture
def room(hub: RunningHub) -> Iterator[str]:
    code = hub.state.create_room("wide room")["code"]
    r = httpx.post(
        f"{hub.url}/rooms/{code}/join", json={**LONG, "endpoint": "http://127.0.0.1:1"}, trust_env=False
    )
    r.raise_for_status()
    yield code


def test_create_on_a_terminal_shows_the_room_url_and_a_curl(
    hub: RunningHub, clean_env: dict[str, str]
) -> None:
    out = _run("create", "Hack night", "--hub", hub.url, env=clean_env, cols=200)
    code = re.search(r"created room (\S+)", out)
    assert code is not None, out
    url = f"{hub.url}/rooms/{code.group(1)}/v1"
    assert url in out
    assert f"curl {url}/chat/completions -H 'Content-Type: application/json' -d '" in out
    assert f"llmroom join {code.group(1)} --hub {hub.url}" in out


def test_list_code_header_has_the_room_url(hub: RunningHub, room: str, clean_env: dict[str, str]) -> None:
    out = _run("list", room, "--hub", hub.url, env=clean_env, cols=200)
    assert f"room {room}: {hub.url}/rooms/{room}/v1" in out
    assert f"curl {hub.url}/rooms/{room}/v1/chat/completions" in out


def test_ids_are_short_on_a_terminal_and_whole_with_wide(
    hub: RunningHub, room: str, clean_env: dict[str, str]
) -> None:
    short = _run("list", room, "--hub", hub.url, env=clean_env)
    assert "4f1c9a2e…" in short and LONG["id"] not in short
    wide = _run("list", room, "--hub", hub.url, "--wide", env=clean_env, cols=200)
    assert LONG["id"] in wide


@pytest.mark.parametrize("cols", [40, 60, 120])
def test_narrow_tables_drop_columns_and_never_split_a_word(
    hub: RunningHub, room: str, clean_env: dict[str, str], cols: int
) -> None:
    out = _run("list", room, "--hub", hub.url, env=clean_env, cols=cols)
    table = out[out.index("ID ") :]
    lines = table.splitlines()
    assert all(len(line.rstrip()) <= cols for line in lines), table
    header = lines[0].split()
    # Every header shown is whole (no "ENDPOIN" / "T"), and the most useful columns survive.
    known = {"ID", "NICKNAME", "MODEL", "STATUS", "GPU", "VRAM", "RAM", "ENDPOINT", "LAST", "SEEN", "SPEED"}
    assert set(header) <= known and {"ID", "NICKNAME", "STATUS"} <= set(header), header
    # Cells are whole words or cut with an ellipsis, never continued on the next line.
    row = lines[1]
    assert "alice@laptop" in row
    assert "online" in row
    if "MODEL" in header:
        assert "llama3.2:latest" in row or re.search(r"llama3\S*…", row)
    hidden = 10 - len([h for h in header if h != "SEEN"])
    if hidden:
        assert f"{hidden} column{'s' if hidden > 1 else ''} hidden (--json)" in table
    else:
        assert "hidden" not in table


def test_error_and_warning_are_coloured_on_a_terminal_unless_no_color(clean_env: dict[str, str]) -> None:
    env = {k: v for k, v in clean_env.items() if k != "NO_COLOR"}
    p = PtyProcess("list", "BAD!!!", env=env)
    try:
        assert p.wait() == 2
        assert "\x1b[1;31merror:\x1b[0m" in p.text
    finally:
        p.close()
    p = PtyProcess("list", "BAD!!!", env=clean_env)  # NO_COLOR=1
    try:
        assert p.wait() == 2
        assert "error:" in p.text and "\x1b[1;31m" not in p.text
    finally:
        p.close()


def test_doctor_problems_are_bold_red_not_dim(clean_env: dict[str, str]) -> None:
    env = {k: v for k, v in clean_env.items() if k != "NO_COLOR"}
    p = PtyProcess("doctor", "--hub", "http://127.0.0.1:1", "-e", "http://127.0.0.1:9", env=env, cols=160)
    try:
        assert p.wait() in (5, 6)  # the hub (5) or the server (6) first: both are problems
        problem = next(line for line in p.text.splitlines() if "PROBLEM" in line)
        assert "\x1b[1;31m" in problem and "\x1b[2m" not in problem
    finally:
        p.close()


def test_password_stdin_on_a_terminal_prompts_without_echo(
    hub: RunningHub, clean_env: dict[str, str]
) -> None:
    p = PtyProcess("create", "Locked", "--hub", hub.url, "--password-stdin", env=clean_env, cols=200)
    try:
        p.expect("room password: ")
        p.send("s3cret-typed\n")
        assert p.wait() == 0, plain(p.text)
        assert "s3cret-typed" not in p.text  # not echoed as it was typed
        assert "created room" in plain(p.text)
    finally:
        p.close()
    rooms = httpx.get(f"{hub.url}/v1/rooms", trust_env=False).json()["data"]
    assert [r["passwordProtected"] for r in rooms if r["name"] == "Locked"] == [True]
