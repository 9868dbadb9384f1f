"""`llmroom doctor`: one report of everything that decides whether the room can use this machine's model.

Each part becomes a `Check` (a table row) and a key of `Report.data` (the JSON); a part that fails
becomes a failing Check carrying the exit code of its problem (5 the hub, 6 the LLM server), never an
exception. Environment variables are reported by name only: their values may be secrets (a password,
credentials inside a proxy URL).
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmroom_cli import __version__
from llmroom_cli.errors import EndpointError, LlmroomError

if TYPE_CHECKING:
    import httpx

    from llmroom_cli.endpoints import ServerInfo
    from llmroom_cli.specs import MachineSpecs

HUB_TIMEOUT_S = 5.0
# Past this, the hub's timestamps (and anything reading them) disagree with ours visibly.
SKEW_WARN_MS = 5000
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
_ENV_RE = re.compile(r"LLMROOM_[A-Z0-9_]*", re.IGNORECASE)


@dataclass
class Check:
    """One row of the report; `exit_code` is the code of the problem when not `ok`."""

    name: str
    ok: bool
    detail: str
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "exit_code": self.exit_code}


@dataclass
class Report:
    """The checks in order (the table) and `data`, the JSON `doctor --json` prints."""

    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def exit_code(self) -> int:
        """0 when every check passed, else the exit code of the first one that failed."""
        for check in self.checks:
            if not check.ok:
                return check.exit_code or 1
        return 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _failed(name: str, exc: Exception, default_code: int) -> Check:
    """A failing Check from an exception: our errors keep their code and hint, a bug gets `default_code`."""
    if isinstance(exc, LlmroomError):
        return Check(name, False, str(exc), exc.exit_code)
    return Check(name, False, f"unexpected error: {exc!r}", default_code)


def env_names(env: Mapping[str, str]) -> list[str]:
    """The LLMROOM_* and proxy variables that are set (non-empty), by name only, sorted."""
    return sorted(
        name
        for name, value in env.items()
        if value and (_ENV_RE.fullmatch(name) or name.upper() in _PROXY_VARS)
    )


def build_report(
    http: httpx.Client,
    hub_url: str,
    endpoint: str | None,
    env: Mapping[str, str] = os.environ,
    now_ms: Callable[[], int] = _now_ms,
    *,
    api_key: str | None = None,
    credentials: Mapping[str, str] | None = None,
    advertise: str | None = None,
    candidates: Sequence[str] | None = None,
    detect_specs: Callable[[], MachineSpecs] | None = None,
    hub_api: str | None = None,
    user_config: Mapping[str, Any] | None = None,
) -> Report:
    """Everything `doctor` reports; never raises.

    `endpoint` is the LLM server to check (else the usual local addresses, or `candidates`, are
    searched and the first server found is the one published); `detect_specs` replaces specs detection
    in tests; `hub_api` forces the hub generation (else it is detected and shown); `user_config` is
    what the user's config file set (shown, never checked).
    """
    report = Report()
    checks, data = report.checks, report.data

    # Specs may wait on a slow GPU driver: read them while the network parts run.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmroom-doctor") as pool:
        specs_job = pool.submit(_specs, detect_specs)

        data["llmroom"] = __version__
        data["python"] = platform.python_version()
        checks.append(Check("llmroom", True, f"llmroom {__version__}, Python {data['python']}"))
        data["os"] = {"system": platform.system(), "release": platform.release()}
        checks.append(Check("OS", True, f"{data['os']['system']} {data['os']['release']}".strip()))

        servers, server_checks = _servers(http, endpoint, api_key, candidates, credentials)
        hub_check, data["hub"] = _hub(http, hub_url, now_ms, hub_api)
        pub_check, data["publication"] = _publication(http, servers, endpoint, hub_url, advertise)

        spec_check, data["specs"] = specs_job.result()

    checks.append(spec_check)
    data["servers"] = [s.to_json() for s in servers]
    checks.extend(server_checks)
    checks.append(hub_check)
    if pub_check is not None:
        checks.append(pub_check)
    checks.append(_config_dir(data))
    if user_config is not None:
        checks.append(_user_config(data, user_config))
    names = env_names(env)
    data["env"] = names
    checks.append(
        Check("environment", True, ", ".join(names) if names else "no LLMROOM_* or proxy variables")
    )

    data["checks"] = [c.to_json() for c in checks]
    data["exit_code"] = report.exit_code()
    return report


def _specs(detect: Callable[[], MachineSpecs] | None) -> tuple[Check, dict[str, Any]]:
    try:
        if detect is None:
            from llmroom_cli.specs import detect_specs

            detect = detect_specs
        specs = detect()
        rows = [{"what": r.what, "value": r.value, "source": r.source} for r in specs.rows]
        detail = "; ".join(f"{r['what']}: {r['value']} ({r['source']})" for r in rows) or "nothing detected"
        return Check("specs", True, detail), {"data": specs.data, "rows": rows}
    except Exception as exc:  # detect_specs never raises; a missing or broken module must not stop doctor
        return _failed("specs", exc, 1), {"data": {}, "rows": []}


def _describe_server(info: ServerInfo) -> Check:
    version = f" {info.version}" if info.version else ""
    chat = info.chat_models()
    listing = ", ".join(f"{m.id} (loaded)" if m.loaded else m.id for m in chat) or "no chat model"
    name = f"LLM server {info.url}"
    if info.status != "ready":
        return Check(name, False, f"{info.kind}{version} is still loading a model", EndpointError.exit_code)
    if not chat:
        return Check(name, False, f"{info.kind}{version}: no chat model to share", EndpointError.exit_code)
    return Check(name, True, f"{info.kind}{version}: {listing}")


def _servers(
    http: httpx.Client,
    endpoint: str | None,
    api_key: str | None,
    candidates: Sequence[str] | None,
    credentials: Mapping[str, str] | None = None,
) -> tuple[list[ServerInfo], list[Check]]:
    try:
        from llmroom_cli.endpoints import LOCAL_CANDIDATES, probe, probe_local

        if endpoint is not None:
            servers = [probe(http, endpoint, api_key, credentials=credentials)]
        else:
            where = LOCAL_CANDIDATES if candidates is None else candidates
            servers = probe_local(http, where)
            if not servers:
                searched = ", ".join(where)
                raise EndpointError(
                    f"no LLM server found at the usual local addresses ({searched})",
                    "start one, or pass --endpoint URL",
                )
    except Exception as exc:
        return [], [_failed("LLM server" if endpoint is None else f"LLM server {endpoint}", exc, 6)]
    return servers, [_describe_server(s) for s in servers]


def _hub(
    http: httpx.Client, hub_url: str, now_ms: Callable[[], int], hub_api: str | None = None
) -> tuple[Check, dict[str, Any]]:
    data: dict[str, Any] = {
        "url": hub_url,
        "reachable": False,
        "generation": None,
        "rtt_ms": None,
        "clock_skew_ms": None,
    }
    try:
        from llmroom_cli.hubapi import open_hub

        client = open_hub(http, hub_url, hub_api)
        data["generation"] = client.detected
        sent_ms, start = now_ms(), time.perf_counter()
        body = client.health(timeout_s=HUB_TIMEOUT_S)
        rtt_ms = (time.perf_counter() - start) * 1000
        received_ms = now_ms()
    except Exception as exc:
        check = _failed("hub", exc, 5)
        data["error"] = check.detail
        return check, data
    data["reachable"] = True
    data["rtt_ms"] = round(rtt_ms, 1)
    forced = " (forced by --hub-api)" if hub_api else ""
    detail = f"{hub_url} speaks {client.label}{forced}, answers in {rtt_ms:.0f} ms"
    stamp = body.get("timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        # The hub stamped its answer somewhere between sending and receiving: compare with the midpoint.
        skew = round(stamp - (sent_ms + received_ms) / 2)
        data["clock_skew_ms"] = skew
        detail += f"; its clock is {abs(skew)} ms {'ahead' if skew >= 0 else 'behind'}"
        if abs(skew) > SKEW_WARN_MS:
            detail += " (check this machine's clock)"
    else:
        detail += "; no timestamp in its health answer, clock skew unknown"
    return Check("hub", True, detail), data


def _publication(
    http: httpx.Client,
    servers: list[ServerInfo],
    endpoint: str | None,
    hub_url: str,
    advertise: str | None,
) -> tuple[Check | None, dict[str, Any]]:
    if not servers:
        # Nothing to publish: the LLM server check already says why.
        return None, {"endpoint": endpoint, "url": None, "answers": False}
    info = servers[0]
    data: dict[str, Any] = {"endpoint": info.url, "url": None, "answers": False}
    try:
        from llmroom_cli.reach import publishable_endpoint

        pub = publishable_endpoint(http, info.url, hub_url, info.kind, advertise=advertise)
    except Exception as exc:
        check = _failed("published address", exc, 6)
        data["error"] = check.detail
        return check, data
    # publishable_endpoint only returns an address that answered (probe or its own check).
    data.update(url=pub.url, rewritten=pub.rewritten, answers=True)
    how = "answers there" if not pub.rewritten else f"answers there (locally {info.url})"
    return Check("published address", True, f"the hub would reach the LLM server at {pub.url}: {how}"), data


def _config_dir(data: dict[str, Any]) -> Check:
    try:
        from llmroom_cli.identity import config_dir

        path = config_dir()
        exists = path.is_dir()
    except Exception as exc:
        data["config_dir"] = {"path": None, "exists": False}
        return _failed("config dir", exc, 1)
    data["config_dir"] = {"path": str(path), "exists": exists}
    return Check("config dir", True, f"{path}{'' if exists else ' (not created yet)'}")


def _user_config(data: dict[str, Any], config: Mapping[str, Any]) -> Check:
    from llmroom_cli.options import user_config_path

    path = user_config_path()
    data["user_config"] = {"path": str(path), "values": dict(config)}
    if not config:
        return Check("config file", True, f"{path} (none: flags, LLMROOM_* and defaults apply)")
    shown = ", ".join(f"{k}={v}" for k, v in sorted(config.items()))
    return Check("config file", True, f"{path}: {shown} (flags and LLMROOM_* take precedence)")
