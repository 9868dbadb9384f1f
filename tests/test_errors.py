"""OS errors said in words (errors.describe_os_error), and the hub client's messages built on it."""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest

from llmroom_cli.errors import HubUnavailable, describe_os_error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "nothing listens on 127.0.0.1:3000"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "no such host: hubb.local"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), "cannot look up hubb.local now"),
        (TimeoutError("timed out"), "no answer from 127.0.0.1:3000 in time"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "network unreachable"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to host 127.0.0.1"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "127.0.0.1:3000 reset the connection"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "does not speak TLS"),
    ],
)
def test_os_errors_in_words(exc: OSError, words: str) -> None:
    host = "hubb.local" if isinstance(exc, socket.gaierror) else "127.0.0.1"
    said = describe_os_error(exc, host, 3000)
    assert words in said and "Errno" not in said


def test_the_cause_chain_and_the_message_are_both_searched() -> None:
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except OSError as inner:
            raise httpx.ConnectError("[Errno 111] Connection refused") from inner
    except httpx.ConnectError as outer:
        assert describe_os_error(outer, "10.1.2.3", 80) == "nothing listens on 10.1.2.3:80"
    # Only the text left (a library that dropped the cause): still said in words.
    bare = httpx.ConnectError("[Errno -2] Name or service not known")
    assert describe_os_error(bare, "hubb.local", 80) == "no such host: hubb.local"
    assert describe_os_error(httpx.ConnectError("[Errno 99999] Odd"), "h", 1) == "Odd"
    assert describe_os_error(ValueError("something else"), "h", 1) == "something else"


def test_an_ipv6_far_end_is_bracketed() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert describe_os_error(refused, "::1", 8080) == "nothing listens on [::1]:8080"


def test_the_hub_client_says_a_refused_connection_in_words() -> None:
    from llmroom_cli.client import HubClient
    from llmroom_cli.http import make_http

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(HubUnavailable) as caught:
        HubClient(make_http(url), url).rooms_body()
    message = caught.value.message
    assert message == f"cannot reach the hub at {url}: nothing listens on 127.0.0.1:{port}"
    # --debug still has the raw error: it is the cause of the cause.
    cause = caught.value.__cause__
    assert isinstance(cause, httpx.ConnectError) and "Errno" in str(cause.__cause__)


def test_the_hub_client_says_an_unknown_host_in_words() -> None:
    from llmroom_cli.client import HubClient
    from llmroom_cli.http import make_http

    url = "http://no-such-host.invalid:3000"
    with pytest.raises(HubUnavailable) as caught:
        HubClient(make_http(url), url).rooms_body()
    said = caught.value.message
    # .invalid never resolves (RFC 6761); a sandbox without DNS says "temporary failure" instead.
    unknown = said.endswith(": no such host: no-such-host.invalid")
    assert unknown or "cannot look up no-such-host.invalid now" in said


@pytest.fixture
def plain_http_server() -> Iterator[int]:
    """A TCP server that answers anything with a plain HTTP response (for an https:// URL at it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join(timeout=5)
    srv.close()


def test_https_at_a_plain_http_server_says_it_does_not_speak_tls(plain_http_server: int) -> None:
    from llmroom_cli.http import exchange, make_http

    url = f"https://127.0.0.1:{plain_http_server}/health"
    with pytest.raises(httpx.ConnectError) as caught:
        exchange(make_http(url), "GET", url, total_s=5.0, max_bytes=1024)
    assert str(caught.value).startswith(f"127.0.0.1:{plain_http_server} does not speak TLS")


def test_a_certificate_that_cannot_be_verified_is_said_so() -> None:
    made = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert describe_os_error(made, "hub.example", 443).startswith(
        "the TLS certificate of hub.example could not be verified"
    )
