"""`doctor`'s report against a real hub and fake LLM servers: checks, exit codes, and no secrets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmroom_cli import __version__
from llmroom_cli.doctor import Check, Report, build_report, env_names
from llmroom_cli.hub import RunningHub, start_hub
from llmroom_cli.specs import MachineSpecs, SpecRow
from tests.fake_llm_servers import FakeLLMServer


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


@pytest.fixture
def ollama() -> Iterator[FakeLLMServer]:
    with FakeLLMServer("ollama") as server:
        yield server


def fake_specs() -> MachineSpecs:
    return MachineSpecs(
        {"cpu": "Test CPU", "ram_gb": 64},
        [SpecRow("CPU", "Test CPU", "/proc/cpuinfo model name"), SpecRow("RAM", "64 GB", "/proc/meminfo")],
    )


def report(http: httpx.Client, hub_url: str, endpoint: str | None, **kwargs: Any) -> Report:
    kwargs.setdefault("env", {})
    kwargs.setdefault("detect_specs", fake_specs)
    return build_report(http, hub_url, endpoint, **kwargs)


def failing(rep: Report) -> list[Check]:
    return [c for c in rep.checks if not c.ok]


def test_all_well_exits_0_with_round_trip_and_clock_skew(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer
) -> None:
    rep = build_report(http, hub.url, ollama.url, env={})  # real specs detection
    assert rep.exit_code() == 0, failing(rep)
    data = rep.data
    assert data["llmroom"] == __version__ and data["python"]
    assert data["os"]["system"] and "release" in data["os"]
    assert data["specs"]["rows"] and all(r["source"] for r in data["specs"]["rows"])
    assert data["hub"]["reachable"] is True
    assert 0 <= data["hub"]["rtt_ms"] < 5000
    # Same clock on both ends: the skew is within the round trip (plus the hub's millisecond rounding).
    assert abs(data["hub"]["clock_skew_ms"]) <= data["hub"]["rtt_ms"] + 2
    assert [s["kind"] for s in data["servers"]] == ["ollama"]
    assert data["servers"][0]["models"]
    # The hub is on this machine: loopback is kept.
    assert data["publication"] == {
        "endpoint": ollama.url,
        "url": ollama.url,
        "rewritten": False,
        "answers": True,
    }
    assert data["config_dir"]["path"].endswith("llmroom")
    assert data["exit_code"] == 0
    assert [c["name"] for c in data["checks"]] == [c.name for c in rep.checks]
    assert [c.name for c in rep.checks] == [
        "llmroom",
        "OS",
        "specs",
        f"LLM server {ollama.url}",
        "hub",
        "published address",
        "config dir",
        "environment",
    ]
    json.dumps(data)  # all of it is JSON


def test_the_skew_is_the_hubs_timestamp_against_the_midpoint_of_the_request(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer
) -> None:
    def slow_clock() -> int:
        return time.time_ns() // 1_000_000 - 60_000

    rep = report(http, hub.url, ollama.url, now_ms=slow_clock)
    skew = rep.data["hub"]["clock_skew_ms"]
    assert 59_000 < skew < 61_000
    hub_check = next(c for c in rep.checks if c.name == "hub")
    assert hub_check.ok and "ahead" in hub_check.detail and "check this machine's clock" in hub_check.detail


def test_the_specs_rows_say_where_each_value_came_from(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer
) -> None:
    rep = report(http, hub.url, ollama.url)
    assert rep.data["specs"] == {
        "data": {"cpu": "Test CPU", "ram_gb": 64},
        "rows": [
            {"what": "CPU", "value": "Test CPU", "source": "/proc/cpuinfo model name"},
            {"what": "RAM", "value": "64 GB", "source": "/proc/meminfo"},
        ],
    }
    specs = next(c for c in rep.checks if c.name == "specs")
    assert "CPU: Test CPU (/proc/cpuinfo model name)" in specs.detail


def test_hub_down_exits_5(http: httpx.Client, ollama: FakeLLMServer) -> None:
    gone = start_hub()
    gone.stop()
    rep = report(http, gone.url, ollama.url)
    assert rep.exit_code() == 5
    assert [c.name for c in failing(rep)] == ["hub"]
    assert "cannot reach the hub" in failing(rep)[0].detail
    assert rep.data["hub"]["reachable"] is False and rep.data["hub"]["rtt_ms"] is None
    assert rep.data["exit_code"] == 5
    # The rest is still reported.
    assert rep.data["servers"] and rep.data["publication"]["answers"] is True


def test_a_hub_that_is_not_a_hub_exits_5(http: httpx.Client, ollama: FakeLLMServer) -> None:
    with FakeLLMServer("openai") as stranger:
        rep = report(http, stranger.url, ollama.url)
    assert rep.exit_code() == 5


def test_endpoint_down_exits_6(http: httpx.Client, hub: RunningHub) -> None:
    with FakeLLMServer("ollama") as server:
        url = server.url
    rep = report(http, hub.url, url)
    assert rep.exit_code() == 6
    assert [c.name for c in failing(rep)] == [f"LLM server {url}"]
    assert "no LLM server answers" in failing(rep)[0].detail
    assert rep.data["servers"] == [] and rep.data["hub"]["reachable"] is True


def test_the_first_problem_decides_the_exit_code(http: httpx.Client) -> None:
    gone = start_hub()
    gone.stop()
    with FakeLLMServer("ollama") as server:
        url = server.url
    rep = report(http, gone.url, url)
    assert [c.exit_code for c in failing(rep)] == [6, 5]
    assert rep.exit_code() == 6


@pytest.mark.parametrize(
    ("kind", "variant", "why"),
    [("llamacpp", "loading", "still loading"), ("ollama", "empty", "no chat model")],
)
def test_a_server_that_cannot_serve_yet_exits_6(
    http: httpx.Client, hub: RunningHub, kind: str, variant: str, why: str
) -> None:
    with FakeLLMServer(kind, variant) as server:
        rep = report(http, hub.url, server.url)
    assert rep.exit_code() == 6
    assert why in failing(rep)[0].detail


def test_without_an_endpoint_the_local_servers_are_searched(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer
) -> None:
    with FakeLLMServer("vllm") as vllm:
        rep = report(http, hub.url, None, candidates=[ollama.url, vllm.url])
    assert rep.exit_code() == 0, failing(rep)
    assert [s["kind"] for s in rep.data["servers"]] == ["ollama", "vllm"]
    assert rep.data["publication"]["endpoint"] == ollama.url


def test_no_local_server_found_exits_6(http: httpx.Client, hub: RunningHub) -> None:
    with FakeLLMServer("ollama") as server:
        url = server.url
    rep = report(http, hub.url, None, candidates=[url])
    assert rep.exit_code() == 6
    assert "no LLM server found" in failing(rep)[0].detail
    assert "published address" not in [c.name for c in rep.checks]


def test_a_failure_inside_a_part_is_a_failing_check_not_an_exception(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer
) -> None:
    def broken() -> MachineSpecs:
        raise RuntimeError("boom")

    rep = report(http, hub.url, ollama.url, detect_specs=broken)
    assert [c.name for c in failing(rep)] == ["specs"]
    assert rep.exit_code() == 1


def test_env_var_names_are_listed_but_never_their_values(
    http: httpx.Client, hub: RunningHub, ollama: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMROOM_PASSWORD", "supersecret")
    monkeypatch.setenv("LLMROOM_NICKNAME", "alice")
    monkeypatch.setenv("https_proxy", "http://user:proxypass@127.0.0.9:3128")
    monkeypatch.setenv("UNRELATED_TOKEN", "othersecret")
    rep = build_report(http, hub.url, ollama.url, detect_specs=fake_specs)  # env: os.environ
    # conftest sets NO_PROXY=* for every test.
    assert rep.data["env"] == ["LLMROOM_NICKNAME", "LLMROOM_PASSWORD", "NO_PROXY", "https_proxy"]
    text = json.dumps(rep.data) + "\n".join(c.detail for c in rep.checks)
    for secret in ("supersecret", "alice", "proxypass", "othersecret", "UNRELATED_TOKEN"):
        assert secret not in text
    env_check = next(c for c in rep.checks if c.name == "environment")
    assert env_check.detail == "LLMROOM_NICKNAME, LLMROOM_PASSWORD, NO_PROXY, https_proxy"


def test_env_names_skips_empty_and_unrelated_variables() -> None:
    env = {"LLMROOM_HUB": "", "LLMROOM_ENDPOINT": "x", "HTTP_PROXY": "p", "all_proxy": "q", "HOME": "/h"}
    assert env_names(env) == ["HTTP_PROXY", "LLMROOM_ENDPOINT", "all_proxy"]


def test_report_exit_code_is_never_0_for_a_failure() -> None:
    assert Report([Check("a", True, ""), Check("b", False, "", 0), Check("c", False, "", 5)]).exit_code() == 1
    assert Report([Check("a", True, "")]).exit_code() == 0
