"""`join --bench`: one short streamed prompt -> time to first token and tokens per second.

The figures are computed from (payload, arrival time) pairs, tested here with exact times; the HTTP
side runs against a streaming fake on an ephemeral port (Ollama-, llama.cpp- and vLLM-shaped chunks,
errors, a stall, a flood), and against the real llama.cpp server where its wheel runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmroom_cli import bench
from llmroom_cli.bench import BenchResult, _Stats, describe, measure
from llmroom_cli.errors import EndpointError


def chunk(text: str | None = None, *, reasoning: str | None = None, usage: int | None = None) -> bytes:
    delta: dict[str, Any] = {}
    if text is not None:
        delta["content"] = text
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    event: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    if usage is not None:
        event = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": usage}}
    return json.dumps(event).encode()


# -- the figures, with exact times ------------------------------------------------------------------


def test_ttft_and_decode_rate_from_chunk_times() -> None:
    stats = _Stats(started=10.0)
    stats.feed(chunk(text=""), 10.05)  # a role-only first chunk carries no token
    for i in range(11):
        stats.feed(chunk(f" {i}"), 10.2 + i * 0.1)  # 11 tokens, 10 gaps of 100 ms
    stats.feed(b" [DONE]", 11.3)
    assert stats.done
    result = stats.result(11.3)
    assert result == BenchResult(
        ttft_ms=200, tokens=11, tokens_per_second=10.0, total_ms=1300, tokens_from="chunks"
    )
    assert result.to_specs() == {"ttftMs": 200, "tokensPerSecond": 10.0}


def test_the_servers_usage_count_wins_over_counting_chunks() -> None:
    stats = _Stats(started=0.0)
    stats.feed(chunk("a b"), 0.5)  # vLLM may batch several tokens in one chunk
    stats.feed(chunk("c d"), 1.5)
    stats.feed(chunk(usage=21), 1.5)
    result = stats.result(1.6)
    assert (result.tokens, result.tokens_from, result.tokens_per_second) == (21, "usage", 20.0)


def test_reasoning_tokens_count_as_the_first_token() -> None:
    stats = _Stats(started=0.0)
    stats.feed(chunk(reasoning="Okay"), 0.3)
    stats.feed(chunk("1"), 0.4)
    assert stats.result(0.5).ttft_ms == 300


def test_an_answer_in_one_burst_has_no_rate() -> None:
    stats = _Stats(started=0.0)
    stats.feed(chunk("1 2 3"), 0.25)
    stats.feed(chunk(usage=3), 0.25)
    result = stats.result(0.3)
    assert (result.ttft_ms, result.tokens_per_second) == (250, None)
    assert result.to_specs() == {"ttftMs": 250}


def test_no_text_or_an_error_event_or_garbage_is_an_endpoint_error() -> None:
    with pytest.raises(EndpointError, match="no text"):
        _Stats(0.0).result(1.0)
    with pytest.raises(EndpointError, match="stopped the benchmark: model crashed"):
        _Stats(0.0).feed(b'{"error": {"message": "model crashed"}}', 0.1)
    with pytest.raises(EndpointError, match="not OpenAI-style"):
        _Stats(0.0).feed(b"<html>", 0.1)


@pytest.mark.parametrize(
    ("llm", "shown"),
    [
        ({"server": "ollama", "ttftMs": 81, "tokensPerSecond": 42.46}, "81 ms, 42.5 tok/s"),
        ({"ttftMs": 1200}, "1200 ms"),
        ({"server": "ollama"}, ""),
        ({"ttftMs": "fast", "tokensPerSecond": True}, ""),
        ({"ttftMs": -3, "tokensPerSecond": float("nan")}, ""),
        ("not a dict", ""),
        (None, ""),
    ],
)
def test_describe_shows_only_sane_figures(llm: Any, shown: str) -> None:
    assert describe(llm) == shown


# -- over HTTP: a streaming fake --------------------------------------------------------------------


class StreamingFake:
    """A chat server on 127.0.0.1 streaming `tokens` chunks `gap_s` apart after `first_s`, then usage
    and [DONE]; `mode` changes that: "error" (a 404 model-not-found), "stall" (the first token, then
    nothing until the test ends), "flood" (an endless stream), "json" (a non-stream answer)."""

    def __init__(self, mode: str = "ok", tokens: int = 8, first_s: float = 0.0, gap_s: float = 0.0) -> None:
        self.mode, self.tokens, self.first_s, self.gap_s = mode, tokens, first_s, gap_s
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fake.bodies.append(json.loads(self.rfile.read(length)))
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                try:
                    fake.answer(self)
                except OSError:  # the client hung up: what a deadline does
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def answer(self, h: BaseHTTPRequestHandler) -> None:
        if self.mode == "error":
            body = b'{"error":{"message":"model \\"nope\\" not found, try pulling it first"}}'
            h.send_response(404)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        time.sleep(self.first_s)
        send(b"data: " + chunk("") + b"\n\n")
        if self.mode == "flood":
            while not self.release.is_set():
                send(b"data: " + chunk("x") + b"\n\n")
            return
        for i in range(self.tokens):
            if i:
                time.sleep(self.gap_s)
            send(b"data: " + chunk(f" {i}") + b"\n\n")
            if self.mode == "stall":
                self.release.wait(30)
                return
        send(b"data: " + chunk(usage=self.tokens) + b"\n\ndata: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")

    def __enter__(self) -> StreamingFake:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


def test_measure_sends_one_short_streamed_prompt_and_times_it(http: httpx.Client) -> None:
    with StreamingFake(tokens=8, first_s=0.2, gap_s=0.01) as fake:
        result = measure(http, fake.url + "/v1", "llama3.2", credentials={"Authorization": "Bearer k"})
    [body] = fake.bodies
    assert body["model"] == "llama3.2" and body["stream"] is True
    assert body["max_tokens"] == bench.MAX_TOKENS and body["stream_options"] == {"include_usage": True}
    assert fake.headers[0]["authorization"] == "Bearer k"
    assert fake.headers[0]["accept-encoding"] == "identity"
    assert (result.tokens, result.tokens_from) == (8, "usage")
    assert result.ttft_ms >= 200  # the server waited 0.2 s before the first token
    assert result.tokens_per_second is not None and result.tokens_per_second > 0
    assert result.total_ms >= result.ttft_ms


def test_a_refusal_says_what_the_server_said(http: httpx.Client) -> None:
    with StreamingFake("error") as fake, pytest.raises(EndpointError) as caught:
        measure(http, fake.url, "nope")
    assert caught.value.exit_code == 6
    assert 'refused the benchmark prompt (HTTP 404: model "nope" not found' in caught.value.message


def test_nothing_listening_is_an_endpoint_error(http: httpx.Client) -> None:
    with StreamingFake() as fake:
        url = fake.url
    with pytest.raises(EndpointError, match="benchmark request to .* failed"):
        measure(http, url, "m")


@pytest.mark.timeout(30)
def test_a_stalled_stream_ends_at_the_deadline(http: httpx.Client) -> None:
    # The server holds the stream open for 30 s: only the whole-exchange deadline ends it sooner.
    with StreamingFake("stall") as fake, pytest.raises(EndpointError) as caught:
        measure(http, fake.url, "m", deadline_s=0.5)
    assert "did not finish the benchmark prompt within 0.5 s" in caught.value.message


@pytest.mark.timeout(30)
def test_an_endless_stream_is_cut_at_the_read_bound(http: httpx.Client) -> None:
    with StreamingFake("flood") as fake, pytest.raises(EndpointError) as caught:
        measure(http, fake.url, "m", deadline_s=25)
    assert "larger than 256 KiB" in caught.value.message


def test_a_server_that_ignores_stream_is_refused(http: httpx.Client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"content": "1 2 3"}}]})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(EndpointError, match="without streaming it"):
            measure(client, "http://127.0.0.1:11434", "m")


# -- the real llama.cpp server ----------------------------------------------------------------------


@pytest.mark.slow
def test_measure_against_the_real_llamacpp_server(tmp_path: Path, http: httpx.Client) -> None:
    from tests.llamacpp_real import LlamaServer, make_tiny_gguf, xllamacpp_missing

    reason = xllamacpp_missing()
    if reason:
        pytest.skip(reason)
    model = make_tiny_gguf(tmp_path / "tiny.gguf")
    with LlamaServer(model) as server:
        # ignore_eos: random weights may say end-of-text at once; this makes it exactly max_tokens
        result = measure(http, server.url, "tiny", max_tokens=16, extra={"ignore_eos": True})
    assert (result.tokens, result.tokens_from) == (16, "usage")
    assert result.ttft_ms >= 1 and result.tokens_per_second is not None and result.tokens_per_second > 0
    assert set(result.to_specs()) == {"ttftMs", "tokensPerSecond"}
