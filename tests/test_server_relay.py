"""`POST /rooms/:code/v1/chat/completions`: routing, relaying (plain and streamed as it arrives),
proxy failures, and the llm:* events, against tiny fake OpenAI servers on ephemeral ports."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llmroom_cli.hub import NO_PARTICIPANT, RunningHub
from tests.helpers import WAIT_S
from tests.test_server_contract import SSE, Http, dead_port, member


class FakeLLM:
    """An OpenAI-compatible server that records requests and answers as the test says.

    A streamed answer sends its first chunk, then waits for `release` (set by the test) before the rest,
    so a test can see the first chunk arrive through the hub while the upstream is still mid-answer.
    """

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.release = threading.Event()
        self.finished = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                fake.requests.append((self.path, body))
                if body.get("stream"):
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    self.wfile.write(b'data: {"delta": "first"}\n\n')
                    self.wfile.flush()
                    fake.release.wait(WAIT_S)
                    self.wfile.write(b'data: {"delta": "second"}\n\ndata: [DONE]\n\n')
                    self.wfile.flush()
                    fake.finished.set()
                    return
                answer = json.dumps({"who": fake.name, "model": body.get("model")}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(WAIT_S)


@pytest.fixture
def api(hub: RunningHub) -> Iterator[Http]:
    client = Http(hub)
    yield client
    client.close()


@pytest.fixture
def llms() -> Iterator[tuple[FakeLLM, FakeLLM]]:
    a, b = FakeLLM("A"), FakeLLM("B")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def room(hub: RunningHub, api: Http, llms: tuple[FakeLLM, FakeLLM]) -> str:
    code: str = hub.state.create_room("chat")["code"]
    a, b = llms
    assert api("POST", f"/rooms/{code}/join", member("pa", model="llama", endpoint=a.url)).status == 201
    assert api("POST", f"/rooms/{code}/join", member("pb", model="qwen", endpoint=b.url + "/")).status == 201
    return code


def chat(api: Http, code: str, **body: Any) -> Any:
    return api(
        "POST",
        f"/rooms/{code}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], **body},
    )


def test_relays_with_the_participants_model(api: Http, room: str, llms: tuple[FakeLLM, FakeLLM]) -> None:
    a, _ = llms
    r = chat(api, room, model="pa", temperature=0.3)
    assert (r.status, r.json()) == (200, {"who": "A", "model": "llama"})
    assert r.headers["access-control-allow-origin"] == "*"
    path, body = a.requests[-1]
    assert path == "/v1/chat/completions"
    assert body == {"messages": [{"role": "user", "content": "hi"}], "model": "llama", "temperature": 0.3}


@pytest.mark.parametrize(
    ("model", "who"), [("pa", "A"), ("pb", "B"), ("llama", "A"), ("qwen", "B"), ("model:qwen", "B")]
)
def test_routing(api: Http, room: str, model: str, who: str) -> None:
    assert chat(api, room, model=model).json()["who"] == who


@pytest.mark.parametrize("model", ["*", "any"])
def test_any_goes_to_an_online_participant(hub: RunningHub, api: Http, room: str, model: str) -> None:
    assert {chat(api, room, model=model).json()["who"] for _ in range(20)} <= {"A", "B"}
    hub.state.sweep(0.0)
    api("POST", f"/rooms/{room}/health", {"id": "pb"})
    assert {chat(api, room, model=model).json()["who"] for _ in range(5)} == {"B"}


@pytest.mark.parametrize("model", ["nobody", "model:pa", "model:nobody", ""])
def test_no_match_is_404(api: Http, room: str, model: str) -> None:
    r = chat(api, room, model=model)
    assert (r.status, r.error) == (404, NO_PARTICIPANT)
    assert NO_PARTICIPANT == "No available participant for the requested model"


def test_missing_model_is_404_and_a_non_string_model_is_400(api: Http, room: str) -> None:
    r = chat(api, room)
    assert (r.status, r.error) == (404, NO_PARTICIPANT)
    assert chat(api, room, model=7).status == 400


def test_offline_participant(hub: RunningHub, api: Http, room: str) -> None:
    hub.state.sweep(0.0)
    r = chat(api, room, model="pa")
    assert (r.status, r.error) == (503, "Participant is offline")
    for model in ("llama", "model:llama", "*", "any"):
        r = chat(api, room, model=model)
        assert (r.status, r.error) == (404, NO_PARTICIPANT)


def test_upstream_status_and_body_are_relayed(hub: RunningHub, api: Http) -> None:
    teapot = FakeLLM("T", status=418)
    try:
        code = hub.state.create_room("r")["code"]
        api("POST", f"/rooms/{code}/join", member("t", endpoint=teapot.url + "/prefix"))
        r = chat(api, code, model="t")
        assert (r.status, r.json()) == (418, {"who": "T", "model": "llama3.2:3b"})
        assert teapot.requests[-1][0] == "/prefix/v1/chat/completions"
        assert api("GET", "/health").status == 200
    finally:
        teapot.stop()


def test_endpoint_down_is_502_with_llm_events(hub: RunningHub, api: Http) -> None:
    code = hub.state.create_room("r")["code"]
    api("POST", f"/rooms/{code}/join", member("gone", model="m", endpoint=f"http://127.0.0.1:{dead_port()}"))
    events = SSE(hub, code)
    events.until("connected")
    r = chat(api, code, model="gone")
    assert r.status == 502 and r.error.startswith("Failed to proxy request: ") and len(r.error) > 25
    assert events.until("llm:request") == {"participantId": "gone", "model": "m"}
    error = events.until("llm:error")
    assert error["participantId"] == "gone" and isinstance(error["error"], str) and error["error"]
    events.close()


def test_stream_is_relayed_as_it_arrives(hub: RunningHub, room: str, llms: tuple[FakeLLM, FakeLLM]) -> None:
    a, _ = llms
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
    body = {"model": "pa", "stream": True, "messages": []}
    conn.request("POST", f"/rooms/{room}/v1/chat/completions", body=json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    first = b""
    while b"\n\n" not in first:
        first += resp.read1(65536)
    # The upstream is still waiting for the test's go-ahead: the hub did not buffer the answer.
    assert first == b'data: {"delta": "first"}\n\n'
    assert not a.finished.is_set()
    a.release.set()
    rest = resp.read()
    assert rest == b'data: {"delta": "second"}\n\ndata: [DONE]\n\n'
    assert a.requests[-1][1]["model"] == "llama"
    # the connection stays usable after a chunked relay
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_stream_false_or_absent_is_buffered_json(api: Http, room: str) -> None:
    r = chat(api, room, model="pb", stream=False)
    assert r.status == 200 and r.json()["who"] == "B"


def test_stop_cuts_a_stream_in_progress(room: str, hub: RunningHub, llms: tuple[FakeLLM, FakeLLM]) -> None:
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
    conn.request(
        "POST", f"/rooms/{room}/v1/chat/completions", body=json.dumps({"model": "pb", "stream": True})
    )
    resp = conn.getresponse()
    assert resp.read1(65536).startswith(b"data:")
    hub.stop()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
