"""`join --bench`: how fast the shared model answers, measured once with one short streamed prompt.

    measure(http, endpoint, model)  ->  BenchResult(ttft_ms, tokens, tokens_per_second, ...)
    result.to_specs()               ->  {"ttftMs": 81, "tokensPerSecond": 42.5}   (merged into specs.llm)
    describe(specs["llm"])          ->  "81 ms, 42.5 tok/s"                        (what `list CODE` shows)

Time to first token runs from sending the request to the first chunk carrying text (answer or
reasoning): it includes the prompt's processing, and a model load if the server loads on demand.
Tokens per second is the decode rate: the tokens after the first over the time from the first to
the last. The token count is the server's `usage.completion_tokens` when it reports one
(`stream_options.include_usage`), else the number of chunks carrying text (one token each on Ollama,
llama.cpp, LM Studio and vLLM's default).

Everything from the server is hostile: the whole exchange has a deadline (a watchdog shuts the socket
down, so a server that trickles bytes cannot hold it), the stream is read undecoded up to MAX_BYTES
(the request asks for no compression and a compressed answer is refused), and a line longer than
MAX_LINE_BYTES ends it. Failures raise EndpointError; `join` reports them as a warning and goes on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmroom_cli.errors import EndpointError

if TYPE_CHECKING:
    import httpx

PROMPT = "Count from 1 to 100, separated by spaces."
MAX_TOKENS = 32
# A cold Ollama loads the model on the first request: seconds for a small model, more for a big one.
DEADLINE_S = 30.0
# 32 tokens of SSE are a few KiB (reasoning models add some); anything far past it is not an answer.
MAX_BYTES = 256 * 1024
MAX_LINE_BYTES = 32 * 1024
# What an error answer may say (its first bytes are enough for the message).
ERROR_BYTES = 4096


@dataclass
class BenchResult:
    """One measurement. `tokens_per_second` is None when the answer came in a single burst (the
    server batched it, or it was one token): there is no decode time to divide by."""

    ttft_ms: int
    tokens: int
    tokens_per_second: float | None
    total_ms: int
    tokens_from: str  # "usage" (the server's count) or "chunks" (chunks carrying text)

    def to_specs(self) -> dict[str, Any]:
        """The keys merged into `specs.llm`: camelCase, as the room's other clients read JSON."""
        out: dict[str, Any] = {"ttftMs": self.ttft_ms}
        if self.tokens_per_second is not None:
            out["tokensPerSecond"] = self.tokens_per_second
        return out


def describe(llm: Any) -> str:
    """ "81 ms, 42.5 tok/s" from a participant's `specs.llm` (hostile: anything not a positive
    number is left out); "" when it has no figures."""
    if not isinstance(llm, Mapping):
        return ""
    parts = []
    ttft = llm.get("ttftMs")
    if _positive(ttft):
        parts.append(f"{ttft:.0f} ms")
    tps = llm.get("tokensPerSecond")
    if _positive(tps):
        parts.append(f"{tps:.1f} tok/s")
    return ", ".join(parts)


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 < value < 1e9  # NaN and infinity fail too
    )


class _Stats:
    """The figures, fed with each SSE `data:` payload and the time it arrived."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.usage: int | None = None
        self.done = False
        self.events = 0

    def feed(self, payload: bytes, now: float) -> None:
        self.events += 1
        text = payload.strip()
        if text == b"[DONE]":
            self.done = True
            return
        try:
            event = json.loads(text)
        except ValueError:
            raise EndpointError("the benchmark stream is not OpenAI-style JSON events") from None
        if not isinstance(event, dict):
            return
        if "error" in event:
            raise EndpointError(f"the server stopped the benchmark: {_error_text(event)}")
        usage = event.get("usage")
        if isinstance(usage, dict):
            n = usage.get("completion_tokens")
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                self.usage = n
        if any(_has_text(c) for c in _list(event.get("choices"))):
            self.chunks += 1
            if self.first is None:
                self.first = now
            self.last = now

    def result(self, now: float) -> BenchResult:
        if self.first is None or self.last is None:
            raise EndpointError("the model answered the benchmark prompt with no text")
        tokens = self.usage if self.usage else self.chunks
        span = self.last - self.first
        # Below a millisecond the chunks came in one read: that is no decode time.
        tps = round((tokens - 1) / span, 1) if tokens >= 2 and span >= 0.001 else None
        return BenchResult(
            ttft_ms=max(1, round((self.first - self.started) * 1000)),
            tokens=tokens,
            tokens_per_second=tps,
            total_ms=round((now - self.started) * 1000),
            tokens_from="usage" if self.usage else "chunks",
        )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _has_text(choice: Any) -> bool:
    """A chunk carries a token when its delta has text: the answer, or a reasoning model's thinking
    (`reasoning_content` on llama.cpp, vLLM, DeepSeek; `reasoning` on Ollama, LM Studio)."""
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        return False
    return any(
        isinstance(delta.get(k), str) and delta[k] for k in ("content", "reasoning_content", "reasoning")
    )


def _error_text(doc: Any) -> str:
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err)[:200] if err else "no reason given"


def measure(
    http: httpx.Client,
    endpoint: str,
    model: str,
    credentials: Mapping[str, str] | None = None,
    deadline_s: float = DEADLINE_S,
    *,
    max_tokens: int = MAX_TOKENS,
    extra: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BenchResult:
    """Send one short streamed chat prompt to `model` at `endpoint` (a base URL, as probe takes it)
    and time the answer; EndpointError when it fails or takes longer than `deadline_s` in all.

    `credentials` are the local server's headers (API key, --header ones); `extra` more body fields
    (a test's `ignore_eos`). The prompt asks for more than `max_tokens` so a model does not stop early.
    """
    import httpx

    from llmroom_cli.endpoints import CONNECT_S, probe_url

    base = probe_url(endpoint)
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity", **(credentials or {})}
    deadline = clock() + deadline_s
    late = EndpointError(
        f"model {model!r} at {base} did not finish the benchmark prompt within {deadline_s:g} s",
        "is it loading? try again, or join without --bench",
    )
    timeout = httpx.Timeout(deadline_s, connect=min(CONNECT_S * 4, deadline_s))
    expired = threading.Event()
    watchdog: threading.Timer | None = None
    started = clock()
    try:
        request = http.build_request(
            "POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
        )
        response = http.send(request, stream=True)
        try:
            watchdog = _arm(response, deadline - clock(), expired)
            if response.status_code != 200:
                raw = _read_some(response, ERROR_BYTES)
                try:
                    why = _error_text(json.loads(raw))
                except ValueError:
                    why = raw[:200].decode("utf-8", "replace").strip() or "no reason given"
                raise EndpointError(
                    f"model {model!r} at {base} refused the benchmark prompt (HTTP {response.status_code}:"
                    f" {why})"
                )
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise EndpointError(f"the server at {base} compressed the benchmark stream ({encoding})")
            stats = _Stats(started)
            _read_stream(response, stats, deadline, clock, late)
            return stats.result(clock())
        finally:
            response.close()
    except EndpointError:
        raise
    except httpx.TimeoutException:
        raise late from None
    except httpx.HTTPError as exc:
        if expired.is_set():
            raise late from None
        raise EndpointError(f"the benchmark request to {base} failed: {exc or type(exc).__name__}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _read_stream(
    response: httpx.Response, stats: _Stats, deadline: float, clock: Callable[[], float], late: EndpointError
) -> None:
    size = 0
    pending = b""
    # A test transport answers with the body already read.
    chunks = [response.content] if response.is_stream_consumed else response.iter_raw()
    for chunk in chunks:
        now = clock()
        if now > deadline:
            raise late
        size += len(chunk)
        if size > MAX_BYTES:
            raise EndpointError(f"the benchmark answer is larger than {MAX_BYTES // 1024} KiB")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            raise EndpointError(f"the benchmark stream has a line longer than {MAX_LINE_BYTES // 1024} KiB")
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                stats.feed(line[5:], now)
                if stats.done:
                    return
    if pending.startswith(b"data:"):  # a last event without its newline
        stats.feed(pending[5:], clock())
    if not stats.events:
        raise EndpointError("the server answered the benchmark prompt without streaming it")


def _read_some(response: httpx.Response, limit: int) -> bytes:
    if response.is_stream_consumed:
        return response.content[:limit]
    out = b""
    for chunk in response.iter_raw():
        out += chunk
        if len(out) >= limit:
            break
    return out[:limit]


def _arm(response: httpx.Response, left_s: float, expired: threading.Event) -> threading.Timer | None:
    """At the deadline, shut the connection's socket down: a read blocked on it returns at once.
    (Before the answer's head arrives, httpx's own timeouts, set to the deadline, bound the wait.)"""
    stream = response.extensions.get("network_stream")
    sock = None
    if stream is not None:
        try:
            sock = stream.get_extra_info("socket")
        except Exception:  # a stream of an unknown kind (a test transport): the clock still bounds it
            sock = None
    if sock is None:
        return None

    def expire() -> None:
        import socket

        expired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(max(left_s, 0.0), expire)
    timer.daemon = True
    timer.start()
    return timer
