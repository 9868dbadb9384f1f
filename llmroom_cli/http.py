"""Builds the one httpx.Client a process uses, cheaply: no certifi SSL context for http:// URLs."""

from __future__ import annotations

import ssl

import httpx


def make_http(*urls: str, connect_s: float = 2.0, read_s: float = 5.0) -> httpx.Client:
    """One pooled client with short timeouts; trust_env stays on so proxies set by the user apply.

    Building httpx's default SSL context loads certifi's bundle (about 30 ms in a fresh process). When
    every URL we will talk to is plain http://, a bare client-side context is passed instead: it costs
    nothing and, holding no CA certificates, fails closed if an https:// URL ever reaches it.
    """
    verify: ssl.SSLContext | bool = True
    if urls and all(u.startswith("http://") for u in urls):
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    timeout = httpx.Timeout(connect=connect_s, read=read_s, write=read_s, pool=connect_s)
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=60.0)
    return httpx.Client(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)
