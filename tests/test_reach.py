"""The published endpoint address: the rules with the network injected, then for real.

The end-to-end tests build a hub host of their own: a network namespace joined to this one by a veth
pair (10.231.X.1 here, 10.231.X.2 there), created and removed by the tests. They need root and
`ip netns`; elsewhere they skip, saying why. Traffic goes only to those addresses and to loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmroom_cli.errors import EndpointError, UsageError
from llmroom_cli.reach import (
    Publication,
    answers,
    fix_hint,
    hub_is_local,
    publishable_endpoint,
    route_address,
)

REPO = Path(__file__).resolve().parents[1]
# No packet is sent to it: route_address only asks the kernel which source address it would use.
OUTSIDE = "198.51.100.7"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


class Recorder:
    """Injected route / is_local / check that remember how they were called."""

    def __init__(self, local: bool = False, addr: str | None = "192.168.1.5", ok: bool = True) -> None:
        self.local, self.addr, self.ok = local, addr, ok
        self.routes: list[tuple[str, int]] = []
        self.checks: list[str] = []

    def route(self, host: str, port: int) -> str | None:
        self.routes.append((host, port))
        return self.addr

    def is_local(self, hub_url: str) -> bool:
        return self.local

    def check(self, http: httpx.Client, url: str) -> bool:
        self.checks.append(url)
        return self.ok


def publish(
    http: httpx.Client,
    endpoint: str,
    rec: Recorder,
    hub: str = "http://hub.example:3000",
    kind: str | None = "ollama",
    **kwargs: Any,
) -> Publication:
    return publishable_endpoint(
        http, endpoint, hub, kind, route=rec.route, is_local=rec.is_local, check=rec.check, **kwargs
    )


# -- the rules, network injected ------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:11434", "http://localhost:11434", "http://[::1]:8080"]
)
def test_loopback_is_kept_for_a_hub_on_this_machine(http: httpx.Client, endpoint: str) -> None:
    rec = Recorder(local=True)
    assert publish(http, endpoint, rec) == Publication(endpoint, False, None)
    assert rec.routes == [] and rec.checks == []


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://0.0.0.0:11434", "http://127.0.0.1:11434"),
        ("http://[::]:1234/proxy", "http://[::1]:1234/proxy"),
    ],
)
def test_a_bind_address_is_never_published_even_for_a_local_hub(
    http: httpx.Client, endpoint: str, expected: str
) -> None:
    assert publish(http, endpoint, Recorder(local=True)) == Publication(expected, True, None)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:11434", "http://192.168.1.5:11434"),
        ("http://localhost:8080/ollama", "http://192.168.1.5:8080/ollama"),
        ("http://127.0.1.1:1234", "http://192.168.1.5:1234"),
        ("http://0.0.0.0:11434", "http://192.168.1.5:11434"),
        ("https://localhost", "https://192.168.1.5"),
    ],
)
def test_loopback_with_a_remote_hub_publishes_the_routed_address(
    http: httpx.Client, endpoint: str, expected: str
) -> None:
    rec = Recorder()
    assert publish(http, endpoint, rec) == Publication(expected, True, None)
    assert rec.routes == [("hub.example", 3000)]
    assert rec.checks == [expected]


def test_the_route_is_asked_for_the_hubs_port_or_its_schemes_default(http: httpx.Client) -> None:
    rec = Recorder()
    publish(http, "http://127.0.0.1:11434", rec, hub="https://rooms.example.org")
    publish(http, "http://127.0.0.1:11434", rec, hub="http://[fd00::9]:3000")
    assert rec.routes == [("rooms.example.org", 443), ("fd00::9", 3000)]


@pytest.mark.parametrize(
    ("kind", "fix"),
    [
        ("ollama", "OLLAMA_HOST=0.0.0.0"),
        ("lmstudio", "lms server start --bind 0.0.0.0"),
        ("llamacpp", "llama-server --host 0.0.0.0"),
        ("vllm", "vllm serve MODEL --host 0.0.0.0"),
        ("localai", "--address 0.0.0.0"),
        ("openai", "listen on all addresses (0.0.0.0)"),
        (None, "listen on all addresses (0.0.0.0)"),
    ],
)
def test_a_server_only_on_loopback_fails_with_its_fix(http: httpx.Client, kind: str | None, fix: str) -> None:
    with pytest.raises(EndpointError) as caught:
        publish(http, "http://127.0.0.1:11434", Recorder(ok=False), kind=kind)
    err = caught.value
    assert err.exit_code == 6
    assert err.message == (
        "the LLM server at http://127.0.0.1:11434 only listens on this machine;"
        " the hub at http://hub.example:3000 cannot reach it at http://192.168.1.5:11434"
    )
    assert err.hint is not None and fix in err.hint and "--force" in err.hint and "--advertise" in err.hint


def test_fix_hints_name_each_servers_own_switch() -> None:
    assert "restart Ollama" in fix_hint("ollama")
    assert "Serve on Local Network" in fix_hint("lmstudio")
    assert len({fix_hint(k) for k in ("ollama", "lmstudio", "llamacpp", "vllm", "localai", None)}) == 6


def test_force_publishes_the_routed_address_with_a_warning(http: httpx.Client) -> None:
    pub = publish(http, "http://localhost:11434", Recorder(ok=False), force=True)
    assert (pub.url, pub.rewritten) == ("http://192.168.1.5:11434", True)
    assert pub.warning is not None and "only listens on this machine" in pub.warning


def test_no_route_to_the_hub_fails_unless_forced(http: httpx.Client) -> None:
    with pytest.raises(EndpointError, match="no route to the hub") as caught:
        publish(http, "http://127.0.0.1:11434", Recorder(addr=None))
    assert caught.value.exit_code == 6
    pub = publish(http, "http://0.0.0.0:11434", Recorder(addr=None), force=True)
    assert (pub.url, pub.rewritten) == ("http://127.0.0.1:11434", True)
    assert pub.warning is not None


def test_a_loopback_route_means_the_hub_is_here_after_all(http: httpx.Client) -> None:
    rec = Recorder(addr="127.0.0.1")
    assert publish(http, "http://localhost:11434", rec) == Publication("http://localhost:11434", False)
    assert rec.checks == []


@pytest.mark.parametrize(
    "endpoint", ["http://192.168.1.20:11434", "http://gpu-box.lan:8080", "https://llm.example.com/v"]
)
@pytest.mark.parametrize("local", [True, False])
def test_a_lan_endpoint_is_published_as_is(http: httpx.Client, endpoint: str, local: bool) -> None:
    rec = Recorder(local=local, ok=False)
    assert publish(http, endpoint, rec) == Publication(endpoint, False, None)
    assert rec.routes == [] and rec.checks == []


def test_ipv6_loopback_gets_the_routed_address_of_either_family(http: httpx.Client) -> None:
    assert publish(http, "http://[::1]:8080", Recorder(addr="fd00::5")).url == "http://[fd00::5]:8080"
    assert publish(http, "http://[::1]:8080", Recorder(addr="10.0.0.3")).url == "http://10.0.0.3:8080"


def test_advertise_is_published_instead_once_it_answers(http: httpx.Client) -> None:
    rec = Recorder(local=True)
    pub = publish(http, "http://127.0.0.1:11434", rec, advertise="https://tunnel.example.net/llm/v1/")
    assert pub == Publication("https://tunnel.example.net/llm", True, None)
    assert rec.checks == ["https://tunnel.example.net/llm"]
    assert rec.routes == []


def test_advertise_that_does_not_answer_fails_unless_forced(http: httpx.Client) -> None:
    with pytest.raises(EndpointError, match="given with --advertise") as caught:
        publish(http, "http://127.0.0.1:11434", Recorder(ok=False), advertise="http://10.9.9.9:11434")
    assert caught.value.exit_code == 6
    pub = publish(http, "http://127.0.0.1:11434", Recorder(ok=False), advertise="10.9.9.9:11434", force=True)
    assert (pub.url, pub.rewritten) == ("http://10.9.9.9:11434", True)
    assert pub.warning is not None


def test_a_malformed_advertise_url_is_a_usage_error(http: httpx.Client) -> None:
    with pytest.raises(UsageError):
        publish(http, "http://127.0.0.1:11434", Recorder(), advertise="ftp://x")


# -- addresses, for real ----------------------------------------------------------------------------


def test_route_address_to_loopback_is_loopback() -> None:
    assert route_address("127.0.0.1", 9) == "127.0.0.1"


def test_route_address_of_a_name_that_cannot_be_resolved_is_none() -> None:
    # An empty label is refused before any lookup.
    assert route_address("bad..name", 80) is None


def _outside_address() -> str:
    addr = route_address(OUTSIDE, 9)
    if addr is None:
        pytest.skip(f"this machine has no route to {OUTSIDE} (no default route)")
    return addr


@pytest.mark.parametrize("hub", ["http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:3000"])
def test_a_loopback_hub_is_local(hub: str) -> None:
    assert hub_is_local(hub)


def test_this_machines_routed_address_is_local() -> None:
    assert hub_is_local(f"http://{_outside_address()}:3000")


def test_another_address_is_not_local() -> None:
    assert not hub_is_local(f"http://{OUTSIDE}:3000")


def test_hub_is_local_with_resolution_injected() -> None:
    mine = {"192.168.1.7", "fe80::1"}
    assert hub_is_local("http://hub.lan:3000", resolve=lambda h: ["192.168.1.7"], local_addrs=lambda: mine)
    assert hub_is_local("http://hub.lan", resolve=lambda h: ["fe80::1%eth0"], local_addrs=lambda: mine)
    assert not hub_is_local("http://hub.lan", resolve=lambda h: ["192.168.1.8"], local_addrs=lambda: mine)
    # Debian maps the host's own name to 127.0.1.1.
    assert hub_is_local("http://myhost:3000", resolve=lambda h: ["127.0.1.1"], local_addrs=set)
    # A name that does not resolve is treated as remote (its endpoint gets checked).
    assert not hub_is_local("http://nowhere.example", resolve=lambda h: [], local_addrs=lambda: mine)


def test_answers_counts_any_reply_but_a_proxys_gateway_errors() -> None:
    def client(status: int) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status)))

    for status, expected in ((200, True), (401, True), (404, True), (503, True), (502, False), (504, False)):
        with client(status) as http:
            assert answers(http, "http://10.0.0.1:11434") is expected, status

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with httpx.Client(transport=httpx.MockTransport(refuse)) as http:
        assert answers(http, "http://10.0.0.1:11434") is False


# -- real servers, bound to loopback only or to every address ----------------------------------------


class _ModelsHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]}).encode()
            self.send_response(200)
        else:
            body = b'{"error": "not found"}'
            self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@dataclass
class TinyServer:
    """An OpenAI-style server answering GET /v1/models, bound to `host` on a free port."""

    server: _Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def serve() -> Iterator[Callable[[str], TinyServer]]:
    started: list[TinyServer] = []

    def start(host: str) -> TinyServer:
        server = _Server((host, 0), _ModelsHandler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="tiny-llm", daemon=True)
        thread.start()
        started.append(TinyServer(server, thread))
        return started[-1]

    yield start
    for tiny in started:
        tiny.server.shutdown()
        tiny.server.server_close()
        tiny.thread.join(5)


def test_this_machines_own_address_tells_loopback_only_servers_apart(
    http: httpx.Client, serve: Callable[[str], TinyServer]
) -> None:
    """Without a second machine: the routed address of this host, for a hub said to be remote."""
    addr = _outside_address()
    if addr.startswith("127."):
        pytest.skip(f"the route to {OUTSIDE} leaves through loopback ({addr})")
    everywhere, loopback = serve("0.0.0.0"), serve("127.0.0.1")

    def remote(url: str) -> bool:
        return False

    hub = f"http://{OUTSIDE}:3000"
    pub = publishable_endpoint(http, f"http://localhost:{everywhere.port}", hub, "openai", is_local=remote)
    assert pub == Publication(f"http://{addr}:{everywhere.port}", True, None)
    with pytest.raises(EndpointError, match="only listens on this machine"):
        publishable_endpoint(http, f"http://127.0.0.1:{loopback.port}", hub, "openai", is_local=remote)


# -- end to end: a hub host of our own, in a network namespace --------------------------------------


@dataclass
class Netns:
    name: str
    host_addr: str  # this side of the veth pair
    ns_addr: str  # the namespace's side: the hub's host

    def run(self, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout
        )


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)


def _free_subnet() -> int:
    used = _ip("-o", "addr").stdout
    for _ in range(50):
        x = secrets.randbelow(256)
        if f"10.231.{x}." not in used:
            return x
    pytest.skip("no free 10.231.X.0/30 subnet found for the test namespace")


@contextlib.contextmanager
def _namespace(tag: str) -> Iterator[Netns]:
    """The namespace and its veth pair; removed in a finaliser whatever happens, including a skip at
    any step after the namespace exists."""
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    name, veth_host, veth_ns = f"llmroom-t{tag}", f"lrt{tag}h", f"lrt{tag}n"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(
            f"cannot create a network namespace (needs root and netns support): {made.stderr.strip()}"
        )
    try:
        x = _free_subnet()
        ns = Netns(name, f"10.231.{x}.1", f"10.231.{x}.2")
        steps = [
            ["link", "add", veth_host, "type", "veth", "peer", "name", veth_ns],
            ["link", "set", veth_ns, "netns", name],
            ["addr", "add", f"{ns.host_addr}/30", "dev", veth_host],
            ["link", "set", veth_host, "up"],
            ["-n", name, "addr", "add", f"{ns.ns_addr}/30", "dev", veth_ns],
            ["-n", name, "link", "set", veth_ns, "up"],
            ["-n", name, "link", "set", "lo", "up"],
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot set up the veth pair (`ip {' '.join(step)}`): {done.stderr.strip()}")
        yield ns
    finally:
        _ip("link", "del", veth_host)  # takes its peer in the namespace with it
        _ip("netns", "del", name)
        assert name not in _ip("netns", "list").stdout
        assert veth_host not in _ip("link").stdout


@pytest.fixture
def netns() -> Iterator[Netns]:
    with _namespace(secrets.token_hex(3)) as ns:
        yield ns


def test_a_skip_after_the_namespace_exists_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a namespace at all")
    tag = secrets.token_hex(3)

    def no_subnet() -> int:
        pytest.skip("no free subnet (simulated)")

    monkeypatch.setattr(sys.modules[__name__], "_free_subnet", no_subnet)
    with pytest.raises(pytest.skip.Exception), _namespace(tag):
        raise AssertionError("not reached")
    assert f"llmroom-t{tag}" not in _ip("netns", "list").stdout


HUB_IN_NS = """
import sys
from llmroom_cli.hub import start_hub
hub = start_hub(sys.argv[1], 0)
print(hub.url, flush=True)
sys.stdin.read()
hub.stop()
"""


@pytest.fixture
def ns_hub(netns: Netns) -> Iterator[str]:
    """A real hub running inside the namespace, on its veth address; yields its URL."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", HUB_IN_NS, netns.ns_addr],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith(f"http://{netns.ns_addr}:"), (url, proc.stderr.read() if proc.stderr else "")
        yield url
    finally:
        try:
            proc.communicate("", timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


FETCH = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/v1/models", timeout=3) as r:
    print(r.status, r.read().decode())
"""


def test_end_to_end_a_hub_in_another_namespace_reaches_only_the_all_addresses_server(
    http: httpx.Client, netns: Netns, ns_hub: str, serve: Callable[[str], TinyServer]
) -> None:
    everywhere, loopback = serve("0.0.0.0"), serve("127.0.0.1")
    # The hub is elsewhere: its address is none of ours, and the route to it goes over the veth.
    assert not hub_is_local(ns_hub)
    assert route_address(netns.ns_addr, 3000) == netns.host_addr
    with httpx.Client(trust_env=False) as direct:
        assert direct.get(ns_hub + "/health").json()["status"] == "ok"

    pub = publishable_endpoint(http, f"http://127.0.0.1:{everywhere.port}", ns_hub, "llamacpp")
    assert pub == Publication(f"http://{netns.host_addr}:{everywhere.port}", True, None)
    # What the hub will do: fetch it from inside the namespace.
    fetched = netns.run(sys.executable, "-c", FETCH, pub.url)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.startswith("200 ") and "tiny-chat" in fetched.stdout

    with pytest.raises(EndpointError) as caught:
        publishable_endpoint(http, f"http://localhost:{loopback.port}", ns_hub, "llamacpp")
    assert caught.value.exit_code == 6
    assert f"cannot reach it at http://{netns.host_addr}:{loopback.port}" in caught.value.message
    assert caught.value.hint is not None and "llama-server --host 0.0.0.0" in caught.value.hint
    # ... and indeed the namespace cannot reach it.
    refused = netns.run(sys.executable, "-c", FETCH, f"http://{netns.host_addr}:{loopback.port}")
    assert refused.returncode != 0 and "refused" in refused.stderr.lower()

    forced = publishable_endpoint(http, f"http://0.0.0.0:{loopback.port}", ns_hub, "llamacpp", force=True)
    assert forced.url == f"http://{netns.host_addr}:{loopback.port}" and forced.warning is not None


def test_end_to_end_doctor_reports_the_address_the_namespaced_hub_would_use(
    http: httpx.Client, ns_hub: str, netns: Netns, serve: Callable[[str], TinyServer]
) -> None:
    from llmroom_cli.doctor import build_report

    everywhere, loopback = serve("0.0.0.0"), serve("127.0.0.1")
    good = build_report(http, ns_hub, f"http://127.0.0.1:{everywhere.port}", env={})
    assert good.exit_code() == 0, [c for c in good.checks if not c.ok]
    assert good.data["publication"]["url"] == f"http://{netns.host_addr}:{everywhere.port}"
    assert good.data["hub"]["reachable"] is True

    bad = build_report(http, ns_hub, f"http://127.0.0.1:{loopback.port}", env={})
    assert bad.exit_code() == 6
    failing = [c for c in bad.checks if not c.ok]
    assert [c.name for c in failing] == ["published address"]
    assert "only listens on this machine" in failing[0].detail
