"""`llmroom join` on v0.6 hubs, as real processes with real signals: our embedded hub (it speaks both
generations: the agent takes the tunnel) and the fake of the reference Gambi v0.6 hub (v0.6 only). A
chat through `/rooms/CODE/v1/chat/completions` is answered through the tunnel by the relay core (the
API key added there), shows as a `request` event, drains on Ctrl-C, and Ctrl-C leaves."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from llmroom_cli.hub import RunningHub
from tests.fake_gambi_v06 import FakeGambiV06, running_fake
from tests.helpers import WAIT_S, Agent, cli, wait_for
from tests.test_join_relay import KEY, GatedLLM, hub_chat


@pytest.fixture
def gated() -> Iterator[GatedLLM]:
    server = GatedLLM(api_key=KEY)
    yield server
    server.stop()


@pytest.fixture
def fake() -> Iterator[FakeGambiV06]:
    yield from running_fake()


def v1_participants(hub_url: str, room: str) -> list[dict[str, object]]:
    with httpx.Client(trust_env=False, timeout=5) as http:
        data = http.get(f"{hub_url}/v1/rooms/{room}/participants").json()["data"]
    found: list[dict[str, object]] = data if isinstance(data, list) else data["participants"]
    return found


def test_our_hub_is_joined_through_the_tunnel_and_serves_chats(
    hub: RunningHub, gated: GatedLLM, clean_env: dict[str, str]
) -> None:
    room = hub.state.create_room("r")["code"]
    env = {**clean_env, "LLMROOM_API_KEY": KEY}
    a = Agent(room, "--hub", hub.url, "-e", gated.url, "--json", "--interval", "0.2", "--debug", env=env)
    joined = a.wait_event("joined")
    assert joined["protocol"] == "v0.6" and joined["endpoint"] == gated.url
    (p,) = v1_participants(hub.url, room)
    assert p["capabilities"] == {"chatCompletions": "supported", "openResponses": "unsupported"}
    plain = hub_chat(hub.url, room)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "Hello there"
    streamed = hub_chat(hub.url, room, stream=True)
    assert streamed.status_code == 200 and '"lo"' in streamed.text and "[DONE]" in streamed.text
    assert a.wait_event("request")["status"] == 200
    assert a.wait_event("request", count=2)["stream"] is True
    assert gated.auth_seen and all(seen == f"Bearer {KEY}" for seen in gated.auth_seen)
    a.signal(signal.SIGINT)
    assert a.finish() == 0, a.stderr
    assert a.events[-1]["event"] == "left" and a.events[-1]["confirmed"] is True
    assert "API both (detected); sharing tunnel" in a.stderr
    assert KEY not in a.stderr and KEY not in "\n".join(a.raw)
    assert v1_participants(hub.url, room) == []


def test_the_reference_v06_hub_is_joined_through_the_tunnel(fake: FakeGambiV06, gated: GatedLLM) -> None:
    room = fake.create_room("Open Room")
    a = Agent(room, "--hub", fake.url, "-e", gated.url, "--api-key", KEY, "--json", "--interval", "0.2")
    assert a.wait_event("joined")["protocol"] == "v0.6"

    def answered() -> httpx.Response | None:
        # The reference marks a participant offline at every PUT until its heartbeat says online: on
        # a loaded machine the first chat can land in that gap (404), so the room is asked again.
        r = hub_chat(fake.url, room)
        return r if r.status_code == 200 else None

    answer = wait_for(answered, "the room to answer through the tunnel")
    assert answer.json()["choices"][0]["message"]["content"] == "Hello there"
    assert a.wait_event("request")["route"] == "/v1/chat/completions"
    a.signal(signal.SIGTERM)
    assert a.finish() == 0, a.stderr
    wait_for(lambda: v1_participants(fake.url, room) == [], "the participant gone")


def test_ctrl_c_lets_a_stream_in_the_tunnel_finish_then_leaves(hub: RunningHub, gated: GatedLLM) -> None:
    room = hub.state.create_room("r")["code"]
    a = Agent(room, "--hub", hub.url, "-e", gated.url, "--api-key", KEY, "--json", "--interval", "0.2")
    a.wait_event("joined")
    gated.hold = True
    results: list[httpx.Response] = []
    inflight = threading.Thread(target=lambda: results.append(hub_chat(hub.url, room, stream=True)))
    inflight.start()
    assert gated.arrived.acquire(timeout=WAIT_S)
    a.signal()
    assert a.wait_event("draining")["in_flight"] == 1
    gated.release.set()
    inflight.join(WAIT_S)
    assert results and results[0].status_code == 200 and "[DONE]" in results[0].text
    assert a.finish() == 0, a.stderr
    assert [e for e in a.events if e["event"] == "left"][0]["confirmed"] is True
    assert v1_participants(hub.url, room) == []


def test_forcing_v06_and_direct_on_a_v06_only_hub(fake: FakeGambiV06, gated: GatedLLM) -> None:
    room = fake.create_room("Open Room")
    r = cli("join", room, "--hub", fake.url, "-e", gated.url, "--api-key", KEY, "--direct")
    assert r.returncode == 2 and "speaks only v0.6" in r.stderr, r.stderr
    a = Agent(room, "--hub", fake.url, "-e", gated.url, "--api-key", KEY, "--hub-api", "v0.6", "--json")
    assert a.wait_event("joined")["protocol"] == "v0.6"
    a.signal()
    assert a.finish() == 0, a.stderr


def test_a_frozen_hub_still_lets_the_agent_leave_with_nothing_in_flight(
    hub: RunningHub, gated: GatedLLM
) -> None:
    room = hub.state.create_room("r")["code"]
    a = Agent(room, "--hub", hub.url, "-e", gated.url, "--api-key", KEY, "--json", "--interval", "0.2")
    a.wait_event("heartbeat")
    hub.fault = "freeze"
    wait_for(lambda: hub.frozen_requests() > 0, "a heartbeat held by the frozen hub")
    a.signal(signal.SIGTERM)
    assert a.finish() == 0, a.stderr
    assert a.events[-1]["event"] == "left" and a.events[-1]["confirmed"] is False
    assert "draining" not in a.names()
    assert "did not confirm the leave" in a.stderr
    hub.fault = None


def test_a_hub_restart_that_kept_the_room_is_ridden_out_and_one_that_lost_it_is_exit_3() -> None:
    """Better than the reference participant (which exits on any tunnel close): after the hub's 1001
    the agent registers again with the same id and opens a new tunnel; a hub back without the room is
    exit 3 saying the room is gone."""
    from llmroom_cli.hub import start_hub
    from llmroom_cli.standin import StandIn

    with StandIn() as llm:
        first = start_hub(port=0)
        port, state = first.port, first.state
        room = state.create_room("r")["code"]
        a = Agent(room, "--hub", first.url, "-e", llm.url, "--json", "--interval", "0.3")
        pid = a.wait_event("joined")["id"]
        first.stop()
        a.wait_event("reconnecting")
        second = start_hub(port=port, state=state)  # the same rooms: a restart that kept them
        try:
            a.wait_event("online")
            wait_for(
                lambda: any(p["id"] == pid and p.get("status") == "online" for p in state.participants(room)),
                "the participant back with the same id",
            )
        finally:
            second.stop()
        third = start_hub(port=port)  # a restart that lost every room
        try:
            code = a.finish(timeout=WAIT_S)
        finally:
            third.stop()
        assert code == 3, a.stderr
        assert f"room {room} is gone" in a.stderr and "Traceback" not in a.stderr
