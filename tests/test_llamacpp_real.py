"""Against the real thing: llama.cpp's server (xllamacpp wheel) with a tiny random-weight model.

Probe (kind, version, context, quantization, sleep), plain and streamed chat through the relay core,
the share relay and the embedded hub, the API-key case, and a server killed with SIGKILL and started
again on the same port. Skips with a reason only where the xllamacpp/gguf wheels are missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmroom_cli.endpoints import probe
from llmroom_cli.errors import EndpointError
from llmroom_cli.options import parse_headers
from llmroom_cli.relay import RelayCore, ShareRelay
from tests.helpers import wait_for
from tests.llamacpp_real import LlamaServer, make_tiny_gguf, xllamacpp_missing

pytestmark = pytest.mark.slow

N_TOKENS = 5


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = xllamacpp_missing()
    if reason:
        pytest.skip(reason)
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-random-llama.gguf")


@pytest.fixture(scope="module")
def llama(tiny_model: Path) -> Iterator[LlamaServer]:
    with LlamaServer(tiny_model) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=8)) as client:
        yield client


def chat(stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": "tiny",  # the hub routes by it; single-model llama.cpp ignores it
        "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": N_TOKENS,
        "ignore_eos": True,  # llama.cpp: exactly max_tokens tokens, even from random weights
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def sse_events(raw: bytes) -> list[Any]:
    lines = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    assert lines[-1] == b"[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_probe_names_llamacpp_with_version_context_and_quantization(
    llama: LlamaServer, http: httpx.Client
) -> None:
    info = probe(http, llama.url)
    assert (info.kind, info.status) == ("llamacpp", "ready")
    assert info.version  # the wheel's build string
    [model] = info.models
    assert model.loaded is True and model.embedding is False
    assert (model.context_length, model.quantization) == (llama.n_ctx, "Q8_0")


def test_plain_and_streamed_chat_through_the_core(llama: LlamaServer, http: httpx.Client) -> None:
    events: list[dict[str, Any]] = []
    core = RelayCore(llama.url, http, on_request=events.append)
    with core.open("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, chat()) as up:
        assert up.status == 200 and not up.stream
        answer = json.loads(b"".join(up))
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == N_TOKENS
    with core.open("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, chat(True)) as up:
        assert up.status == 200 and up.stream
        chunks = list(up)
    assert len(chunks) > 1  # chunk by chunk as the server sends them, not one buffered body
    streamed = sse_events(b"".join(chunks))
    assert streamed[-1]["usage"]["completion_tokens"] == N_TOKENS
    plain_event, stream_event = events
    assert plain_event["tokens"] == N_TOKENS and plain_event["status"] == 200
    assert stream_event["tokens"] == N_TOKENS and stream_event["stream"] is True
    assert stream_event["ttft_ms"] is not None
    traffic = core.traffic
    assert (traffic.served, traffic.failed, traffic.in_flight) == (2, 0, 0)
    assert traffic.last_tokens_per_s is not None and traffic.last_tokens_per_s > 0
    # The admin and native routes of the server stay out of reach.
    for method, path in (("GET", "/props"), ("POST", "/slots/0?action=erase"), ("GET", "/metrics")):
        with core.open(method, path) as up:
            assert up.status == 404


def test_chat_through_the_share_relay_and_the_embedded_hub(
    llama: LlamaServer, http: httpx.Client, hub: Any
) -> None:
    core = RelayCore(llama.url, http)
    with (
        ShareRelay(core, "127.0.0.1", ["127.0.0.1"]) as relay,
        httpx.Client(trust_env=False, timeout=30) as user,
    ):
        direct = user.post(relay.url + "/v1/chat/completions", content=chat())
        assert direct.status_code == 200 and direct.json()["usage"]["completion_tokens"] == N_TOKENS
        code = user.post(hub.url + "/rooms", json={"name": "real"}).json()["room"]["code"]
        joined = user.post(
            f"{hub.url}/rooms/{code}/join",
            json={"id": "p-real", "nickname": "llama", "model": "tiny", "endpoint": relay.url},
        )
        assert joined.status_code == 201, joined.text
        url = f"{hub.url}/rooms/{code}/v1/chat/completions"
        plain = user.post(url, content=chat(), headers={"Content-Type": "application/json"})
        assert plain.status_code == 200, plain.text
        assert plain.json()["usage"]["completion_tokens"] == N_TOKENS
        with user.stream("POST", url, content=chat(True), headers={"Content-Type": "application/json"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(r.iter_raw())
        assert sse_events(raw)[-1]["usage"]["completion_tokens"] == N_TOKENS
    assert core.traffic.served == 3


def test_api_key_server_needs_the_relays_key(tiny_model: Path, http: httpx.Client) -> None:
    with LlamaServer(tiny_model, api_key="sk-llama-test") as server:
        with pytest.raises(EndpointError, match="wants an API key") as info:
            probe(http, server.url)
        assert "sk-llama-test" not in str(info.value)
        creds = parse_headers([], [], "sk-llama-test")
        assert probe(http, server.url, credentials=creds).models[0].quantization == "Q8_0"
        bare = RelayCore(server.url, http)
        with bare.open("POST", "/v1/chat/completions", {}, chat()) as up:
            assert up.status == 401
            b"".join(up)
        keyed = RelayCore(server.url, http, credentials=creds)
        # The room's own Authorization is replaced by the local key.
        with keyed.open("POST", "/v1/chat/completions", {"Authorization": "Bearer room"}, chat()) as up:
            assert up.status == 200
            assert json.loads(b"".join(up))["usage"]["completion_tokens"] == N_TOKENS


def test_killed_server_calls_on_server_down_and_answers_again_after_restart(
    tiny_model: Path, http: httpx.Client
) -> None:
    downs: list[float] = []
    server = LlamaServer(tiny_model).start()
    try:
        core = RelayCore(server.url, http, on_server_down=lambda: downs.append(1.0))
        with core.open("POST", "/v1/chat/completions", {}, chat()) as up:
            assert up.status == 200
            b"".join(up)
        server.kill()  # SIGKILL: no goodbye
        assert not core.ping()
        with core.open("POST", "/v1/chat/completions", {}, chat()) as up:
            assert up.status == 502
            assert json.loads(b"".join(up))["error"]["type"] == "server_down"
        assert downs == [1.0]
        assert core.traffic.failed == 1 and "not answering" in (core.traffic.last_error or "")
        server.start()  # the same port again
        assert core.ping()
        with core.open("POST", "/v1/chat/completions", {}, chat(True)) as up:
            assert up.status == 200
            assert sse_events(b"".join(up))[-1]["usage"]["completion_tokens"] == N_TOKENS
        assert core.traffic.served == 2 and downs == [1.0]
    finally:
        server.kill()


def test_sleep_mode_is_reported_as_not_loaded_and_a_request_wakes_it(
    tiny_model: Path, http: httpx.Client
) -> None:
    with LlamaServer(tiny_model, sleep_idle_s=1) as server:
        assert probe(http, server.url).models[0].loaded is True
        asleep = wait_for(
            lambda: probe(http, server.url).models[0].loaded is False, "llama.cpp to sleep", poll=0.1
        )
        assert asleep
        core = RelayCore(server.url, http)
        with core.open("POST", "/v1/chat/completions", {}, chat()) as up:
            assert up.status == 200
            b"".join(up)
        assert probe(http, server.url).models[0].loaded is True
