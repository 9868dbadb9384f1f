"""`llmroom join` on a v0.1 hub through the agent's share relay, as real processes with real signals:
chats through `/rooms/CODE/v1/chat/completions` of a real embedded hub reach the local server through
the relay (which adds the API key), show as `request` events, are bounded by `--max-concurrent`, and
drain on Ctrl-C; a localhost-only server is shared with a hub on another host (a network namespace),
and `--direct` keeps the old publication and its exit 6."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.http import make_http
from llmroom_cli.hub import RunningHub
from llmroom_cli.standin import MODEL as STANDIN_MODEL
from llmroom_cli.standin import StandIn
from tests.helpers import WAIT_S, Agent, cli, wait_for
from tests.test_reach import Netns, netns, ns_hub  # noqa: F401 - fixtures

KEY = "k-4f9d2c-very-secret"
MODEL = "gated-model"


class GatedLLM:
    """An OpenAI-compatible server on loopback that demands `Authorization: Bearer KEY` (when given
    one) and, while `hold` is set, sends the first chunk of an answer and then waits for `release`."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.hold = False
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)  # one per chat request received
        self.auth_seen: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                auth = self.headers.get("Authorization")
                outer.auth_seen.append(auth)
                if outer.api_key is not None and auth != f"Bearer {outer.api_key}":
                    self._send(401, b'{"error":{"message":"Invalid API Key","type":"authentication_error"}}')
                    return False
                return True

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._send(
                        200,
                        json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode(),
                    )
                else:
                    self._send(404, b'{"error":"not found"}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                if not self._authorised():
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error":"not found"}')
                    return
                body = json.loads(raw or b"{}")
                if not body.get("messages"):
                    self._send(400, b'{"error":{"message":"messages is required"}}')
                    return
                outer.arrived.release()
                if not body.get("stream"):
                    if outer.hold:
                        outer.release.wait(WAIT_S)
                    answer = {
                        "id": "c1",
                        "object": "chat.completion",
                        "model": MODEL,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }
                    self._send(200, json.dumps(answer).encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                for i, word in enumerate(["Hel", "lo", " there"]):
                    event = {"choices": [{"index": 0, "delta": {"content": word}}]}
                    chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                    if i == 0 and outer.hold:
                        outer.release.wait(WAIT_S)
                chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def gated() -> Iterator[GatedLLM]:
    server = GatedLLM(api_key=KEY)
    yield server
    server.stop()


def chat_body(stream: bool = False, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def hub_chat(hub_url: str, room: str, stream: bool = False, model: str = MODEL) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=WAIT_S) as http:
        return http.post(f"{hub_url}/rooms/{room}/v1/chat/completions", json=chat_body(stream, model))


def chat_in_background(hub_url: str, room: str) -> None:
    """A streamed chat that may be cut (the agent exits under it): its outcome is not the point."""

    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):
            hub_chat(hub_url, room, stream=True)

    threading.Thread(target=run, daemon=True).start()


def v01_agent(hub_url: str, room: str, endpoint: str, *extra: str, **kw: Any) -> Agent:
    return Agent(
        room,
        "--hub",
        hub_url,
        "-e",
        endpoint,
        "--hub-api",
        "v0.1",
        "--json",
        "--interval",
        "0.2",
        *extra,
        **kw,
    )


def test_chat_through_the_relay_adds_the_key_streams_and_is_a_request_event(
    hub: RunningHub, gated: GatedLLM, clean_env: dict[str, str]
) -> None:
    room = hub.state.create_room("r")["code"]
    env = {**clean_env, "LLMROOM_API_KEY": KEY}
    a = v01_agent(hub.url, room, gated.url, "--debug", env=env)
    joined = a.wait_event("joined")
    relay_url = joined["endpoint"]
    assert relay_url.startswith("http://127.0.0.1:") and relay_url != gated.url
    (p,) = hub.state.participants(room)
    assert p["endpoint"] == relay_url

    plain = hub_chat(hub.url, room)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "Hello there"
    streamed = hub_chat(hub.url, room, stream=True)
    assert streamed.status_code == 200 and "text/event-stream" in streamed.headers["content-type"]
    assert '"lo"' in streamed.text and "[DONE]" in streamed.text

    first = a.wait_event("request")
    assert first["route"] == "/v1/chat/completions" and first["status"] == 200
    assert first["tokens"] == 2 and first["duration_ms"] >= 0 and first["stream"] is False
    second = a.wait_event("request", count=2)
    assert second["stream"] is True and second["tokens"] == 3 and second["ttft_ms"] is not None
    assert "Hello" not in json.dumps(a.events)  # never the answer's text
    # The relay added the key to every request of the room; the room never sent it.
    assert gated.auth_seen and all(seen == f"Bearer {KEY}" for seen in gated.auth_seen)
    # The admin API is not reachable through the relay, even from an allowed peer.
    with httpx.Client(trust_env=False, timeout=5) as http:
        assert http.post(relay_url + "/api/pull", json={"name": "x"}).status_code == 404

    # The state file: both requests counted, and no key in it.
    def status() -> str | None:
        out = cli("status", "--json", env=env).stdout
        return out if '"requests_served":2' in out.replace(" ", "") else None

    assert KEY not in wait_for(status, "status to count both requests", poll=0.1)
    a.signal()
    assert a.finish() == 0, a.stderr
    assert KEY not in a.stderr and KEY not in "\n".join(a.raw)
    assert "debug: httpx" in a.stderr  # the trace ran, and the key is not in it
    assert hub.state.participants(room) == []


def test_the_key_as_an_option_is_never_printed_and_a_wrong_one_is_exit_6(
    hub: RunningHub, gated: GatedLLM
) -> None:
    room = hub.state.create_room("r")["code"]
    r = cli("join", room, "--hub", hub.url, "-e", gated.url, "--api-key", "wrong-key-123", "--debug")
    assert r.returncode == 6 and "rejected the API key" in r.stderr
    assert "wrong-key-123" not in r.stderr + r.stdout
    r = cli("join", room, "--hub", hub.url, "-e", gated.url)
    assert r.returncode == 6 and "wants an API key" in r.stderr


def test_max_concurrent_1_answers_429_to_a_second_request(hub: RunningHub, gated: GatedLLM) -> None:
    room = hub.state.create_room("r")["code"]
    a = v01_agent(hub.url, room, gated.url, "--api-key", KEY, "--max-concurrent", "1")
    a.wait_event("joined")
    gated.hold = True
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(hub_chat(hub.url, room, stream=True)))
    first.start()
    assert gated.arrived.acquire(timeout=WAIT_S)
    second = hub_chat(hub.url, room)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "rate_limit"
    rejected = a.wait_event("request")  # the 429 ends first: the stream is still held
    assert rejected["status"] == 429 and rejected["tokens"] is None
    gated.release.set()
    first.join(WAIT_S)
    assert results[0].status_code == 200 and "[DONE]" in results[0].text
    assert a.wait_event("request", count=2)["status"] == 200
    a.signal()
    assert a.finish() == 0, a.stderr


def test_ctrl_c_leaves_then_lets_the_stream_in_flight_finish(hub: RunningHub, gated: GatedLLM) -> None:
    room = hub.state.create_room("r")["code"]
    a = v01_agent(hub.url, room, gated.url, "--api-key", KEY, "--drain", "20")
    a.wait_event("joined")
    gated.hold = True
    results: list[httpx.Response] = []
    inflight = threading.Thread(target=lambda: results.append(hub_chat(hub.url, room, stream=True)))
    inflight.start()
    assert gated.arrived.acquire(timeout=WAIT_S)
    a.signal(signal.SIGINT)
    draining = a.wait_event("draining")
    assert draining["in_flight"] == 1
    # The room was left first: the hub no longer lists us while the answer is still streaming.
    wait_for(lambda: hub.state.participants(room) == [], "the participant gone while draining")
    gated.release.set()
    inflight.join(WAIT_S)
    assert results and results[0].status_code == 200 and "[DONE]" in results[0].text
    assert a.finish() == 0, a.stderr
    assert a.names()[-3:] == ["draining", "request", "left"]  # the answer is reported before `left`
    assert a.events[-1]["confirmed"] is True
    done = [e for e in a.events if e["event"] == "request"]
    assert done and done[0]["status"] == 200 and done[0]["tokens"] == 3


def test_a_second_ctrl_c_during_the_drain_exits_at_once(hub: RunningHub, gated: GatedLLM) -> None:
    room = hub.state.create_room("r")["code"]
    a = v01_agent(hub.url, room, gated.url, "--api-key", KEY, "--drain", "60")
    a.wait_event("joined")
    gated.hold = True
    chat_in_background(hub.url, room)
    assert gated.arrived.acquire(timeout=WAIT_S)
    a.signal()
    a.wait_event("draining")
    a.signal()
    assert a.finish() == 130
    assert "interrupted again" in a.stderr


@pytest.mark.parametrize(
    "extra",
    [["--hub-api", "v9"], ["--hub-api", "v0.6", "--direct"], ["--max-concurrent", "0"], ["--drain", "-1"]],
)
def test_bad_share_options_are_exit_2_before_any_network(extra: list[str]) -> None:
    r = cli("join", "ABC123", "--hub", "http://127.0.0.1:9", "-e", "http://127.0.0.1:9", *extra)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


def test_bad_header_options_never_show_the_value(clean_env: dict[str, str]) -> None:
    r = cli("join", "ABC123", "-e", "http://127.0.0.1:9", "--header", "Bad Name=s3cr3t-value")
    assert r.returncode == 2 and "s3cr3t-value" not in r.stderr
    r = cli("probe", "http://127.0.0.1:9", "--header-env", "X-Token=LLMROOM_TEST_UNSET_VAR")
    assert r.returncode == 2 and "LLMROOM_TEST_UNSET_VAR is not set" in r.stderr


def test_probe_and_doctor_take_the_key(gated: GatedLLM, hub: RunningHub) -> None:
    assert cli("probe", gated.url).returncode == 6
    r = cli("probe", gated.url, "--api-key", KEY, "--json")
    assert r.returncode == 0, r.stderr
    assert MODEL in r.stdout and KEY not in r.stdout
    r = cli("doctor", "--hub", hub.url, "-e", gated.url, "--header", f"Authorization=Bearer {KEY}", "--json")
    assert KEY not in r.stdout + r.stderr
    assert MODEL in r.stdout


# -- a hub on another host: a network namespace ------------------------------------------------------


def test_a_localhost_only_server_is_shared_with_a_remote_hub_through_the_relay(
    netns: Netns,  # noqa: F811
    ns_hub: str,  # noqa: F811
) -> None:
    with StandIn() as llm:  # listens on 127.0.0.1 only
        room = HubClient(make_http(ns_hub), ns_hub).create_room("remote")["room"]["code"]
        # --direct: the old publication, its check and its fix hint (exit 6).
        direct = cli("join", room, "--hub", ns_hub, "-e", llm.url, "--hub-api", "v0.1", "--direct")
        assert direct.returncode == 6, direct.stderr
        assert "only listens on this machine" in direct.stderr and "OLLAMA_HOST" in direct.stderr
        a = v01_agent(ns_hub, room, llm.url)
        relay_url = a.wait_event("joined")["endpoint"]
        assert relay_url.startswith(f"http://{netns.host_addr}:"), relay_url
        # The hub, in its own namespace, reaches the server through the relay.
        answer = hub_chat(ns_hub, room, model=STANDIN_MODEL)
        assert answer.status_code == 200, answer.text
        assert "Hello" in answer.json()["choices"][0]["message"]["content"]
        assert a.wait_event("request")["status"] == 200
        # Anyone but the hub is refused by the relay (here: this machine itself).
        with httpx.Client(trust_env=False, timeout=5) as http:
            assert http.get(relay_url + "/v1/models").status_code == 403
        a.signal()
        assert a.finish() == 0, a.stderr
