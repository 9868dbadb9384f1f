"""The endpoint URL the hub is given: an address the hub can reach, checked to answer there.

    loopback or 0.0.0.0, hub on this machine    kept (0.0.0.0 becomes 127.0.0.1: a bind address is
                                                never published)
    loopback or 0.0.0.0, hub elsewhere          this machine's address on the interface that routes to
                                                the hub, if the server answers there; else EndpointError
                                                with the fix for that server (`force` publishes anyway)
    any other host (a LAN address, a name)      published as is (`probe` already reached it)
    `advertise`                                 published instead, checked the same way

Everything network-dependent is injectable (`route`, `is_local`, `check`) so the rules are tested
without a second machine; the defaults ask the kernel, never the network (a UDP `connect` picks the
source address without sending a packet).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from llmroom_cli.errors import EndpointError

if TYPE_CHECKING:
    import httpx

# Checking that the server answers on the routed address is a local connection: it is refused at once
# or answered at once. The read budget covers a server busy with a generation.
CHECK_CONNECT_S = 0.5
CHECK_READ_S = 2.0

_FIX = {
    "ollama": "set OLLAMA_HOST=0.0.0.0 in Ollama's environment and restart Ollama",
    "lmstudio": 'turn on "Serve on Local Network" in LM Studio, or run: lms server start --bind 0.0.0.0',
    "llamacpp": "start it with: llama-server --host 0.0.0.0 ...",
    "vllm": "start it with: vllm serve MODEL --host 0.0.0.0",
    "localai": "start LocalAI with --address 0.0.0.0:PORT (or LOCALAI_ADDRESS=0.0.0.0:PORT)",
}
_FIX_ANY = "make the server listen on all addresses (0.0.0.0) instead of 127.0.0.1"


@dataclass
class Publication:
    """The URL given to the hub; `rewritten` when it differs from the local one; `warning` from --force."""

    url: str
    rewritten: bool
    warning: str | None = None


def fix_hint(kind: str | None) -> str:
    """How to make a server of this kind listen beyond loopback, plus the ways around it."""
    fix = _FIX.get(kind or "", _FIX_ANY)
    return f"{fix}; or pass --advertise URL (a proxy or tunnel the hub can reach), or --force"


# -- addresses ------------------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `text` (IPv6 scope ids such as %eth0 dropped), or None for a name."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _is_loopback_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def _host_port(url: str) -> tuple[str, int]:
    """Host (without brackets) and port (the scheme's default when absent) of a URL."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return (parts.hostname or "").lower(), port


def _with_host(url: str, host: str) -> str:
    """`url` with its host replaced, scheme, port and path kept."""
    from llmroom_cli.options import build_url

    parts = urlsplit(url)
    return build_url(parts.scheme, host, parts.port, parts.path)


def route_address(hub_host: str, port: int) -> str | None:
    """This machine's address on the interface that routes to `hub_host`, or None when there is none.

    A UDP socket's `connect` only asks the kernel for a route and a source address: no packet is sent.
    """
    try:
        infos = socket.getaddrinfo(hub_host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(sockaddr)
                addr = str(sock.getsockname()[0])
        except OSError:
            continue
        ip = _ip(addr)
        if ip is not None and not ip.is_unspecified:
            return str(ip)
    return None


def resolve_host(host: str) -> list[str]:
    """Every address `host` resolves to (an address resolves to itself); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def local_addresses() -> set[str]:
    """This machine's interface addresses: psutil's list, plus what this host's name resolves to."""
    found: set[str] = set()
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]

        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(addr.address)
    except Exception:  # psutil is a soft helper here: a failure only narrows the list
        pass
    found.update(resolve_host(socket.gethostname()))
    return {str(ip) for ip in map(_ip, found) if ip is not None}


def hub_is_local(
    hub_url: str,
    resolve: Callable[[str], list[str]] = resolve_host,
    local_addrs: Callable[[], Collection[str]] = local_addresses,
) -> bool:
    """Whether the hub runs on this machine: its host is loopback or one of this machine's addresses.

    A name that does not resolve counts as remote (the stricter rule: the endpoint gets checked).
    """
    host, port = _host_port(hub_url)
    if _is_loopback_name(host):
        return True
    addrs = [ip for ip in map(_ip, resolve(host)) if ip is not None]
    if any(ip.is_loopback or ip.is_unspecified for ip in addrs):
        return True
    if not addrs:
        return False
    mine = {str(ip) for ip in map(_ip, local_addrs()) if ip is not None}
    return any(str(ip) in mine for ip in addrs)


# -- the published URL ----------------------------------------------------------------------------


def answers(http: httpx.Client, url: str) -> bool:
    """Whether an HTTP server answers GET `url`/v1/models (any status: it listens there)."""
    import httpx

    timeout = httpx.Timeout(connect=CHECK_CONNECT_S, read=CHECK_READ_S, write=CHECK_READ_S, pool=5.0)
    try:
        with http.stream("GET", url + "/v1/models", timeout=timeout) as response:
            # 502 and 504 are what a proxy says when it cannot reach the address itself.
            return response.status_code not in (502, 504)
    except httpx.HTTPError:
        return False


def publishable_endpoint(
    http: httpx.Client,
    endpoint: str,
    hub_url: str,
    kind: str | None,
    *,
    advertise: str | None = None,
    force: bool = False,
    route: Callable[[str, int], str | None] = route_address,
    is_local: Callable[[str], bool] = hub_is_local,
    check: Callable[[httpx.Client, str], bool] | None = None,
) -> Publication:
    """The endpoint URL to give the hub at `hub_url`, or EndpointError (exit 6) when it cannot reach it.

    `endpoint` is the normalised local URL (it may be 0.0.0.0, localhost, 127.x or [::1]); `kind` the
    server kind `probe` found (for the fix in the hint). See the module docstring for the rules.
    """
    from llmroom_cli.endpoints import normalize_endpoint

    check = check or answers
    hub = hub_url.rstrip("/")
    if advertise is not None:
        url = normalize_endpoint(advertise)
        if check(http, url):
            return Publication(url, url != endpoint)
        if force:
            return Publication(url, url != endpoint, f"publishing {url} although nothing answers there")
        raise EndpointError(
            f"nothing answers at {url} (given with --advertise)",
            "check the URL, or pass --force to publish it anyway",
        )

    host = (urlsplit(endpoint).hostname or "").lower()
    ip = _ip(host)
    bind_any = ip is not None and ip.is_unspecified
    loopback = _is_loopback_name(host) or (ip is not None and ip.is_loopback)
    if not (bind_any or loopback):
        return Publication(endpoint, False)

    # What loopback publishes: the endpoint itself, or 127.0.0.1 / [::1] for a bind address.
    kept = endpoint
    if bind_any:
        assert ip is not None
        kept = _with_host(endpoint, "127.0.0.1" if ip.version == 4 else "::1")
    if is_local(hub_url):
        return Publication(kept, kept != endpoint)

    hub_host, hub_port = _host_port(hub_url)
    addr = route(hub_host, hub_port)
    routed = _ip(addr) if addr is not None else None
    if routed is not None and routed.is_loopback:
        # The kernel routes to the hub over loopback: it is on this machine after all.
        return Publication(kept, kept != endpoint)
    if addr is None:
        message = f"this machine has no route to the hub at {hub}, so {endpoint} cannot be published"
        if force:
            return Publication(kept, kept != endpoint, f"{message}; publishing {kept} anyway (--force)")
        raise EndpointError(message, "check the --hub URL, or pass --advertise URL")
    url = _with_host(endpoint, addr)
    if check(http, url):
        return Publication(url, True)
    message = f"the LLM server at {endpoint} only listens on this machine; the hub at {hub} cannot reach it"
    message += f" at {url}"
    if force:
        return Publication(url, True, f"{message}; publishing it anyway (--force)")
    raise EndpointError(message, fix_hint(kind))
