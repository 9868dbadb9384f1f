"""Issue 14 outside `join`: help, completion, serve's next step, the numbered pick, the config file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmroom_cli.hub import RunningHub
from tests.helpers import cli
from tests.pty_helpers import PtyProcess, plain

MINE = ["create", "list", "leave", "hubs", "doctor", "serve"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_scripts_print_in_clicks_spelling_and_typers(
    shell: str, clean_env: dict[str, str]
) -> None:
    for value in (f"{shell}_source", f"source_{shell}"):
        r = cli(env={**clean_env, "_LLMROOM_COMPLETE": value})
        assert r.returncode == 0, r.stderr
        assert "not supported" not in r.stderr
        assert "_LLMROOM_COMPLETE=complete_" + shell in r.stdout, r.stdout[:400]


def test_completion_completes_command_names(clean_env: dict[str, str]) -> None:
    env = {**clean_env, "_LLMROOM_COMPLETE": "complete_bash", "COMP_WORDS": "llmroom li", "COMP_CWORD": "1"}
    r = cli(env=env)
    assert r.returncode == 0, r.stderr
    assert "list" in r.stdout.split()


def test_install_completion_is_offered_in_help() -> None:
    assert "--install-completion" in cli("--help").stdout


def test_bare_llmroom_on_a_terminal_prints_help_once(clean_env: dict[str, str]) -> None:
    p = PtyProcess(env=clean_env, cols=100)
    try:
        assert p.wait() == 0
        assert plain(p.text).count("Usage: llmroom") == 1
    finally:
        p.close()
    assert cli().stdout.count("Usage: llmroom") == 1  # piped too


@pytest.mark.parametrize("command", MINE)
def test_help_has_examples_real_defaults_and_no_stray_spaces(command: str, clean_env: dict[str, str]) -> None:
    p = PtyProcess(command, "--help", env=clean_env, cols=200)
    try:
        assert p.wait() == 0
        text = plain(p.text)
    finally:
        p.close()
    assert "Examples:" in text and f"llmroom {command}" in text.split("Examples:", 1)[1]
    # A `[default: ...]` inside a help string is eaten as rich markup: "network ." was left behind.
    assert not re.search(r"\w \.", text), re.findall(r".{30}\w \..{10}", text)
    if command in ("create", "list", "leave", "doctor"):
        assert re.search(r"default: \(?http://localhost:3000", text), text


def test_serve_prints_usable_addresses_and_the_next_step() -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", "serve", "--host", "0.0.0.0", "--port", "0", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert serve.stderr is not None
    try:
        lines = [serve.stderr.readline() for _ in range(3)]
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
    assert lines[0].startswith("llmroom hub listening on http://0.0.0.0:"), lines
    port = lines[0].split()[4].rsplit(":", 1)[1]
    assert lines[1].startswith("reachable at ") and f"http://127.0.0.1:{port}" in lines[1]
    assert "0.0.0.0" not in lines[1] and "0.0.0.0" not in lines[2]
    assert lines[2].startswith("next: llmroom create NAME --hub http://") and "llmroom join CODE" in lines[2]


def test_the_numbered_pick_accepts_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmroom_cli import cli as cli_module
    from llmroom_cli.errors import UsageError

    labels = ["alpha-chat (loaded)", "beta-chat", "gamma-chat"]
    answers = iter(["chat", "GAMMA-CHAT"])  # ambiguous prefix: asked again; then a name in any case
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert cli_module._pick("t", labels, "Share which one?", UsageError("none")) == 2
    answers = iter(["alpha"])  # a unique prefix
    assert cli_module._pick("t", labels, "Share which one?", UsageError("none")) == 0
    hubs = ["gambi-hub-3000 at http://10.0.0.5:3000", "gambiarra-hub-3000 at http://10.0.0.6:3000"]
    answers = iter(["gambiarra-hub-3000"])
    assert cli_module._pick("t", hubs, "Use which one?", UsageError("none")) == 1


def _config(text: str) -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "llmroom" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_config_file_names_the_hub_and_env_and_flags_win(
    hub: RunningHub, clean_env: dict[str, str]
) -> None:
    hub.state.create_room("from config")
    _config(f'hub = "{hub.url}"\nnickname = "alice"\nendpoitn = "x"\n')
    r = cli("list", env=clean_env)
    assert r.returncode == 0, r.stderr
    assert "from config" in r.stdout
    assert "unknown key 'endpoitn' (did you mean endpoint?)" in r.stderr
    down = "http://127.0.0.1:1"
    assert cli("list", env={**clean_env, "LLMROOM_HUB": down}).returncode == 5  # the variable wins
    assert cli("list", "--hub", down, env=clean_env).returncode == 5  # and the flag
    report = json.loads(cli("doctor", "--json", "-e", "http://127.0.0.1:9", env=clean_env).stdout)
    assert report["hub"]["url"] == hub.url and report["hub"]["reachable"] is True
    assert report["user_config"]["values"] == {"hub": hub.url, "nickname": "alice"}


def test_a_broken_config_file_is_one_line_and_exit_2(clean_env: dict[str, str]) -> None:
    path = _config("hub = \n")
    r = cli("list", env=clean_env)
    assert r.returncode == 2
    assert r.stderr.startswith("error: the config file") and str(path) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_load_user_config_for_the_join_side(tmp_path: Path) -> None:
    from llmroom_cli.options import load_user_config

    assert load_user_config(tmp_path / "none.toml") == {}
    path = tmp_path / "c.toml"
    path.write_text('model = "llama3.2"\nendpoint = "http://localhost:8080"\n')
    warned: list[str] = []
    assert load_user_config(path, warned.append) == {"model": "llama3.2", "endpoint": "http://localhost:8080"}
    assert warned == []


def test_unknown_generation_keys_warn_with_the_closest_known_one() -> None:
    from llmroom_cli.options import parse_config

    warned: list[str] = []
    cfg = parse_config(["temprature=0.7", "top_p=0.9", "zzz=1"], warn=warned.append)
    assert cfg == {"temprature": 0.7, "top_p": 0.9, "zzz": 1}  # still sent: hubs keep them
    assert warned == [
        "unknown config key 'temprature' (did you mean temperature?); sent anyway",
        "unknown config key 'zzz'; sent anyway",
    ]


def test_short_ids_stay_unique_and_typeable() -> None:
    import uuid

    from llmroom_cli.render import short_ids

    assert short_ids(["aaaa1111-x", "aaaa1112-y", "b"]) == ["aaaa1111…", "aaaa1112…", "b"]
    assert short_ids(["4f1c9a2e-aaaa", "4f1c9a2e-bbbb"]) == ["4f1c9a2e-a…", "4f1c9a2e-b…"]
    ids = [str(uuid.uuid4()) for _ in range(10_000)]  # a big room: sorted neighbours, not n squared
    shown = [s.removesuffix("…") for s in short_ids(ids)]
    assert all(full.startswith(s) for full, s in zip(ids, shown, strict=True))
    assert all(sum(1 for full in ids if full.startswith(s)) == 1 for s in shown[:50])
