"""Foreign text (nicknames, model and room names, mDNS names, a hub's errors) is shown literally by
every command: control characters made visible, rich markup not interpreted, lone surrogates
replaced; piped and on a real terminal."""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Iterator

import pytest

from llmroom_cli import render
from tests.helpers import cli
from tests.hostile_hubs import HostileHub
from tests.pty_helpers import PtyProcess, plain

CLEAR = "\x1b[2J\x1b[H"
OSC8 = "\x1b]8;;http://evil.example/\x07click me\x1b]8;;\x07"
TITLE = "\x1b]0;pwned\x07"
HOSTILE = ["[/]x", "[/red]", "[bold]b[/bold]", CLEAR + "wiped", OSC8, TITLE + "t", "bidi\u202eevil"]
ROOM = "ABC123"


def _participants_body() -> str:
    parts = [
        {"id": str(i), "nickname": nick, "model": f"m{nick}", "status": "online", "endpoint": "http://x"}
        for i, nick in enumerate(HOSTILE)
    ]
    # A lone surrogate, as a JSON escape: valid JSON, but not encodable as UTF-8.
    parts.append({"id": "s", "nickname": "sur\\ud800rogate", "model": "m", "status": "online"})
    body = json.dumps({"participants": parts})
    return body.replace("sur\\\\ud800rogate", "sur\\ud800rogate")


@pytest.fixture
def bad_hub() -> Iterator[HostileHub]:
    with HostileHub() as h:
        h.faults["participants"] = "body:" + _participants_body()
        yield h


def _assert_literal(out: str) -> None:
    for seq in ("\x1b[2J", "\x1b]8;", "\x1b]0;", "\u202e", "\ud800"):
        assert seq not in out
    for shown in (
        "[/]x",
        "[/red]",
        "[bold]b[/bold]",
        "\\x1b[2J",
        "\\x1b]8;;http://evil",
        "\\u202e",
        "\ufffd",
    ):
        assert shown in out, shown


def test_list_piped_shows_hostile_names_literally(bad_hub: HostileHub) -> None:
    r = cli("list", ROOM, "--hub", bad_hub.url)
    assert r.returncode == 0, r.stderr
    _assert_literal(r.stdout)
    assert len(r.stdout.strip().splitlines()) == len(HOSTILE) + 1


def test_list_json_keeps_the_hub_body(bad_hub: HostileHub) -> None:
    r = cli("list", ROOM, "--hub", bad_hub.url, "--json")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and json.loads(r.stdout)["participants"][0]["nickname"] == "[/]x"


def test_list_on_a_terminal_shows_hostile_names_literally(
    bad_hub: HostileHub, clean_env: dict[str, str]
) -> None:
    p = PtyProcess("list", ROOM, "--hub", bad_hub.url, env=clean_env, cols=200)
    try:
        assert p.wait() == 0, plain(p.text)
        _assert_literal(p.text)
        assert "NICKNAME" in p.text
    finally:
        p.close()


def test_list_watch_on_a_terminal_shows_hostile_names_literally(
    bad_hub: HostileHub, clean_env: dict[str, str]
) -> None:
    p = PtyProcess("list", ROOM, "--hub", bad_hub.url, "--watch", env=clean_env, cols=200)
    try:
        p.expect(r"Ctrl-C to stop")
        p.expect(r"rogate")
        p.proc.send_signal(signal.SIGINT)
        assert p.wait() == 0, plain(p.text)
        _assert_literal(p.text)
    finally:
        p.close()


def test_join_panel_shows_a_hostile_model_name_literally(clean_env: dict[str, str]) -> None:
    from llmroom_cli.server import start_hub

    with HostileHub() as llm, start_hub(port=0) as hub:
        llm.models = ["[/red]" + TITLE + "model"]
        room = hub.state.create_room("r")["code"]
        p = PtyProcess(
            "join", room, "--hub", hub.url, "-e", llm.url, "--interval", "0.1", "--no-specs", env=clean_env
        )
        try:
            p.expect(r"beats\s+2")
            p.proc.send_signal(signal.SIGINT)
            assert p.wait() == 0, plain(p.text)
            assert "\x1b]0;" not in p.text
            assert "[/red]\\x1b]0;pwned\\x07model" in plain(p.text)
        finally:
            p.close()


def test_probe_and_doctor_show_hostile_model_names_literally() -> None:
    with HostileHub() as llm:
        llm.models = ["[/]x" + CLEAR, "ok-model"]
        r = cli("probe", llm.url)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "[/]x\\x1b[2J" in r.stdout
        r = cli("doctor", "--hub", llm.url, "--endpoint", llm.url)
        assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
        assert "\x1b" not in r.stdout and "[/]x\\x1b[2J" in r.stdout


def test_tables_never_interpret_markup_and_rooms_never_crash() -> None:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, force_terminal=True, width=200, color_system=None).print(
        render.build_table(("NAME", "URL"), [["[/]x" + CLEAR, "[/red]" + OSC8]])
    )
    shown = out.getvalue()
    assert "[/]x\\x1b[2J" in shown and "[/red]\\x1b]8;;" in shown
    piped = io.StringIO()
    render.print_table(("NAME",), [["mdns\x1b[31mname\ud800"]], file=piped)
    assert piped.getvalue() == "mdns\\x1b[31mname\ufffd\n"
