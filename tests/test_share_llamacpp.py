"""`llmroom join` sharing a real llama.cpp server that wants an API key, on both hub generations:
the key goes with `--api-key` (the room never has it), chats through the embedded hub are answered
by llama.cpp, and each shows as a `request` event with the tokens llama.cpp counted."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli.hub import RunningHub
from tests.helpers import WAIT_S, Agent
from tests.llamacpp_real import LlamaServer, make_tiny_gguf, xllamacpp_missing

pytestmark = pytest.mark.slow

KEY = "llama-key-7c1e"
N_TOKENS = 5


@pytest.fixture(scope="module")
def keyed_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    reason = xllamacpp_missing()
    if reason:
        pytest.skip(reason)
    model = make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-random-llama.gguf")
    with LlamaServer(model, api_key=KEY) as server:
        yield server


def body(model: str, stream: bool) -> dict[str, Any]:
    chat: dict[str, Any] = {
        "model": model,  # the hub routes by the model the agent joined with
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": N_TOKENS,
        "ignore_eos": True,  # exactly max_tokens tokens, even from random weights
        "stream": stream,
    }
    if stream:
        chat["stream_options"] = {"include_usage": True}
    return chat


@pytest.mark.parametrize("hub_api", ["v0.1", "v0.6"])
def test_a_keyed_llamacpp_server_is_shared_through_the_agent(
    hub: RunningHub, keyed_llama: LlamaServer, hub_api: str
) -> None:
    room = hub.state.create_room("llama")["code"]
    args = ["--hub", hub.url, "-e", keyed_llama.url, "--hub-api", hub_api, "--api-key", KEY]
    a = Agent(room, *args, "--json", "--interval", "0.2", "--debug")
    joined = a.wait_event("joined", timeout=WAIT_S)
    assert joined.get("protocol", "v0.1") == hub_api
    with httpx.Client(trust_env=False, timeout=WAIT_S) as http:
        url = f"{hub.url}/rooms/{room}/v1/chat/completions"
        plain = http.post(url, json=body(joined["model"], False))
        assert plain.status_code == 200, plain.text
        assert plain.json()["usage"]["completion_tokens"] == N_TOKENS
        streamed = http.post(url, json=body(joined["model"], True))
        assert streamed.status_code == 200, streamed.text
        assert streamed.text.rstrip().endswith("data: [DONE]")
    first, second = a.wait_event("request"), a.wait_event("request", count=2)
    assert first["status"] == 200 and first["tokens"] == N_TOKENS and first["stream"] is False
    assert second["stream"] is True and second["tokens"] == N_TOKENS and second["ttft_ms"] is not None
    a.signal(signal.SIGINT)
    assert a.finish() == 0, a.stderr
    assert KEY not in a.stderr and KEY not in "\n".join(a.raw)
    assert json.dumps(a.events).count("hello world") == 0


def test_killing_the_llamacpp_server_pauses_and_restarting_it_resumes(
    hub: RunningHub, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reason = xllamacpp_missing()
    if reason:
        pytest.skip(reason)
    model = make_tiny_gguf(tmp_path_factory.mktemp("gguf-kill") / "tiny-random-llama.gguf")
    server = LlamaServer(model).start()
    try:
        room = hub.state.create_room("llama")["code"]
        a = Agent(
            room, "--hub", hub.url, "-e", server.url, "--hub-api", "v0.1", "--json", "--interval", "0.5"
        )
        pid = a.wait_event("joined", timeout=WAIT_S)["id"]
        port = server.port
        server.kill()  # SIGKILL, as a crash
        paused = a.wait_event("paused", timeout=WAIT_S)
        assert paused["cause"] == "server_down"
        assert [p["id"] for p in hub.state.participants(room)] == []  # v0.1: out of the room
        server = LlamaServer(model, port=port).start()
        a.wait_event("resumed", timeout=WAIT_S)
        assert [p["id"] for p in hub.state.participants(room)] == [pid]  # back, same id
        a.signal(signal.SIGINT)
        assert a.finish() == 0, a.stderr
    finally:
        server.kill()
