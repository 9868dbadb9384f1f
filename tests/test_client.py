"""HubClient against httpx.MockTransport: every route, and every failure mapped to the error tree."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.errors import (
    HubProtocolError,
    HubRejected,
    HubUnavailable,
    InvalidPassword,
    ParticipantNotFound,
    RoomNotFound,
)

HUB = "http://hub.test:3000"


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> HubClient:
    return HubClient(httpx.Client(transport=httpx.MockTransport(handler), trust_env=False), HUB)


def test_create_room_sends_name_and_password_and_returns_body() -> None:
    seen: list[tuple[str, str, dict[str, object]]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.method, req.url.path, json.loads(req.content)))
        return httpx.Response(201, json={"room": {"id": "x", "code": "ABC123", "name": "n"}, "hostId": "h"})

    data = client_for(handler).create_room("Hack night", "s3cret")
    assert data["room"]["code"] == "ABC123"
    assert seen == [("POST", "/rooms", {"name": "Hack night", "password": "s3cret"})]


def test_routes_and_paths() -> None:
    calls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(f"{req.method} {req.url.raw_path.decode()}")
        path = req.url.path
        if path == "/rooms":
            return httpx.Response(200, json={"rooms": []})
        if path.endswith("/participants"):
            return httpx.Response(200, json={"participants": [{"id": "p"}]})
        if path.endswith("/join"):
            return httpx.Response(201, json={"participant": {"id": "p"}, "roomId": "r"})
        if path.endswith("/v1/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        return httpx.Response(200, json={"success": True, "status": "ok", "timestamp": 1})

    c = client_for(handler)
    assert c.list_rooms() == []
    assert c.participants("-YLUHJ") == [{"id": "p"}]
    c.join("ABC123", {"id": "p"})
    c.heartbeat("ABC123", "p")
    c.leave("ABC123", "id with/slash")
    c.models("ABC123")
    assert c.health()["status"] == "ok"
    assert calls == [
        "GET /rooms",
        "GET /rooms/-YLUHJ/participants",
        "POST /rooms/ABC123/join",
        "POST /rooms/ABC123/health",
        "DELETE /rooms/ABC123/leave/id%20with%2Fslash",
        "GET /rooms/ABC123/v1/models",
        "GET /health",
    ]


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, {"error": "Room not found"}, RoomNotFound),
        (404, {"error": "Participant not found"}, ParticipantNotFound),
        (401, {"error": "Invalid password"}, InvalidPassword),
        (400, {"error": "Missing required fields: id, nickname, model, endpoint"}, HubRejected),
        (500, {"error": "boom"}, HubUnavailable),
        (502, "<html>bad gateway</html>", HubProtocolError),
        (404, "Not Found", HubProtocolError),
    ],
)
def test_errors_map_to_the_tree(status: int, body: object, error: type[Exception]) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers={"content-type": "text/html"})
        return httpx.Response(status, json=body)

    with pytest.raises(error) as info:
        client_for(handler).heartbeat("ABC123", "p")
    assert HUB in str(info.value)


def test_exit_codes_of_the_tree() -> None:
    assert RoomNotFound("x").exit_code == 3
    assert InvalidPassword("x").exit_code == 4
    assert HubUnavailable("x").exit_code == 5
    assert HubProtocolError("x").exit_code == 5
    assert ParticipantNotFound("x", 404).exit_code == 1


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(
            200, text="<html><body>router login</body></html>", headers={"content-type": "text/html"}
        ),
        httpx.Response(200, json=[1, 2, 3]),
        httpx.Response(200, json={"rooms": "nope"}),
        httpx.Response(200, content=b"\xff\xfe"),
    ],
)
def test_something_that_is_not_a_hub(answer: httpx.Response) -> None:
    with pytest.raises(HubProtocolError):
        client_for(lambda req: answer).list_rooms()


def test_unreachable_and_timeouts_are_hub_unavailable() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=req)

    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=req)

    with pytest.raises(HubUnavailable) as info:
        client_for(refuse).list_rooms()
    assert "llmroom serve" in str(info.value)
    with pytest.raises(HubUnavailable, match="did not answer in time"):
        client_for(slow).heartbeat("ABC123", "p")


def test_events_parses_server_sent_events() -> None:
    stream = (
        b'event: connected\ndata: {"clientId": "c1"}\n\n'
        b": keepalive\n\n"
        b'event: participant:joined\ndata: {"id": "p1"}\n\n'
    )

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    events = list(client_for(handler).events("ABC123"))
    assert events == [("connected", {"clientId": "c1"}), ("participant:joined", {"id": "p1"})]
