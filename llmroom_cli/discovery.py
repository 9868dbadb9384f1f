"""LAN discovery of hubs over mDNS / DNS-SD: browse for them, check them, pick one, announce our own.

The reference hub v0.1 announces itself as service type `_gambiarra._tcp.local.`, instance
`gambiarra-hub-<port>`, TXT `version=1.0` and `protocol=http`; the renamed v0.6 hub (Gambi) announces
`_gambi._tcp.local.`, instance `gambi-hub-<port>`. `Announcement` does the v0.1 one for `llmroom serve
--mdns` (or either, by `service_type`), and `browse()` / `discover()` find both types; `check_health`
tells each hub's generation from the health route that answers (`/health` v0.1, `/v1/health` v0.6).

zeroconf is imported only inside the functions that need it (it costs tens of milliseconds and opens
sockets), so no other command pays for it. Like the rest of the core, nothing here prints or exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from llmroom_cli.errors import HubUnavailable, UsageError

if TYPE_CHECKING:  # only for annotations: never imported at run time from here
    from zeroconf import ServiceInfo, Zeroconf

SERVICE_TYPE = "_gambiarra._tcp.local."
INSTANCE_PREFIX = "gambiarra-hub-"
V06_SERVICE_TYPE = "_gambi._tcp.local."
V06_INSTANCE_PREFIX = "gambi-hub-"
SERVICE_TYPES = (SERVICE_TYPE, V06_SERVICE_TYPE)
_PREFIXES = {SERVICE_TYPE: INSTANCE_PREFIX, V06_SERVICE_TYPE: V06_INSTANCE_PREFIX}
TXT_VERSION = "1.0"
# A found service that is not in the cache after the browse gets this long to answer SRV/TXT/A queries.
RESOLVE_TIMEOUT_S = 1.0
# Addresses tried per hub by check_health (the best-ranked one that answers becomes its url).
MAX_ADDRESSES_TRIED = 4
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


class MulticastError(HubUnavailable):
    """mDNS cannot run here: the multicast sockets could not be opened (no network, no route, sandbox)."""


@dataclass
class FoundHub:
    """One hub announced on the local network; `host`/`url` name the address found (or checked) best."""

    name: str
    host: str
    port: int
    addresses: list[str]
    txt: dict[str, str]
    url: str
    healthy: bool | None = None
    rtt_ms: float | None = None
    server: str = ""
    error: str | None = field(default=None, compare=False)
    service_type: str = SERVICE_TYPE
    # "v0.1", "v0.6" or "both", from the health route(s) that answered; None until checked.
    generation: str | None = None

    @property
    def version(self) -> str | None:
        return self.txt.get("version")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "addresses": list(self.addresses),
            "server": self.server,
            "version": self.version,
            "txt": dict(self.txt),
            "healthy": self.healthy,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 1),
            "error": self.error,
            "service_type": self.service_type,
            "generation": self.generation,
        }


# -- addresses --------------------------------------------------------------------------------------


def _rank(address: str) -> int:
    """Lower is tried first: routable IPv4, then IPv6, then link-local, loopback last."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return 9
    if ip.is_loopback:
        return 5
    if ip.is_link_local:
        return 3 if ip.version == 4 else 4
    return 0 if ip.version == 4 else 1


def hub_url(host: str, port: int, protocol: str = "http") -> str:
    """The base URL for an address: IPv6 in brackets, a zone id escaped as RFC 6874 asks."""
    scheme = protocol if protocol in ("http", "https") else "http"
    if ":" in host:
        return f"{scheme}://[{host.replace('%', '%25')}]:{port}"
    return f"{scheme}://{host}:{port}"


def instance_name(fullname: str) -> str:
    """`gambiarra-hub-3000._gambiarra._tcp.local.` -> `gambiarra-hub-3000` (and `gambi-hub-3000` of
    `_gambi._tcp.local.`)."""
    for service_type in SERVICE_TYPES:
        suffix = "." + service_type
        if fullname.lower().endswith(suffix):
            return fullname[: -len(suffix)]
    return fullname.rstrip(".")


def hub_from_info(info: ServiceInfo) -> FoundHub | None:
    """A FoundHub from a resolved zeroconf ServiceInfo; None when it lacks a port or any address."""
    if not info.port:
        return None
    addresses = sorted(dict.fromkeys(info.parsed_scoped_addresses()), key=_rank)
    if not addresses:
        return None
    txt = {str(k): "" if v is None else str(v) for k, v in info.decoded_properties.items()}
    host = addresses[0]
    service_type = next((t for t in SERVICE_TYPES if info.type.lower() == t), SERVICE_TYPE)
    return FoundHub(
        name=instance_name(info.name),
        host=host,
        port=int(info.port),
        addresses=addresses,
        txt=txt,
        url=hub_url(host, int(info.port), txt.get("protocol", "http")),
        server=(info.server or "").rstrip("."),
        service_type=service_type,
    )


# -- browsing ---------------------------------------------------------------------------------------


def _open_zeroconf(interfaces: Sequence[str] | None, ip_v6: bool = False) -> Zeroconf:
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    if interfaces:
        # Checked here because zeroconf, failing to join a group on a missing address, leaks a socket.
        missing = [a for a in interfaces if "." in a and a not in local_ipv4_addresses(loopback=True)]
        if missing:
            raise MulticastError(
                f"cannot use mDNS on {', '.join(missing)}: no interface here has that address",
                "check --host",
            )
    choice: Any = list(interfaces) if interfaces else InterfaceChoice.All
    version = IPVersion.All if ip_v6 else IPVersion.V4Only
    try:
        # use_asyncio=False: always zeroconf's own loop thread, even when called under a running loop.
        return Zeroconf(interfaces=choice, ip_version=version, use_asyncio=False)
    except OSError as exc:
        where = f"on {', '.join(interfaces)}" if interfaces else "on this machine"
        raise MulticastError(
            f"cannot use mDNS {where}: {exc.strerror or exc}",
            "is there a network interface with multicast? pass --hub URL instead",
        ) from None


def browse(timeout_s: float = 1.5, *, interfaces: Sequence[str] | None = None) -> list[FoundHub]:
    """Browse both service types (`_gambiarra._tcp.local.`, `_gambi._tcp.local.`) for `timeout_s` and
    return every hub resolved, deduplicated by URL.

    `interfaces` is a list of local IP addresses to browse on (default: all of them). Takes `timeout_s`
    plus, only for a service whose records did not arrive with its announcement, up to
    RESOLVE_TIMEOUT_S more. Does not contact the hubs: see check_health() / discover().
    """
    from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange

    zc = _open_zeroconf(interfaces)
    # lower-cased full name -> (service type, full name), in the order found
    names: dict[str, tuple[str, str]] = {}
    lock = threading.Lock()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        with lock:
            if state_change is ServiceStateChange.Removed:
                names.pop(name.lower(), None)
            else:
                names.setdefault(name.lower(), (service_type, name))

    try:
        browser = ServiceBrowser(zc, list(SERVICE_TYPES), handlers=[on_change])
        try:
            time.sleep(max(0.0, timeout_s))
        finally:
            browser.cancel()
        with lock:
            found = list(names.values())

        def resolve(found_name: tuple[str, str]) -> FoundHub | None:
            service_type, name = found_name
            info = ServiceInfo(service_type, name)
            # The answer to our query usually carries SRV, TXT and A records: the cache has them all.
            if not info.load_from_cache(zc) and not info.request(zc, int(RESOLVE_TIMEOUT_S * 1000)):
                return None
            return hub_from_info(info)

        if not found:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
            resolved = list(pool.map(resolve, found))
    finally:
        zc.close()
    hubs: list[FoundHub] = []
    seen_urls: set[str] = set()
    for hub in resolved:
        if hub is not None and hub.url not in seen_urls:
            seen_urls.add(hub.url)
            hubs.append(hub)
    return hubs


# -- health -----------------------------------------------------------------------------------------


def _probe(
    host: str, port: int, timeout_s: float, https: bool
) -> tuple[float | None, str | None, str | None]:
    """(round trip in ms, None, generation) when it answers like a hub, else (None, why, None).

    `GET /health` (v0.1) first, then `GET /v1/health` (v0.6): a hub speaking both is "both"."""
    rtt_ms, why = _probe_path(host, port, timeout_s, https, "/health")
    rtt_v06, why_v06 = _probe_path(host, port, timeout_s, https, "/v1/health")
    if rtt_ms is not None and rtt_v06 is not None:
        return rtt_ms, None, "both"
    if rtt_ms is not None:
        return rtt_ms, None, "v0.1"
    if rtt_v06 is not None:
        return rtt_v06, None, "v0.6"
    # Both failed: a v0.1 404 says less than what /v1/health answered (a v0.6 hub in trouble, say).
    return None, why_v06 if (why or "").endswith("answered 404") else why, None


def _probe_path(
    host: str, port: int, timeout_s: float, https: bool, path: str
) -> tuple[float | None, str | None]:
    """GET `path` once: (round trip in ms, None) when it answers a health object, else (None, why)."""
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    # http.client on purpose: a LAN address must never go through the user's HTTP proxy.
    conn = cls(host, port, timeout=timeout_s)
    start = time.perf_counter()
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(64 << 10)
        rtt_ms = (time.perf_counter() - start) * 1000.0
        if resp.status != 200:
            return None, f"GET {path} answered {resp.status}"
        try:
            data = json.loads(body)
        except ValueError:
            return None, f"GET {path} did not answer JSON"
        if not isinstance(data, dict):
            return None, f"GET {path} did not answer a JSON object"
        return rtt_ms, None
    except (OSError, http.client.HTTPException) as exc:
        from llmroom_cli.errors import describe_os_error

        return None, describe_os_error(exc, host, port)
    finally:
        conn.close()


def check_health(hubs: list[FoundHub], timeout_s: float = 1.0) -> None:
    """Fill `healthy`, `rtt_ms`, `generation` (and `error`) of each hub with concurrent health checks.

    A hub announcing several addresses is tried on up to MAX_ADDRESSES_TRIED of them at once; the
    best-ranked one that answers becomes its `host` and `url`. Takes about `timeout_s` at worst.
    """
    jobs = [(hub, addr) for hub in hubs for addr in hub.addresses[:MAX_ADDRESSES_TRIED]]
    if not jobs:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        results = list(
            pool.map(lambda j: _probe(j[1], j[0].port, timeout_s, j[0].txt.get("protocol") == "https"), jobs)
        )
    for hub in hubs:
        mine = [(addr, res) for (h, addr), res in zip(jobs, results, strict=True) if h is hub]
        ok = [(addr, rtt, gen) for addr, (rtt, _, gen) in mine if rtt is not None]
        if ok:
            addr, rtt, gen = ok[0]  # jobs keep the order of hub.addresses, best-ranked first
            hub.healthy, hub.rtt_ms, hub.error, hub.generation = True, rtt, None, gen
            hub.host, hub.url = addr, hub_url(addr, hub.port, hub.txt.get("protocol", "http"))
        else:
            hub.healthy, hub.rtt_ms = False, None
            hub.error = mine[0][1][1] if mine else "no address"


def discover(timeout_s: float = 1.5, *, interfaces: Sequence[str] | None = None) -> list[FoundHub]:
    """browse() then check_health(): every hub announced, each marked healthy or not."""
    hubs = browse(timeout_s, interfaces=interfaces)
    check_health(hubs, timeout_s=min(1.0, max(0.3, timeout_s)))
    return hubs


def _describe(hubs: list[FoundHub]) -> str:
    return ", ".join(f"{h.name} at {h.url}" for h in hubs)


def pick_hub(hubs: list[FoundHub], ask: Callable[[list[FoundHub]], FoundHub] | None = None) -> FoundHub:
    """The one healthy hub; several: `ask(healthy)` when given (a terminal), else UsageError (exit 2).

    None healthy: HubUnavailable (exit 5). Hubs that were announced but did not answer are ignored.
    """
    healthy = [h for h in hubs if h.healthy is True]
    if len(healthy) == 1:
        return healthy[0]
    if len(healthy) > 1:
        if ask is not None:
            return ask(healthy)
        raise UsageError(
            f"several hubs found on the local network: {_describe(healthy)}",
            "choose one with --hub URL",
        )
    if hubs:
        raise HubUnavailable(
            "no hub found on the local network",
            f"announced but not answering a health check: {_describe(hubs)}",
        )
    raise HubUnavailable(
        "no hub found on the local network",
        f"nothing announced {SERVICE_TYPE} or {V06_SERVICE_TYPE}; start one with `llmroom serve --mdns`"
        " or pass --hub URL",
    )


# -- announcing -------------------------------------------------------------------------------------


def local_ipv4_addresses(loopback: bool = False) -> list[str]:
    """This machine's IPv4 addresses; loopback ones only when asked."""
    import ifaddr  # a dependency of zeroconf

    found: dict[str, None] = {}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if (
                ip.is_IPv4
                and isinstance(ip.ip, str)
                and (loopback or not ipaddress.ip_address(ip.ip).is_loopback)
            ):
                found[ip.ip] = None
    return list(found)


def announced_addresses(host: str) -> tuple[list[str], list[str] | None]:
    """(the addresses to announce, the interfaces to announce on: None for all) for a hub bound to host.

    A wildcard host announces every non-loopback IPv4 address (loopback alone when there is none) on
    every interface. A loopback host is announced on loopback only: to anyone else 127.0.0.1 would name
    their own machine. Any other address is announced on its own interface.
    """
    if host.strip("[]") in _WILDCARDS:
        addresses = local_ipv4_addresses()
        return (addresses, None) if addresses else (["127.0.0.1"], ["127.0.0.1"])
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare.split("%", 1)[0])
        address = bare
    except ValueError:  # a host name: announce what it resolves to
        try:
            address = str(socket.getaddrinfo(bare, None, type=socket.SOCK_STREAM)[0][4][0])
        except (OSError, UnicodeError) as exc:
            raise UsageError(f"cannot announce host {host!r}: {exc}", "check --host") from None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return [address], (["127.0.0.1"] if ip.version == 4 else None)
    if ip.version == 6:  # zeroconf binds IPv6 interfaces by index, not address: use them all
        return [address], None
    return [address], [address]


class Announcement:
    """Announce a hub on the local network over mDNS, as the reference hub does; close() withdraws it.

    `start()` returns at once (about 10 ms: it opens the multicast sockets, and raises MulticastError
    when it cannot). The name is then probed for conflicts and announced in the background: the hub
    becomes visible about 1.2 s later (0.15-0.25 s random delay, three probes 0.5 s apart, per RFC 6762)
    and the announcements finish about 0.5 s after that; `wait()` blocks until then. Another hub with
    the same name (same port on another machine) makes ours `gambiarra-hub-<port>-2`.
    """

    def __init__(
        self, port: int, host: str = "0.0.0.0", version: str = TXT_VERSION, service_type: str = SERVICE_TYPE
    ) -> None:
        if service_type not in _PREFIXES:
            raise UsageError(f"unknown mDNS service type {service_type!r}")
        self.service_type = service_type
        self.prefix = _PREFIXES[service_type]
        self.port = port
        self.host = host
        self.version = version
        self.addresses, self._interfaces = announced_addresses(host)
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._future: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> str:
        """The instance name announced (it may gain a `-2` suffix after a conflict)."""
        if self._info is None:
            return f"{self.prefix}{self.port}"
        return instance_name(self._info.name)

    def start(self) -> Announcement:
        """Open the sockets and begin probing + announcing in the background; returns self."""
        from zeroconf import ServiceInfo

        with self._lock:
            if self._zc is not None or self._closed:
                return self
            ip_v6 = any(":" in a for a in self.addresses)
            zc = _open_zeroconf(self._interfaces, ip_v6=ip_v6)
            info = ServiceInfo(
                self.service_type,
                f"{self.prefix}{self.port}.{self.service_type}",
                port=self.port,
                properties={"version": self.version, "protocol": "http"},
                server=f"{_hostname()}.local.",
                parsed_addresses=self.addresses,
            )

            async def register() -> None:
                announcing = await zc.async_register_service(info, allow_name_change=True)
                await announcing

            assert zc.loop is not None
            self._zc, self._info = zc, info
            self._future = asyncio.run_coroutine_threadsafe(register(), zc.loop)
        return self

    def wait(self, timeout_s: float = 5.0) -> bool:
        """True once the announcement went out, False on timeout; MulticastError when it failed."""
        future = self._future
        if future is None:
            return False
        try:
            future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:
            return False
        except Exception as exc:  # zeroconf's own errors: sockets gone, name exhausted ...
            raise MulticastError(f"cannot announce the hub over mDNS: {exc}") from exc
        return True

    def close(self) -> None:
        """Withdraw the announcement (goodbye packets, about 0.4 s) and close the sockets; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            zc, info, future = self._zc, self._info, self._future
        if zc is None:
            return
        try:
            if future is not None and not future.done():
                future.cancel()  # still probing: nothing was announced, so there is nothing to withdraw
            elif info is not None and future is not None and future.exception() is None:
                zc.unregister_service(info)
        except Exception:  # withdrawing is best effort; the TTL expires the records anyway
            pass
        finally:
            zc.close()

    def __enter__(self) -> Announcement:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _hostname() -> str:
    """This machine's host name as one DNS label (no domain, only letters, digits and hyphens)."""
    label = socket.gethostname().split(".", 1)[0]
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in label).strip("-")
    return cleaned or "llmroom"
