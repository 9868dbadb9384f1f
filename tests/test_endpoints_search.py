"""`join`'s search for the local LLM server: every usual port at once, within a deadline, and the pick.

The port list is injected: fake servers (recorded answers) on ephemeral ports stand for Ollama on
:11434 and llama.cpp on :8080; a stalled and a trickling server stand for what a busy machine may have
listening on one of those ports.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from llmroom_cli import endpoints
from llmroom_cli.endpoints import ServerInfo, choose_server, find_servers, match_server, server_label
from llmroom_cli.errors import EndpointError
from tests.fake_llm_servers import FakeLLMServer


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, limits=httpx.Limits(max_connections=32)) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SlowServer:
    """Accepts connections on 127.0.0.1 and answers nothing ("stall") or a 200 whose chunked body
    comes one byte every 50 ms, forever ("trickle"), until the test ends."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> SlowServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
                if self.mode == "trickle":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"
                    )
                while not self.stop.wait(0.05):
                    if self.mode == "trickle":
                        conn.sendall(b"1\r\n \r\n")
            except OSError:  # the client gave up on us: what the deadline is for
                pass


# -- find_servers ---------------------------------------------------------------------------------


def test_every_answering_server_is_found_in_the_order_of_the_ports(http: httpx.Client) -> None:
    nothing = f"http://127.0.0.1:{_free_port()}"
    with FakeLLMServer("ollama") as ollama, FakeLLMServer("llamacpp") as llama:
        found = find_servers(http, [ollama.url, nothing, llama.url])
    assert [(s.url, s.kind, s.status) for s in found] == [
        (ollama.url, "ollama", "ready"),
        (llama.url, "llamacpp", "ready"),
    ]


def test_a_server_that_is_not_an_llm_or_wants_a_key_is_skipped(http: httpx.Client) -> None:
    with FakeLLMServer("vllm", "auth") as locked, FakeLLMServer("lmstudio") as lms:
        found = find_servers(http, [locked.url, lms.url])
    assert [s.kind for s in found] == ["lmstudio"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_a_stalled_or_trickling_port_does_not_hold_the_search(http: httpx.Client, mode: str) -> None:
    # The slow server never finishes an answer while the test runs: only the deadline can end the
    # search (a hang here is the bug; pytest-timeout turns it into a failure).
    with FakeLLMServer("ollama") as ollama, SlowServer(mode) as slow:
        found = find_servers(http, [slow.url, ollama.url], read_s=0.8, deadline_s=0.4)
        assert slow.accepted >= 1
    assert [s.url for s in found] == [ollama.url]


def test_a_loading_server_is_found_and_says_so(http: httpx.Client) -> None:
    with FakeLLMServer("llamacpp", "loading") as llama:
        [info] = find_servers(http, [llama.url])
    assert info.status == "loading"
    assert server_label(info) == f"llamacpp at {llama.url} (loading a model)"


def test_without_a_client_the_search_brings_its_own() -> None:
    with FakeLLMServer("ollama") as ollama, FakeLLMServer("vllm") as vllm:
        found = find_servers(None, [vllm.url, ollama.url])
    assert [s.kind for s in found] == ["vllm", "ollama"]


def test_the_usual_ports_are_searched_by_default() -> None:
    ports = [u.rsplit(":", 1)[1] for u in endpoints.LOCAL_CANDIDATES]
    assert ports == ["11434", "1234", "8080", "9931", "8000"]
    assert endpoints.ports_of(endpoints.LOCAL_CANDIDATES) == "11434, 1234, 8080, 9931, 8000"
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.url.port}{request.url.path}")
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert find_servers(client) == []
    assert sorted(a for a in asked if a.endswith("/v1/models")) == sorted(f"{p}/v1/models" for p in ports)


# -- choose_server / match_server -------------------------------------------------------------------


def _server(kind: str, port: int, models: int = 2) -> ServerInfo:
    return ServerInfo(
        f"http://127.0.0.1:{port}",
        kind,
        "ready",
        None,
        [endpoints.ModelInfo(f"m{i}") for i in range(models)],
    )


def test_nothing_found_points_to_probe_and_exits_6() -> None:
    with pytest.raises(EndpointError) as caught:
        choose_server([], candidates=["http://127.0.0.1:11434", "http://127.0.0.1:8080"])
    assert caught.value.exit_code == 6
    assert caught.value.message == "no LLM server answers on the usual local ports (11434, 8080)"
    assert "llmroom probe" in (caught.value.hint or "")
    assert "--endpoint" in (caught.value.hint or "")


def test_the_only_server_is_used_without_asking() -> None:
    only = _server("ollama", 11434)

    def ask(servers: list[ServerInfo]) -> ServerInfo:
        raise AssertionError("asked although one server answers")

    assert choose_server([only], ask) is only


def test_several_servers_are_asked_about_on_a_terminal() -> None:
    a, b = _server("ollama", 11434), _server("llamacpp", 8080)
    offered: list[list[ServerInfo]] = []

    def ask(servers: list[ServerInfo]) -> ServerInfo:
        offered.append(servers)
        return servers[1]

    assert choose_server([a, b], ask) is b
    assert offered == [[a, b]]


def test_several_servers_without_a_terminal_exit_6_listing_them() -> None:
    a, b = _server("ollama", 11434), _server("llamacpp", 8080, models=1)
    with pytest.raises(EndpointError) as caught:
        choose_server([a, b])
    assert caught.value.exit_code == 6
    assert caught.value.message == (
        "2 LLM servers answer on this machine: ollama at http://127.0.0.1:11434 (2 chat models);"
        " llamacpp at http://127.0.0.1:8080 (1 chat model)"
    )
    assert caught.value.hint == "choose one with --endpoint URL"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1", 0),
        (" 2 ", 1),
        ("ollama", 0),
        ("LLAMACPP", 1),
        ("8080", 1),
        (":11434", 0),
        ("http://127.0.0.1:8080/", 1),
        ("127.0.0.1:11434", 0),
        ("3", None),
        ("0", None),
        ("", None),
        ("vllm", None),
    ],
)
def test_the_pick_accepts_the_number_the_kind_the_port_or_the_url(answer: str, expected: int | None) -> None:
    servers = [_server("ollama", 11434), _server("llamacpp", 8080)]
    chosen = match_server(answer, servers)
    assert chosen is (None if expected is None else servers[expected])


def test_a_kind_two_servers_share_names_neither() -> None:
    servers = [_server("llamacpp", 8080), _server("llamacpp", 9931)]
    assert match_server("llamacpp", servers) is None
    assert match_server("9931", servers) is servers[1]
