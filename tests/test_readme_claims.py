"""README claims that no other test covered: the default 10 s interval, exit 1 for an unexpected
error, `probe` with no URL, `demo --endpoint`, `serve --participant-timeout` and `--host`, and the
numbered hub pick and the password question for a hub found on the LAN (on a real terminal)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmroom_cli.server import RunningHub
from llmroom_cli.standin import StandIn
from tests.helpers import WAIT_S, Agent, cli, wait_for
from tests.netns_helpers import own_network, standin_in
from tests.pty_helpers import PtyProcess, plain


@pytest.fixture
def net() -> Iterator[list[str]]:
    with own_network() as prefix:
        if prefix is None:
            pytest.skip("needs a network namespace of its own (root and iproute2)")
        yield prefix


INTERVAL_PROBE = (
    "import sys\n"
    "from llmroom_cli import session\n"
    "def run_session(s, wake, on_started=None, **kw):\n"
    "    first = session.Schedule(0.0, s.plan.interval_s).next_deadline(0.0)\n"
    "    print('interval', s.plan.interval_s, 'first beat at', first, flush=True)\n"
    "    return session.Outcome()\n"
    "session.run_session = run_session\n"
    "from llmroom_cli.cli import main\n"
    "sys.argv = ['llmroom', *sys.argv[1:]]\n"
    "main()\n"
)


def test_the_default_interval_is_10_s(hub: RunningHub) -> None:
    """The scheduled interval, read where the session gets it, without waiting 10 s."""
    room = hub.state.create_room("r")["code"]
    with StandIn() as llm:
        r = subprocess.run(
            [sys.executable, "-c", INTERVAL_PROBE, "join", room, "--hub", hub.url, "-e", llm.url, "--quiet"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "interval 10.0 first beat at 10.0\n"


UNEXPECTED = (
    "import sys\n"
    "import llmroom_cli.specs as specs\n"
    "def broken(*a, **k):\n"
    "    raise RuntimeError('a bug, not a user error')\n"
    "specs.detect_specs = broken\n"
    "from llmroom_cli.cli import main\n"
    "sys.argv = ['llmroom', *sys.argv[1:]]\n"
    "main()\n"
)


def test_an_unexpected_error_is_exit_1_in_one_line() -> None:
    run = [sys.executable, "-c", UNEXPECTED, "specs"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=WAIT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr == (
        "error: unexpected RuntimeError: a bug, not a user error (run with --debug for a traceback)\n"
    )
    debug = subprocess.run([*run, "--debug"], capture_output=True, text=True, timeout=WAIT_S)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_probe_without_url_searches_the_usual_ports(net: list[str]) -> None:
    r = cli("probe", prefix=net)
    assert r.returncode == 6
    assert "no LLM server answers on the usual local ports (11434, 1234, 8080, 9931, 8000)" in r.stderr
    with standin_in(net, port=1234):
        r = cli("probe", "--json", prefix=net)
    assert r.returncode == 0, r.stderr
    assert '"url":"http://127.0.0.1:1234"' in r.stdout.replace(
        " ", ""
    ) and '"kind":"ollama"' in r.stdout.replace(" ", "")


def test_demo_shares_a_real_endpoint() -> None:
    with StandIn() as llm:
        r = cli("demo", "--endpoint", llm.url, "--duration", "1", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert f"sharing a real local server at {llm.url}" in r.stdout
    assert "the participant answered" in r.stdout and "left the room" in r.stdout


def test_serve_host_and_participant_timeout() -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "llmroom_cli", "serve", "--host", "127.0.0.2", "--port", "0"]
        + ["--participant-timeout", "0.5", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert serve.stderr is not None
    try:
        line = serve.stderr.readline()
        assert line.startswith("llmroom hub listening on http://127.0.0.2:"), line
        url = line.split()[4]
        port = int(url.rsplit(":", 1)[1])
        # --host: it listens there and only there.
        assert cli("list", "--hub", f"http://127.0.0.1:{port}").returncode == 5
        code = cli("create", "r", "--hub", url).stdout.strip()
        with StandIn() as llm:
            a = Agent(code, "--hub", url, "-e", llm.url, "--json", "--interval", "0.1")
            a.wait_event("heartbeat")
            a.proc.kill()  # a crash: no leave, no more heartbeats
            a.proc.wait()

            def status() -> str:
                out = cli("list", code, "--hub", url).stdout
                return out.split("\t")[3] if out else ""

            # --participant-timeout 0.5: offline soon after the beats stop (the default is 30 s).
            wait_for(lambda: status().startswith("offline"), "the participant offline", timeout=20)
            a.kill()
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=WAIT_S)
    assert serve.returncode == 0


def _serve_mdns(net: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*net, sys.executable, "-m", "llmroom_cli", "serve", "--port", "0", "--mdns", "--quiet"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def _wait_announced(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    url = ""
    for line in proc.stderr:
        if line.startswith("llmroom hub listening on "):
            url = line.split()[4]
        if line.startswith("announced as"):
            return url
        if line.startswith("warning"):
            pytest.skip(f"multicast announce failed here: {line.strip()}")
    raise AssertionError("serve --mdns did not announce")


def test_numbered_hub_pick_and_the_password_question_on_a_terminal(
    net: list[str], clean_env: dict[str, str]
) -> None:
    hubs = [_serve_mdns(net), _serve_mdns(net)]
    ptys: list[PtyProcess] = []
    try:
        urls = [_wait_announced(h) for h in hubs]
        made = cli("create", "lan", "--hub", urls[1], "--password-stdin", input="hunter22\n", prefix=net)
        code = made.stdout.strip()
        assert made.returncode == 0, made.stderr
        with standin_in(net) as llm:
            # --hub auto on a terminal: a numbered pick of the hubs that answer.
            p = PtyProcess("list", "--hub", "auto", env=clean_env, prefix=net)
            ptys.append(p)
            p.expect(r"Use which one\? \[1-2\]")
            screen = plain(p.text)
            assert urls[0] in screen and urls[1] in screen
            pick = next(i for i in (1, 2) if f"{i}. " in screen and urls[1] in screen.split(f"{i}. ")[1][:80])
            p.send(f"{pick}\r")
            assert p.wait() == 0
            assert code in plain(p.text)
            # The implicit fallback on a terminal asks before sending the password, naming the hub.
            env = dict(clean_env, LLMROOM_PASSWORD="hunter22")
            q = PtyProcess("join", code, "-e", llm, "--interval", "0.1", "--no-specs", env=env, prefix=net)
            ptys.append(q)
            q.expect(r"Use which one\? \[1-2\]")
            screen = plain(q.text)
            pick = next(i for i in (1, 2) if urls[1] in screen.split(f"{i}. ")[1][:80])
            q.send(f"{pick}\r")
            q.expect(r"send the room password to hub \S+ at " + urls[1].replace(".", r"\.") + r".*\[y/N\]")
            q.send("y\r")
            q.expect(r"Ctrl-C to leave")
            q.proc.send_signal(signal.SIGINT)
            assert q.wait() == 0
    finally:
        for p in ptys:
            p.close()
        for h in hubs:
            h.send_signal(signal.SIGINT)
            h.communicate(timeout=WAIT_S)
