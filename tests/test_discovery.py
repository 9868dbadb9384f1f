"""LAN discovery: parsing zeroconf's objects, health checks, picking a hub, and real mDNS end to end.

The end-to-end tests announce and browse over real multicast. Each first checks that multicast works on
the address it uses (a plain UDP round trip on a private group) and skips with the reason when it does
not; the network-namespace test runs only as root with iproute2, and removes what it creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import ipaddress
import os
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from llmroom_cli import discovery
from llmroom_cli.discovery import SERVICE_TYPE, Announcement, FoundHub, MulticastError
from llmroom_cli.errors import HubUnavailable, UsageError
from llmroom_cli.hub import RunningHub, start_hub

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 10.0  # a hang guard: the waits below return as soon as their condition holds


def _info(
    port: int | None = 3000,
    addresses: list[str] | None = None,
    properties: dict[str, str] | None = None,
    name: str = "gambiarra-hub-3000",
) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties={"version": "1.0", "protocol": "http"} if properties is None else properties,
        server="alice-laptop.local.",
        parsed_addresses=["192.168.1.20"] if addresses is None else addresses,
    )


def _found(name: str, healthy: bool | None, port: int = 3000) -> FoundHub:
    host = f"192.168.1.{port % 250}"
    return FoundHub(
        name=name,
        host=host,
        port=port,
        addresses=[host],
        txt={"version": "1.0"},
        url=f"http://{host}:{port}",
        healthy=healthy,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- parsing zeroconf's ServiceInfo -----------------------------------------------------------------


def test_hub_from_info_reads_the_reference_announcement() -> None:
    hub = discovery.hub_from_info(_info())
    assert hub == FoundHub(
        name="gambiarra-hub-3000",
        host="192.168.1.20",
        port=3000,
        addresses=["192.168.1.20"],
        txt={"version": "1.0", "protocol": "http"},
        url="http://192.168.1.20:3000",
        server="alice-laptop.local",
    )
    assert hub.version == "1.0"
    data = hub.to_json()
    assert {"name", "url", "host", "port", "addresses", "txt", "healthy"} <= set(data)
    assert data["healthy"] is None and data["version"] == "1.0"


def test_hub_from_info_prefers_a_routable_ipv4_address_and_brackets_ipv6() -> None:
    hub = discovery.hub_from_info(_info(addresses=["127.0.0.1", "fe80::1", "fd00::5", "10.0.0.7"]))
    assert hub is not None
    assert hub.addresses == ["10.0.0.7", "fd00::5", "fe80::1", "127.0.0.1"]
    assert hub.url == "http://10.0.0.7:3000"
    only_v6 = discovery.hub_from_info(_info(addresses=["fd00::5"]))
    assert only_v6 is not None and only_v6.url == "http://[fd00::5]:3000"
    assert discovery.hub_url("fe80::1%eth0", 80) == "http://[fe80::1%25eth0]:80"


def test_hub_from_info_keeps_odd_txt_and_rejects_what_cannot_be_reached() -> None:
    hub = discovery.hub_from_info(_info(properties={"version": "2.0", "flag": None}))  # type: ignore[dict-item]
    assert hub is not None and hub.txt == {"version": "2.0", "flag": ""}
    https = discovery.hub_from_info(_info(properties={"protocol": "https"}))
    assert https is not None and https.url.startswith("https://")
    assert discovery.hub_from_info(_info(addresses=[])) is None
    assert discovery.hub_from_info(_info(port=None)) is None
    assert discovery.instance_name(f"My Hub.{SERVICE_TYPE}") == "My Hub"


# -- picking a hub ----------------------------------------------------------------------------------


def test_pick_hub_takes_the_one_healthy_hub_and_ignores_the_rest() -> None:
    good = _found("gambiarra-hub-3000", True)
    dead = _found("gambiarra-hub-3001", False, port=3001)
    unchecked = _found("gambiarra-hub-3002", None, port=3002)
    assert discovery.pick_hub([dead, good, unchecked], ask=None) is good


def test_pick_hub_with_several_asks_or_refuses_listing_them() -> None:
    a, b = _found("gambiarra-hub-3000", True), _found("gambiarra-hub-3001", True, port=3001)
    dead = _found("gambiarra-hub-3002", False, port=3002)
    offered: list[list[FoundHub]] = []

    def ask(hubs: list[FoundHub]) -> FoundHub:
        offered.append(hubs)
        return hubs[1]

    assert discovery.pick_hub([a, dead, b], ask=ask) is b
    assert offered == [[a, b]]
    with pytest.raises(UsageError) as err:
        discovery.pick_hub([a, dead, b], ask=None)
    assert err.value.exit_code == 2
    assert a.url in str(err.value) and b.url in str(err.value) and dead.url not in str(err.value)


def test_pick_hub_with_none_healthy_says_so() -> None:
    with pytest.raises(HubUnavailable) as err:
        discovery.pick_hub([], ask=None)
    assert err.value.exit_code == 5
    assert "no hub found on the local network" in str(err.value)
    assert SERVICE_TYPE in str(err.value)
    dead = _found("gambiarra-hub-3000", False)
    with pytest.raises(HubUnavailable) as err:
        discovery.pick_hub([dead], ask=lambda hubs: hubs[0])
    assert "no hub found on the local network" in str(err.value) and dead.url in str(err.value)


# -- health -----------------------------------------------------------------------------------------


def test_check_health_against_a_real_hub(hub: RunningHub) -> None:
    found = discovery.hub_from_info(_info(port=hub.port, addresses=["127.0.0.1"]))
    assert found is not None
    gone = FoundHub("gone", "127.0.0.1", _closed_port(), ["127.0.0.1"], {}, "http://127.0.0.1:1")
    discovery.check_health([found, gone], timeout_s=2.0)
    assert found.healthy is True and found.rtt_ms is not None and 0 < found.rtt_ms < 2000
    assert found.url == hub.url and found.error is None
    assert gone.healthy is False and gone.rtt_ms is None and gone.error


def test_check_health_moves_to_the_address_that_answers(hub: RunningHub) -> None:
    # The hub listens on 127.0.0.1 only: 127.0.0.2 (ranked first, as a routable-looking address would be
    # were it not loopback) refuses, so the hub's url becomes the address that answered.
    found = FoundHub("h", "127.0.0.2", hub.port, ["127.0.0.2", "127.0.0.1"], {}, "http://127.0.0.2:0")
    discovery.check_health([found], timeout_s=1.0)
    assert found.healthy is True and found.host == "127.0.0.1" and found.url == hub.url


def test_check_health_rejects_something_that_is_not_a_hub() -> None:
    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        found = FoundHub("web", "127.0.0.1", port, ["127.0.0.1"], {}, f"http://127.0.0.1:{port}")
        discovery.check_health([found], timeout_s=2.0)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert found.healthy is False and found.error is not None and "JSON" in found.error


# -- what gets announced ----------------------------------------------------------------------------


def test_announced_addresses_follow_the_bind_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "local_ipv4_addresses", lambda: ["192.168.1.20", "10.0.0.7"])
    assert discovery.announced_addresses("0.0.0.0") == (["192.168.1.20", "10.0.0.7"], None)
    assert discovery.announced_addresses("::") == (["192.168.1.20", "10.0.0.7"], None)
    assert discovery.announced_addresses("192.168.1.20") == (["192.168.1.20"], ["192.168.1.20"])
    # 127.0.0.1 announced to the LAN would send everyone to their own machine: loopback stays on loopback.
    assert discovery.announced_addresses("127.0.0.1") == (["127.0.0.1"], ["127.0.0.1"])
    assert discovery.announced_addresses("localhost")[0][0] in ("127.0.0.1", "::1")
    monkeypatch.setattr(discovery, "local_ipv4_addresses", lambda: [])
    assert discovery.announced_addresses("0.0.0.0") == (["127.0.0.1"], ["127.0.0.1"])
    with pytest.raises(UsageError):
        discovery.announced_addresses("no-such-host.invalid")


def test_local_ipv4_addresses_are_real_and_not_loopback() -> None:
    for address in discovery.local_ipv4_addresses():
        ip = ipaddress.ip_address(address)
        assert ip.version == 4 and not ip.is_loopback


def test_multicast_failure_is_an_llmroom_error_not_a_crash() -> None:
    # An address in TEST-NET-2 that no interface here carries: zeroconf cannot join the group on it.
    bogus = next(f"198.51.100.{i}" for i in range(1, 255) if f"198.51.100.{i}" not in _local_ips())
    announcement = Announcement(3000, host=bogus)
    with pytest.raises(MulticastError) as err:
        announcement.start()
    assert err.value.exit_code == 5 and bogus in str(err.value)
    announcement.close()
    announcement.close()  # idempotent
    with pytest.raises(MulticastError):
        discovery.browse(0.1, interfaces=[bogus])


def test_a_socket_error_inside_zeroconf_becomes_a_multicast_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import zeroconf

    def no_multicast(*args: object, **kwargs: object) -> Zeroconf:
        raise OSError(errno.ENODEV, "No such device")  # what Linux says without a multicast route

    monkeypatch.setattr(zeroconf, "Zeroconf", no_multicast)
    with pytest.raises(MulticastError) as err:
        Announcement(3000, host="0.0.0.0").start()
    assert "No such device" in str(err.value) and "--hub" in str(err.value)
    with pytest.raises(MulticastError):
        discovery.discover(0.1)


def test_importing_the_package_does_not_import_zeroconf() -> None:
    code = (
        "import sys, llmroom_cli.discovery, llmroom_cli.cli\n"
        "bad = [m for m in ('zeroconf', 'ifaddr') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- real multicast ---------------------------------------------------------------------------------


def _local_ips() -> set[str]:
    return {"127.0.0.1", *discovery.local_ipv4_addresses()}


def _multicast_round_trip(interface: str, timeout_s: float = 1.0) -> str | None:
    """None when a datagram sent to a private multicast group on `interface` comes back, else why not."""
    group = f"239.255.{random.randint(0, 255)}.{random.randint(1, 254)}"
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("", 0))
            port = rx.getsockname()[1]
            mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            rx.settimeout(timeout_s)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            token = secrets.token_bytes(8)
            tx.sendto(token, (group, port))
            while True:
                if rx.recv(64) == token:
                    return None
    except OSError as exc:
        return f"multicast does not work on {interface} here: {exc}"


def _need_multicast(interface: str) -> None:
    why = _multicast_round_trip(interface)
    if why:
        pytest.skip(why)


def _mine(hubs: list[FoundHub], port: int) -> FoundHub:
    matches = [h for h in hubs if h.port == port and h.name == f"gambiarra-hub-{port}"]
    assert len(matches) == 1, [h.to_json() for h in hubs]
    return matches[0]


def test_announce_on_loopback_and_find_it_in_the_same_process(hub: RunningHub) -> None:
    _need_multicast("127.0.0.1")
    with Announcement(hub.port, host="127.0.0.1") as announcement:
        assert announcement.addresses == ["127.0.0.1"]
        assert announcement.wait(WAIT_S), "the announcement never went out"
        found = _mine(discovery.discover(1.0), hub.port)
    assert found.healthy is True and found.rtt_ms is not None
    assert found.url == hub.url and found.addresses == ["127.0.0.1"]
    assert found.txt == {"version": "1.0", "protocol": "http"}
    assert found.server.endswith(".local")


def test_both_service_types_are_found_and_each_hubs_generation_shown(hub: RunningHub) -> None:
    from tests.fake_gambi_v06 import FakeGambiV06

    _need_multicast("127.0.0.1")
    with FakeGambiV06() as fake:
        v06 = Announcement(fake.port, host="127.0.0.1", service_type=discovery.V06_SERVICE_TYPE)
        with Announcement(hub.port, host="127.0.0.1") as ours, v06:
            assert v06.name == f"gambi-hub-{fake.port}"  # the name the renamed reference hub uses
            assert ours.wait(WAIT_S) and v06.wait(WAIT_S), "an announcement never went out"
            hubs = discovery.discover(1.0)
            from tests.helpers import cli

            listed = cli("hubs", "--timeout", "1.5")
        assert listed.returncode == 0, listed.stderr
        rows = {line.split("\t")[0]: line.split("\t") for line in listed.stdout.splitlines()}
        assert rows[f"gambi-hub-{fake.port}"][2] == "v0.6"
        assert rows[f"gambiarra-hub-{hub.port}"][2] == "v0.1 + v0.6"
        found_v06 = [h for h in hubs if h.port == fake.port]
        assert len(found_v06) == 1, [h.to_json() for h in hubs]
        assert found_v06[0].name == f"gambi-hub-{fake.port}"
        assert found_v06[0].service_type == "_gambi._tcp.local."
        # The reference v0.6 hub 404s GET /health: it still answers, on /v1/health.
        assert found_v06[0].healthy is True and found_v06[0].generation == "v0.6"
        assert _mine(hubs, hub.port).generation == "both"
        assert found_v06[0].to_json()["generation"] == "v0.6"


def test_announce_on_the_wildcard_uses_the_lan_addresses() -> None:
    lan = discovery.local_ipv4_addresses()
    if not lan:
        pytest.skip("this machine has no non-loopback IPv4 address")
    _need_multicast(lan[0])
    h = start_hub(host="0.0.0.0", port=0)
    try:
        with Announcement(h.port) as announcement:
            assert announcement.addresses == lan
            assert announcement.wait(WAIT_S)
            found = _mine(discovery.discover(1.0), h.port)
    finally:
        h.stop()
    assert found.healthy is True and found.host in lan and sorted(found.addresses) == sorted(lan)


def test_close_says_goodbye_to_a_browser_that_saw_it(hub: RunningHub) -> None:
    _need_multicast("127.0.0.1")
    fullname = f"gambiarra-hub-{hub.port}.{SERVICE_TYPE}"
    added, removed = threading.Event(), threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == fullname:
            (removed if state_change is ServiceStateChange.Removed else added).set()

    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        announcement = Announcement(hub.port, host="127.0.0.1").start()
        try:
            assert added.wait(WAIT_S), "the browser never saw the announcement"
            assert not removed.is_set()
        finally:
            announcement.close()
        assert removed.wait(WAIT_S), "close() sent no goodbye"
        browser.cancel()
    finally:
        zc.close()


def test_close_while_still_probing_is_quick_and_clean() -> None:
    _need_multicast("127.0.0.1")
    announcement = Announcement(_closed_port(), host="127.0.0.1").start()
    announcement.close()  # the probes take about a second: this lands in the middle of them
    assert announcement.wait(1.0) is False
    announcement.close()


def test_a_second_hub_on_the_same_port_gets_another_name() -> None:
    _need_multicast("127.0.0.1")
    port = _closed_port()  # only the name matters here: nothing needs to listen
    with Announcement(port, host="127.0.0.1") as first:
        assert first.wait(WAIT_S)
        with Announcement(port, host="127.0.0.1") as second:
            # Both responders share 127.0.0.1:5353 (SO_REUSEPORT), so the unicast answer to the
            # second's QU probe goes to whichever socket the kernel picks, often the first's own. A
            # defending host on another machine is reached; here the first re-announces by multicast
            # (which every socket receives) while the second is still probing.
            assert first._zc is not None and first._info is not None
            assert first._zc.loop is not None
            asyncio.run_coroutine_threadsafe(first._zc.async_update_service(first._info), first._zc.loop)
            assert second.wait(WAIT_S)
            assert first.name == f"gambiarra-hub-{port}"
            assert second.name == f"gambiarra-hub-{port}-2"


ANNOUNCER = """
import sys
from llmroom_cli.discovery import Announcement
from llmroom_cli.hub import start_hub
hub = start_hub(host=sys.argv[1], port=0)
with Announcement(hub.port, host=sys.argv[1]) as announcement:
    assert announcement.wait(10.0)
    print("announced", hub.port, " ".join(announcement.addresses), flush=True)
    sys.stdin.read()  # until the test closes our stdin
hub.stop()
print("withdrawn", flush=True)
"""


@contextlib.contextmanager
def _announcer(host: str, prefix: list[str] | None = None) -> Iterator[tuple[int, list[str]]]:
    """Run ANNOUNCER in a child process; yields (its hub's port, the addresses it announced)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", ANNOUNCER, host],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        line = child.stdout.readline()  # the child's own 10 s wait bounds this
        assert line.startswith("announced "), (line, child.stderr.read() if child.stderr else "")
        _, port, *addresses = line.split()
        yield int(port), addresses
        child.stdin.close()
        assert child.stdout.readline() == "withdrawn\n"
        assert child.wait(WAIT_S) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.slow
def test_announced_by_another_process_and_found_here() -> None:
    _need_multicast("127.0.0.1")
    with _announcer("127.0.0.1") as (port, addresses):
        assert addresses == ["127.0.0.1"]
        found = _mine(discovery.discover(1.0), port)
        assert found.healthy is True and found.url == f"http://127.0.0.1:{port}"


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, our address, its address).

    Addresses come from a random /30 in 10.232.0.0/16; the namespace (and with it both veth ends) is
    deleted afterwards whatever happens.
    """
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("a network namespace needs iproute2's `ip`")
    tag = secrets.token_hex(3)
    ns, ours, theirs = f"llmroom-test-{tag}", f"lrva{tag}", f"lrvb{tag}"
    block = random.randrange(0, 1 << 14) * 4
    here = f"10.232.{block >> 8}.{(block & 255) + 1}"
    there = f"10.232.{block >> 8}.{(block & 255) + 2}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ip, *args], capture_output=True, text=True, timeout=30)

    made = run("netns", "add", ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        for step in (
            ("link", "add", ours, "type", "veth", "peer", "name", theirs),
            ("link", "set", theirs, "netns", ns),
            ("addr", "add", f"{here}/30", "dev", ours),
            ("link", "set", ours, "up"),
            ("-n", ns, "addr", "add", f"{there}/30", "dev", theirs),
            ("-n", ns, "link", "set", theirs, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ):
            done = run(*step)
            assert done.returncode == 0, (step, done.stderr)
        yield ns, here, there
    finally:
        run("link", "del", ours)  # usually already gone with the namespace; harmless otherwise
        run("netns", "del", ns)
        assert ns not in run("netns", "list").stdout, f"namespace {ns} left behind"


@pytest.mark.slow
def test_announced_from_another_network_namespace_over_a_veth_link(netns: tuple[str, str, str]) -> None:
    ns, here, there = netns
    why = _multicast_round_trip(here)
    assert why is None, why
    with _announcer("0.0.0.0", prefix=["ip", "netns", "exec", ns]) as (port, addresses):
        assert addresses == [there]
        found = _mine(discovery.discover(1.5, interfaces=[here]), port)
        assert found.healthy is True and found.url == f"http://{there}:{port}"
