"""The relay core and the share relay server, against a fake OpenAI server on an ephemeral port.

The fake is a real HTTP server in a thread (streaming needs real sockets); what it received is
recorded so the tests can check what crossed the relay, and streamed answers wait on events the test
sets, so a test sees the first chunk arrive while the server is still mid-answer.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from llmroom_cli.errors import UsageError
from llmroom_cli.options import parse_headers
from llmroom_cli.relay import (
    DEFAULT_MAX_CONCURRENT,
    RelayCore,
    RelayLimits,
    ShareRelay,
    StreamBroken,
    forward_headers,
    match_route,
)
from tests.helpers import WAIT_S, wait_for

ANSWER_TEXT = "the secret answer text"
PROMPT_TEXT = "the secret prompt text"


def _chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    event: dict[str, Any] = {"object": "chat.completion.chunk", "choices": []}
    if content is not None:
        event["choices"] = [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        event["usage"] = usage
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class FakeOpenAI:
    """Answers /v1/* as told by the request body's `mode`:

    plain       JSON with a usage block (completion_tokens 7)
    stream      SSE: a first chunk, then waits for `release`, then 3 more, a usage chunk, [DONE]
    stream-nousage   SSE: 4 content chunks, no usage block
    stall-head  waits for `release` before sending anything (first-byte deadline)
    stall-body  sends the head and one chunk, then waits for `release` (idle deadline)
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        self.first_sent = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((self.command, self.path, dict(self.headers.items()), raw))
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._json(
                        401, {"error": {"message": "Invalid API Key", "type": "authentication_error"}}
                    )
                mode = json.loads(raw).get("mode", "plain") if raw else "plain"
                if mode == "stall-head":
                    fake.release.wait(WAIT_S)
                    return self._json(200, {"late": True})
                if mode.startswith("stream") or mode == "stall-body":
                    return self._stream(mode)
                return self._json(
                    200,
                    {
                        "choices": [{"message": {"content": ANSWER_TEXT}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 7},
                        "path": self.path,
                    },
                )

            do_GET = do_POST = do_DELETE = _answer

            def _json(self, status: int, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Set-Cookie", "session=server-side")
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, mode: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                self.wfile.write(_chunk("the"))
                self.wfile.flush()
                fake.first_sent.set()
                if mode in ("stream", "stall-body"):
                    fake.release.wait(WAIT_S)
                if mode == "stall-body":
                    return
                for word in (" secret", " answer", " text"):
                    self.wfile.write(_chunk(word))
                if mode == "stream":
                    self.wfile.write(_chunk(usage={"completion_tokens": 12}))
                self.wfile.write(b"data: [DONE]\n\n")

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the relay hung up on purpose (abandoned or cut streams)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=8)) as client:
        yield client


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": PROMPT_TEXT}], **fields}).encode()


def read_all(
    core: RelayCore, method: str, path: str, data: bytes | None = None, **headers: str
) -> tuple[int, bytes]:
    with core.open(method, path, headers, data) as up:
        return up.status, b"".join(up)


# -- routes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "route", "allowed"),
    [
        ("POST", "/v1/chat/completions", "/v1/chat/completions", True),
        ("POST", "/v1/completions", "/v1/completions", True),
        ("POST", "/v1/responses", "/v1/responses", True),
        ("GET", "/v1/responses/resp_abc123", "/v1/responses/{id}", True),
        ("DELETE", "/v1/responses/resp_abc123", "/v1/responses/{id}", True),
        ("POST", "/v1/responses/resp_abc123/cancel", "/v1/responses/{id}/cancel", True),
        ("GET", "/v1/models?x=1", "/v1/models", True),
        ("POST", "/v1/embeddings", "/v1/embeddings", True),
        ("POST", "/v1/models", "/v1/models", False),
        ("GET", "/v1/chat/completions", "/v1/chat/completions", False),
        ("POST", "/api/pull", None, False),
        ("DELETE", "/api/delete", None, False),
        ("POST", "/v1/responses/../../api/pull", None, False),
        ("POST", "/v1/responses/%2e%2e/cancel", None, False),
        ("POST", "//v1/chat/completions", None, False),
        ("GET", "/props", None, False),
        ("GET", "/v1/models/../../api/tags", None, False),
        ("GET", "/v1/models?a=1 b", None, False),
        ("GET", "/v1/models?a=1#frag", None, False),
        ("GET", "/v1/models?a=\r\nX-Evil:1", None, False),
    ],
)
def test_match_route_allows_only_the_inference_routes(
    method: str, path: str, route: str | None, allowed: bool
) -> None:
    assert match_route(method, path) == (route, allowed)


def test_admin_routes_are_404_and_never_reach_the_server(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http)
    status, data = read_all(core, "POST", "/api/pull", b'{"model":"x"}')
    assert status == 404
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    assert read_all(core, "POST", "/v1/models")[0] == 405
    assert fake.requests == []
    assert core.traffic.rejected == 2 and core.traffic.served == 0


def test_plain_request_is_forwarded_with_path_query_and_counted(fake: FakeOpenAI, http: httpx.Client) -> None:
    events: list[dict[str, Any]] = []
    core = RelayCore(fake.url, http, on_request=events.append)
    status, data = read_all(core, "POST", "/v1/chat/completions?trace=1", body())
    assert status == 200
    answer = json.loads(data)
    assert answer["choices"][0]["message"]["content"] == ANSWER_TEXT
    assert answer["path"] == "/v1/chat/completions?trace=1"
    traffic = core.traffic
    assert (traffic.served, traffic.in_flight, traffic.failed) == (1, 0, 0)
    assert traffic.last_tokens_per_s is not None and traffic.last_tokens_per_s > 0
    [event] = events
    assert event["route"] == "/v1/chat/completions" and event["status"] == 200 and event["tokens"] == 7
    assert event["stream"] is False and event["duration_ms"] >= 0
    text = json.dumps(event)
    assert PROMPT_TEXT not in text and ANSWER_TEXT not in text


# -- headers and credentials ----------------------------------------------------------------------------


def test_credentials_replace_the_rooms_and_hop_by_hop_headers_are_dropped(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    creds = {"Authorization": "Bearer local-key", "X-Api-Org": "mine"}
    core = RelayCore(fake.url, http, credentials=creds)
    incoming = [
        ("Authorization", "Bearer room-token"),
        ("Cookie", "hub=1"),
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "hop"),
        ("Keep-Alive", "timeout=5"),
        ("Accept-Encoding", "gzip"),
        ("Origin", "http://evil.example"),
        ("Content-Type", "application/json"),
        ("X-Request-Id", "r-1"),
        ("x-api-org", "theirs"),
    ]
    with core.open("POST", "/v1/chat/completions", incoming, body()) as up:
        assert all(k.lower() not in ("set-cookie", "transfer-encoding", "connection") for k, _ in up.headers)
        b"".join(up)
    sent = {k.lower(): v for k, v in fake.requests[0][2].items()}
    assert sent["authorization"] == "Bearer local-key"
    assert sent["x-api-org"] == "mine"
    assert sent["x-request-id"] == "r-1" and sent["content-type"] == "application/json"
    assert "cookie" not in sent and "x-private" not in sent and "keep-alive" not in sent
    assert "origin" not in sent
    assert sent["accept-encoding"] == "identity"
    assert "local-key" not in repr(core)


def test_forward_headers_drops_what_connection_names() -> None:
    out = forward_headers({"Connection": "X-A", "X-A": "1", "X-B": "2"}, {})
    assert out == {"X-B": "2", "Accept-Encoding": "identity"}


def test_forward_headers_drops_invalid_headers_instead_of_failing() -> None:
    incoming: list[tuple[Any, Any]] = [
        ("X-Split", "a\r\nX-Evil: 1"),
        ("Bad Name", "1"),
        ("X-Num", 5),
        ("X-Emoji", "\U0001f600"),
        ("X-Ok", "caf\u00e9"),
    ]
    assert forward_headers(incoming, {}) == {"X-Ok": "caf\u00e9", "Accept-Encoding": "identity"}


def test_hostile_headers_from_the_room_still_get_an_answer(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http)
    headers = {"X-Split": "a\nb", "X-Emoji": "\U0001f600", "X-Ok": "1"}
    assert read_all(core, "POST", "/v1/chat/completions", body(), **headers)[0] == 200
    assert fake.requests[0][2].get("X-Ok") == "1" and "X-Split" not in fake.requests[0][2]


def test_a_failing_callback_never_cuts_the_request(fake: FakeOpenAI, http: httpx.Client) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("panel bug")

    core = RelayCore(fake.url, http, on_request=broken)
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 200
    assert core.traffic.served == 1 and "panel bug" in (core.traffic.last_error or "")


def test_api_key_server_401_without_and_200_with_the_relays_key(http: httpx.Client) -> None:
    with FakeOpenAI(api_key="k-123") as server:
        assert read_all(RelayCore(server.url, http), "POST", "/v1/chat/completions", body())[0] == 401
        keyed = RelayCore(server.url, http, credentials=parse_headers([], [], "k-123"))
        assert read_all(keyed, "POST", "/v1/chat/completions", body(), Authorization="Bearer hub")[0] == 200
        assert keyed.ping() and RelayCore(server.url, http).ping()  # a 401 is a live server


# -- streaming --------------------------------------------------------------------------------------


def test_stream_chunks_arrive_while_the_server_is_still_answering(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    events: list[dict[str, Any]] = []
    core = RelayCore(fake.url, http, on_request=events.append)
    with core.open("POST", "/v1/chat/completions", {}, body(mode="stream")) as up:
        assert up.status == 200 and up.stream
        chunks = iter(up)
        first = next(chunks)
        assert b'"the"' in first
        assert not fake.release.is_set()  # the rest is not even written yet: nothing was buffered
        assert core.traffic.in_flight == 1
        fake.release.set()
        rest = b"".join(chunks)
    assert rest.endswith(b"data: [DONE]\n\n")
    [event] = events
    assert event["tokens"] == 12  # the usage block of the final chunk wins over the 4 counted deltas
    assert event["ttft_ms"] is not None and event["ttft_ms"] <= event["duration_ms"]
    assert core.traffic.last_ttft_ms == event["ttft_ms"]
    assert ANSWER_TEXT.split()[1] not in json.dumps(event)


def test_stream_without_usage_counts_the_content_deltas(fake: FakeOpenAI, http: httpx.Client) -> None:
    events: list[dict[str, Any]] = []
    core = RelayCore(fake.url, http, on_request=events.append)
    status, data = read_all(core, "POST", "/v1/chat/completions", body(mode="stream-nousage"))
    assert status == 200 and data.count(b"data: ") == 5
    assert events[0]["tokens"] == 4
    assert core.traffic.last_tokens_per_s is not None


# -- bounds and deadlines -----------------------------------------------------------------------------


def test_beyond_max_concurrent_is_429_rate_limit_until_a_slot_frees(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    assert DEFAULT_MAX_CONCURRENT >= 1
    core = RelayCore(fake.url, http, max_concurrent=1)
    held = core.open("POST", "/v1/chat/completions", {}, body(mode="stream"))
    status, data = read_all(core, "POST", "/v1/chat/completions", body())
    assert status == 429
    assert json.loads(data)["error"]["type"] == "rate_limit"
    fake.release.set()
    with held:
        b"".join(held)
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 200
    assert core.traffic.rejected == 1 and core.traffic.served == 2


def test_body_over_the_limit_is_413(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http, limits=RelayLimits(max_body_bytes=10))
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 413
    assert fake.requests == []


def test_server_down_is_502_and_calls_on_server_down(http: httpx.Client) -> None:
    downs: list[int] = []
    events: list[dict[str, Any]] = []
    core = RelayCore(
        f"http://127.0.0.1:{dead_port()}",
        http,
        on_request=events.append,
        on_server_down=lambda: downs.append(1),
    )
    status, data = read_all(core, "POST", "/v1/chat/completions", body())
    assert status == 502 and json.loads(data)["error"]["type"] == "server_down"
    assert downs == [1]
    traffic = core.traffic
    assert traffic.failed == 1 and traffic.in_flight == 0 and "not answering" in (traffic.last_error or "")
    assert events[0]["status"] == 502 and "error" in events[0]
    assert not core.ping()


def test_first_byte_deadline_is_504(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http, limits=RelayLimits(first_byte_s=0.3))
    status, data = read_all(core, "POST", "/v1/chat/completions", body(mode="stall-head"))
    assert status == 504 and json.loads(data)["error"]["type"] == "timeout"
    assert core.traffic.failed == 1 and core.traffic.in_flight == 0


def test_idle_deadline_breaks_the_stream_and_counts_a_failure(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http, limits=RelayLimits(idle_s=0.3, first_byte_s=WAIT_S))
    got: list[bytes] = []
    with core.open("POST", "/v1/chat/completions", {}, body(mode="stall-body")) as up:
        with pytest.raises(StreamBroken, match="sent nothing"):
            for chunk in up:
                got.append(chunk)
    assert got and b'"the"' in got[0]
    traffic = core.traffic
    assert traffic.failed == 1 and traffic.in_flight == 0 and traffic.served == 0


def test_stop_accepting_and_drain_wait_for_requests_in_flight(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http)
    up = core.open("POST", "/v1/chat/completions", {}, body(mode="stream"))
    core.stop_accepting()
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 503
    assert core.drain(0.05) is False

    def finish() -> None:
        with up:
            fake.release.set()
            b"".join(up)

    worker = threading.Thread(target=finish)
    worker.start()
    assert core.drain(WAIT_S) is True
    worker.join(WAIT_S)
    assert core.traffic.served == 1 and core.traffic.in_flight == 0


def test_abandoned_stream_frees_its_slot_and_counts_as_failed(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http, max_concurrent=1)
    with core.open("POST", "/v1/chat/completions", {}, body(mode="stream")) as up:
        next(iter(up))  # the room went away after the first chunk
    assert core.traffic.in_flight == 0 and core.traffic.failed == 1
    fake.release.set()
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 200


# -- the share relay server ------------------------------------------------------------------------------


def test_share_relay_serves_the_hub_and_streams_as_chunks_arrive(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    core = RelayCore(fake.url, http)
    with ShareRelay(core, "127.0.0.1", ["127.0.0.1"]) as relay, httpx.Client(trust_env=False) as hub:
        assert relay.url.startswith("http://127.0.0.1:") and not relay.url.endswith(":0")
        plain = hub.post(relay.url + "/v1/chat/completions", content=body())
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 7
        assert "set-cookie" not in plain.headers
        assert hub.post(relay.url + "/api/pull", content=b"{}").status_code == 404
        with hub.stream("POST", relay.url + "/v1/chat/completions", content=body(mode="stream")) as streamed:
            assert streamed.headers["transfer-encoding"] == "chunked"
            parts = streamed.iter_raw()
            assert b'"the"' in next(parts)
            assert not fake.release.is_set()
            fake.release.set()
            assert b"".join(parts).endswith(b"data: [DONE]\n\n")
        # keep-alive: the same hub connection serves the next request after a stream
        assert hub.get(relay.url + "/v1/models").status_code == 200
    assert core.traffic.served == 3


def test_share_relay_refuses_other_peers_with_403(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http)
    with ShareRelay(core, "127.0.0.1", ["192.0.2.7"]) as relay, httpx.Client(trust_env=False) as other:
        answer = other.post(relay.url + "/v1/chat/completions", content=body())
        assert answer.status_code == 403 and answer.headers["connection"] == "close"
    assert fake.requests == []


def test_share_relay_413_without_reading_a_huge_body(fake: FakeOpenAI, http: httpx.Client) -> None:
    core = RelayCore(fake.url, http, limits=RelayLimits(max_body_bytes=1000))
    with (
        ShareRelay(core, "127.0.0.1", ["127.0.0.1"]) as relay,
        socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT_S) as sock,
    ):
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    assert fake.requests == []


def test_share_relay_cuts_the_hub_connection_when_the_server_breaks_mid_stream(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    core = RelayCore(fake.url, http, limits=RelayLimits(idle_s=0.3))
    with ShareRelay(core, "127.0.0.1", ["127.0.0.1"]) as relay, httpx.Client(trust_env=False) as hub:
        with hub.stream(
            "POST", relay.url + "/v1/chat/completions", content=body(mode="stall-body")
        ) as streamed:
            with pytest.raises(httpx.RemoteProtocolError):
                b"".join(streamed.iter_raw())  # no terminating chunk: the hub knows it is truncated
    wait_for(lambda: core.traffic.failed == 1, "the failure counted")


def test_share_relay_stop_frees_the_port_and_hangs_up_keep_alive_connections(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    relay = ShareRelay(RelayCore(fake.url, http), "127.0.0.1", ["127.0.0.1"])
    relay.start()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT_S) as kept:
        kept.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b'"/v1/models"}'):  # the fake's answer ends with its path
            reply += kept.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        relay.stop()
        assert kept.recv(65536) == b""  # the idle keep-alive connection is closed, not left serving
    relay.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(relay.url + "/v1/models", trust_env=False)


# -- credentials parsing ----------------------------------------------------------------------------


def test_parse_headers_builds_the_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKEN", "tok-secret")
    creds = parse_headers(["X-Org=acme", "X-Empty="], ["X-Token=MY_TOKEN"], "sk-1")
    assert creds == {"X-Org": "acme", "X-Empty": "", "X-Token": "tok-secret", "Authorization": "Bearer sk-1"}
    assert parse_headers([], [], None) == {}


@pytest.mark.parametrize(
    ("pairs", "env_pairs", "needle"),
    [
        (["novalue-secret"], [], "NAME=VALUE"),
        (["=secret-value"], [], "NAME=VALUE"),
        (["Bad Name=secret-value"], [], "not a valid header name"),
        (["Host=secret-value"], [], "cannot be set"),
        (["X-A=line\nbreak-secret"], [], "line break"),
        ([], ["X-Token=NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE is not set"),
        ([], ["X-Token"], "NAME=ENVVAR"),
    ],
)
def test_parse_headers_errors_are_usage_errors_that_never_echo_values(
    pairs: list[str], env_pairs: list[str], needle: str
) -> None:
    with pytest.raises(UsageError, match=needle) as info:
        parse_headers(pairs, env_pairs, None)
    assert info.value.exit_code == 2
    assert "secret" not in str(info.value)


def test_parse_headers_rejects_a_key_with_a_line_break() -> None:
    with pytest.raises(UsageError) as info:
        parse_headers([], [], "sk-secret\r\nX-Evil: 1")
    assert "secret" not in str(info.value)


# -- joining a burst that has already arrived --------------------------------------------------------


class _Stream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


def test_more_waiting_sees_only_bytes_that_have_arrived_and_ignores_a_lone_crlf() -> None:
    from llmroom_cli.relay import _more_waiting

    ours, server = socket.socketpair()
    with ours, server:
        ours.settimeout(WAIT_S)  # as httpx's sockets have: the check must still never wait
        response = httpx.Response(200, extensions={"network_stream": _Stream(ours)})
        more = _more_waiting(response)
        assert more() is False
        server.sendall(b"\r\n")  # the end of the chunk just read: the next one is not here yet
        wait_for(lambda: ours.recv(2, socket.MSG_PEEK) == b"\r\n", "the CRLF to arrive")
        assert more() is False
        server.sendall(b"1f\r\ndata: ...")
        assert wait_for(more, "the next chunk to be seen")
        assert ours.recv(100) == b"\r\n1f\r\ndata: ..."  # peeked, not consumed
    assert _more_waiting(httpx.Response(200))() is False  # no socket (MockTransport): never joins


def test_a_long_fast_stream_arrives_whole_and_in_order(http: httpx.Client) -> None:
    events = [_chunk(f" w{i}") for i in range(3000)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in [*events, b"data: [DONE]\n\n"]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        got: list[dict[str, Any]] = []
        core = RelayCore(f"http://127.0.0.1:{server.server_address[1]}", http, on_request=got.append)
        status, data = read_all(core, "POST", "/v1/chat/completions", body(stream=True))
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert data == b"".join(events) + b"data: [DONE]\n\n"
    assert got[0]["tokens"] == 3000  # every delta counted, joined or not


def test_abort_from_another_thread_cuts_a_stream_and_frees_the_slot(
    fake: FakeOpenAI, http: httpx.Client
) -> None:
    core = RelayCore(fake.url, http, max_concurrent=1)
    up = core.open("POST", "/v1/chat/completions", {}, body(mode="stream"))
    chunks = iter(up)
    assert b'"the"' in next(chunks)  # the server now waits (release unset) with the stream open
    timer = threading.Timer(0.05, up.abort)
    timer.start()
    with up, pytest.raises(StreamBroken, match="cut by the relay"):
        for _ in chunks:
            pass
    timer.join()
    traffic = core.traffic
    assert traffic.in_flight == 0 and traffic.failed == 1
    assert "cut by the relay" in (traffic.last_error or "")
    assert read_all(core, "POST", "/v1/chat/completions", body())[0] == 200


def test_ping_with_every_connection_busy_serving_is_alive(fake: FakeOpenAI) -> None:
    with httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=1)) as one:
        core = RelayCore(fake.url, one)
        with core.open("POST", "/v1/chat/completions", {}, body(mode="stream")) as up:
            next(iter(up))
            assert core.ping(timeout_s=0.2) is True  # no connection free, but the server is serving
            fake.release.set()
            b"".join(up)
