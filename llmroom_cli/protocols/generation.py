"""Which hub generation answers at a URL: "v0.1", "v0.6" or "both", from one cheap probe, cached per run.

A v0.6 hub answers `GET /v1/health` with `{"data": {"status": "ok"}}` and 404s `GET /health`; a v0.1 hub
answers `GET /health` with `{"status": "ok"}` and knows no `/v1/health`; llmroom's embedded hub answers
both. The probe asks `/v1/health` first (the current generation) and then `/health`, each with a short
whole-exchange deadline and a small read bound, and remembers the answer for the rest of the process.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Literal

import httpx

from llmroom_cli.errors import HubProtocolError, HubUnavailable, UsageError

Generation = Literal["v0.1", "v0.6", "both"]
GENERATIONS: tuple[str, ...] = ("v0.1", "v0.6", "both")

# A health answer is a few dozen bytes; anything past this is not a hub.
PROBE_MAX_BYTES = 16 * 1024
PROBE_TIMEOUT_S = 3.0

_cache: dict[str, Generation] = {}
_cache_lock = threading.Lock()


def detect_generation(
    http: httpx.Client,
    hub_url: str,
    forced: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    use_cache: bool = True,
) -> Generation:
    """The generation of the hub at `hub_url`. `forced` ("v0.1"/"v0.6", from `--hub-api`) skips the
    probe. Raises HubUnavailable when nothing answers, HubProtocolError when what answers is no hub."""
    if forced is not None:
        if forced not in ("v0.1", "v0.6"):
            raise UsageError(f"unknown hub API {forced!r}", "use --hub-api v0.1 or --hub-api v0.6")
        return "v0.1" if forced == "v0.1" else "v0.6"
    key = hub_url.rstrip("/")
    if use_cache:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
    v06 = _probe(http, key, "/v1/health", timeout_s, enveloped=True)
    v01 = _probe(http, key, "/health", timeout_s, enveloped=False)
    if v06 and v01:
        found: Generation = "both"
    elif v06:
        found = "v0.6"
    elif v01:
        found = "v0.1"
    else:
        raise HubProtocolError(
            f"{key} answers neither GET /v1/health (v0.6) nor GET /health (v0.1): it is not a hub",
            "check the --hub URL",
        )
    with _cache_lock:
        _cache[key] = found
    return found


def clear_cache() -> None:
    """Forget every detected generation (tests; a long-lived process that wants a fresh probe)."""
    with _cache_lock:
        _cache.clear()


def _probe(http: httpx.Client, base: str, path: str, timeout_s: float, enveloped: bool) -> bool:
    """True when `base + path` answers 200 with the health body of that generation."""
    deadline = time.monotonic() + timeout_s
    try:
        with http.stream("GET", base + path, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return False
            buf = bytearray()
            for piece in resp.iter_bytes():
                buf += piece
                if len(buf) > PROBE_MAX_BYTES:
                    return False
                if time.monotonic() > deadline:
                    raise HubUnavailable(f"the hub at {base} did not answer in time")
    except httpx.TimeoutException as exc:
        raise HubUnavailable(f"the hub at {base} did not answer in time") from exc
    except httpx.TransportError as exc:
        from llmroom_cli.http import in_words

        reason = str(in_words(exc)) or type(exc).__name__
        raise HubUnavailable(f"cannot reach the hub at {base}: {reason}") from exc
    try:
        data = json.loads(bytes(buf))
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    if enveloped:
        data = data.get("data")
        if not isinstance(data, dict):
            return False
    return data.get("status") == "ok"
