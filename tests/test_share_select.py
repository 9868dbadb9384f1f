"""`join` choosing what it shares, as a real process: --share, --dry-run, --bench, and the search of
the usual local ports when no --endpoint is given (issue 14 items 1, 14, 15).

These run once `join` has the options (the wiring is the integrator's: see the extras branch report);
before that they skip with that reason. The search tests need a network of their own (root and
iproute2), so that the usual ports hold only the stand-ins started here.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmroom_cli.hub import RunningHub
from llmroom_cli.standin import StandIn
from tests.helpers import Agent, cli, wait_for
from tests.netns_helpers import own_network, standin_in

PASSWORD = "room-secret-7f3a"


@pytest.fixture(scope="module", autouse=True)
def wired() -> None:
    text = cli("join", "--help").stdout
    missing = [o for o in ("--share", "--dry-run", "--bench") if o not in text]
    if missing:
        pytest.skip(f"join has no {', '.join(missing)} yet: wire it as the extras report says")


class RecordingHub:
    """Anything on 127.0.0.1 that records every request it gets (a dry run must send none)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _any(self) -> None:
                seen.append(f"{self.command} {self.path}")
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> RecordingHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def llm() -> Iterator[StandIn]:
    with StandIn() as s:
        yield s


@pytest.fixture
def recording_hub() -> Iterator[RecordingHub]:
    with RecordingHub() as h:
        yield h


def test_dry_run_prints_the_selected_body_redacted_and_contacts_no_hub(
    llm: StandIn, recording_hub: RecordingHub
) -> None:
    env = dict(os.environ, LLMROOM_PASSWORD=PASSWORD)
    r = cli(
        "join", "ABC123", "--hub", recording_hub.url, "-e", llm.url, "--dry-run", "--share", "ram,llm",
        "--bench", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] is True and out["room"] == "ABC123"
    assert {q["hub_api"] for q in out["requests"]} == {"v0.1", "v0.6"}
    for request in out["requests"]:
        body = request["body"]
        assert body["password"] == "***"
        assert body["endpoint"] == (llm.url if request["hub_api"] == "v0.6" else "http://127.0.0.1:PORT")
        assert set(body["specs"]) == {"ram", "llm"}
        assert body["specs"]["llm"]["server"] == "ollama"
        assert body["specs"]["llm"]["ttftMs"] >= 1  # --bench measured the stand-in
    assert recording_hub.requests == []


def test_an_unknown_share_field_is_exit_2_before_any_request(recording_hub: RecordingHub) -> None:
    r = cli("join", "ABC123", "--hub", recording_hub.url, "-e", recording_hub.url, "--share", "gpu,vrm")
    assert (r.returncode, r.stdout) == (2, "")
    assert "unknown field 'vrm'" in r.stderr and "known fields: gpu, vram, ram" in r.stderr
    assert recording_hub.requests == []


def test_the_room_lists_only_the_shared_fields(hub: RunningHub, llm: StandIn) -> None:
    room: str = hub.state.create_room("share")["code"]
    a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", "0.05", "--share", "gpu,ram")
    joined = a.wait_event("joined")
    assert set(joined["specs"]) <= {"gpu", "ram"} and joined["specs"]["ram"] > 0
    (p,) = wait_for(lambda: hub.state.participants(room), "the participant")
    assert set(p["specs"]) <= {"gpu", "ram"}
    a.signal()
    assert a.finish() == 0, a.stderr


# -- no --endpoint: the usual local ports are searched ------------------------------------------------


@pytest.fixture
def net() -> Iterator[list[str]]:
    with own_network() as prefix:
        if prefix is None:
            pytest.skip("needs a network namespace of its own (root and iproute2)")
        yield prefix


def test_without_endpoint_the_one_server_found_is_shared(net: list[str]) -> None:
    with standin_in(net, port=8080):
        r = cli("join", "ABC123", "--dry-run", prefix=net)
    assert r.returncode == 0, r.stderr
    assert "using the ollama server at http://127.0.0.1:8080" in r.stderr
    assert json.loads(r.stdout)["shares"] == "http://127.0.0.1:8080"


def test_without_endpoint_several_servers_off_a_terminal_are_exit_6_listing_them(net: list[str]) -> None:
    with standin_in(net, port=8080), standin_in(net, port=11434):
        r = cli("join", "ABC123", "--dry-run", prefix=net)
    assert (r.returncode, r.stdout) == (6, "")
    assert "2 LLM servers answer on this machine" in r.stderr
    assert "http://127.0.0.1:11434" in r.stderr and "http://127.0.0.1:8080" in r.stderr
    assert "--endpoint URL" in r.stderr


def test_without_endpoint_nothing_answering_points_to_probe(net: list[str]) -> None:
    r = cli("join", "ABC123", "--dry-run", prefix=net)
    assert r.returncode == 6
    assert "no LLM server answers on the usual local ports (11434, 1234, 8080, 9931, 8000)" in r.stderr
    assert "llmroom probe" in r.stderr


def test_several_servers_on_a_terminal_are_a_pick_by_number_or_port(net: list[str]) -> None:
    from tests.pty_helpers import PtyProcess, plain

    with standin_in(net, port=8080), standin_in(net, port=11434):
        p = PtyProcess("join", "ABC123", "--dry-run", env=dict(os.environ), prefix=net, cols=120)
        try:
            p.expect("Share which one")
            assert "1. ollama" in plain(p.text) and "2. ollama" in plain(p.text)
            p.send("ollama\n")  # both are Ollama: that names neither
            p.expect("please type")
            p.send("8080\n")
            assert p.wait() == 0, plain(p.text)
        finally:
            p.close()
    assert "using the ollama server at http://127.0.0.1:8080" in plain(p.text)
    assert '"endpoint": "http://127.0.0.1:8080"' in plain(p.text)
