"""share.py's parts with fakes injected: the plan's checks, the capability probe, where the relay
listens, the leave-then-drain order, the traffic source, and `status` counting served requests."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from llmroom_cli import share
from llmroom_cli.errors import UsageError
from llmroom_cli.relay import RelayCore
from tests.helpers import cli, wait_for


def plan(**kw: Any) -> share.SharePlan:
    return share.SharePlan("ABC123", "http://127.0.0.1:3000", "http://127.0.0.1:11434", "nick", **kw)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"hub_api": "v2"}, "expected v0.1 or v0.6"),
        ({"hub_api": "v0.6", "direct": True}, "--direct"),
        ({"hub_api": "v0.6", "advertise": "http://10.0.0.1:1"}, "--advertise"),
        ({"max_concurrent": 0}, "--max-concurrent"),
        ({"drain_s": float("nan")}, "--drain"),
    ],
)
def test_plan_check_refuses_what_cannot_work(kw: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError, match=words):
        plan(**kw).check()


def test_plan_check_accepts_the_defaults_and_never_shows_credentials() -> None:
    p = plan(credentials={"Authorization": "Bearer sk-zzz"}, password="pw-zzz")
    p.check()
    assert "sk-zzz" not in repr(p) and "pw-zzz" not in repr(p)


def test_capabilities_come_from_one_post_per_route() -> None:
    seen: list[tuple[str, str, bytes, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content, request.headers.get("authorization")))
        if request.url.path == "/v1/responses":
            return httpx.Response(404, json={"error": "no"})
        return httpx.Response(400, json={"error": "messages required"})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    found = share.probe_capabilities(http, "http://llm", {"Authorization": "Bearer k"})
    assert found == {"chatCompletions": "supported", "openResponses": "unsupported"}
    assert [(m, p, json.loads(b), a) for m, p, b, a in seen] == [
        ("POST", "/v1/chat/completions", {}, "Bearer k"),
        ("POST", "/v1/responses", {}, "Bearer k"),
    ]


@pytest.mark.parametrize("status", [401, 403, 405, 501])
def test_capability_statuses_that_mean_unsupported(status: int) -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(status)))
    assert set(share.probe_capabilities(http, "http://llm", {}).values()) == {"unsupported"}


def test_a_server_that_does_not_answer_has_unknown_capabilities() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http = httpx.Client(transport=httpx.MockTransport(refuse))
    assert share.probe_capabilities(http, "http://llm", {}) == {
        "chatCompletions": "unknown",
        "openResponses": "unknown",
    }


def test_the_relay_listens_on_loopback_for_a_hub_on_this_machine() -> None:
    assert share.relay_binding("http://localhost:3000") == ("127.0.0.1", {"127.0.0.1", "::1"})
    assert share.relay_binding("http://127.0.0.1:3000")[0] == "127.0.0.1"


class FakeSession:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.stop = threading.Event()
        self.joined = True
        self.join_maybe_sent = True
        self.plan = "the plan"

    def leave(self) -> bool:
        self.log.append("leave")
        return True

    def emit(self, event: str, **data: Any) -> None:
        self.log.append(event)


class FakeCore:
    def __init__(self, log: list[str], in_flight: int) -> None:
        self.log = log
        self.in_flight = in_flight

    @property
    def traffic(self) -> Any:
        return type("T", (), {"in_flight": self.in_flight})()

    def stop_accepting(self) -> None:
        self.log.append("stop_accepting")

    def drain(self, timeout_s: float) -> bool:
        self.log.append(f"drain {timeout_s:g}")
        return True


@pytest.mark.parametrize(
    ("drain_first", "order"),
    [
        (False, ["stop_accepting", "leave", "draining", "drain 7"]),  # v0.1: the hub stops routing first
        (True, ["stop_accepting", "draining", "drain 7", "leave"]),  # tunnel: answers go through it
    ],
)
def test_leave_stops_accepting_first_and_drains(drain_first: bool, order: list[str]) -> None:
    log: list[str] = []
    wrapped = share._Draining(FakeSession(log), FakeCore(log, 1), 7.0, drain_first)  # type: ignore[arg-type]
    assert wrapped.leave() is True
    assert log == order
    assert wrapped.plan == "the plan" and wrapped.joined and wrapped.join_maybe_sent


def test_nothing_in_flight_means_no_draining_event() -> None:
    log: list[str] = []
    wrapped = share._Draining(FakeSession(log), FakeCore(log, 0), 7.0, False)  # type: ignore[arg-type]
    wrapped.leave()
    assert "draining" not in log


def test_traffic_source_reads_fresh_counters() -> None:
    core = RelayCore(
        "http://127.0.0.1:9", httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    )
    source = share.traffic_source(core)
    before = source()
    with core.open("POST", "/nope", {}, b"{}") as up:
        list(up)
    assert before.rejected == 0 and source().rejected == 1


def test_status_counts_the_requests_served(hub: Any) -> None:
    from llmroom_cli.standin import MODEL, StandIn
    from tests.helpers import Agent

    room = hub.state.create_room("r")["code"]
    with StandIn() as llm:
        a = Agent(room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", "0.2")
        a.wait_event("joined")
        with httpx.Client(trust_env=False, timeout=30) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            assert http.post(f"{hub.url}/rooms/{room}/v1/chat/completions", json=body).status_code == 200
        a.wait_event("request")

        def served() -> bool:
            agents = json.loads(cli("status", "--json").stdout)
            return any(x["room"] == room and x["requests_served"] == 1 for x in agents)

        wait_for(served, "status to count the request", poll=0.2)
        a.signal()
        assert a.finish() == 0, a.stderr
