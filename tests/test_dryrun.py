"""`join --dry-run`: the previewed request is byte for byte what the clients send, secrets as "***"."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llmroom_cli.client import HubClient
from llmroom_cli.dryrun import join_requests, preview, redact
from llmroom_cli.protocols.v06 import V06Client, registration_body
from llmroom_cli.session import JoinPlan

PASSWORD = "hunter2-room-secret"
KEY = "sk-local-server-key"


def plan(**kw: Any) -> JoinPlan:
    fields: dict[str, Any] = {
        "hub_url": "http://hub.example:3000",
        "code": "ABC123",
        "participant_id": "1f0e-id",
        "nickname": "ana@box",
        "model": "llama3.2:latest",
        "endpoint": "http://192.168.1.20:11434",
        "password": PASSWORD,
        "specs": {"gpu": "NVIDIA H200", "vram": 140, "llm": {"server": "ollama", "ttftMs": 81}},
        "config": {"temperature": 0.7, "max_tokens": 256, "api_key": "sk-in-config"},
    }
    fields.update(kw)
    return JoinPlan(**fields)


def sent(handler_answer: httpx.Response, call: Any) -> httpx.Request:
    """The one request a client sends for `call(http)`, answered with `handler_answer`."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler_answer

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        call(http)
    [request] = seen
    return request


def with_password_redacted(body: dict[str, Any]) -> dict[str, Any]:
    return redact(body)  # type: ignore[no-any-return]


def test_the_v01_preview_is_what_the_v01_client_sends() -> None:
    p = plan()
    answer = httpx.Response(201, json={"participant": {"id": p.participant_id}, "roomId": "r1"})
    request = sent(answer, lambda http: HubClient(http, p.hub_url).join(p.code, p.body()))
    [shown] = preview(p, "v0.1")["requests"]
    assert (shown["method"], shown["url"]) == (request.method, str(request.url))
    body = json.loads(request.content)
    assert body["password"] == PASSWORD  # the hub gets it ...
    assert shown["body"] == {**body, "password": "***", "config": {**body["config"], "api_key": "***"}}


def test_the_v06_preview_is_what_the_v06_client_sends() -> None:
    p = plan()
    caps = {"chatCompletions": "supported", "openResponses": "unknown"}
    answer = httpx.Response(
        201,
        json={"data": {"participant": {"id": p.participant_id}, "tunnel": {"token": "t", "url": "ws://x"}}},
    )
    request = sent(
        answer,
        lambda http: V06Client(http, p.hub_url).register(
            p.code, p.participant_id, registration_body(p, caps)
        ),
    )
    [shown] = preview(p, "v0.6", capabilities=caps)["requests"]
    assert (shown["method"], shown["url"]) == (request.method, str(request.url))
    body = json.loads(request.content)
    assert "id" not in body and body["capabilities"] == caps
    assert shown["body"] == with_password_redacted(body)
    assert shown["body"]["password"] == "***"


def test_without_a_known_generation_both_requests_are_shown_and_it_says_why() -> None:
    out = preview(plan())
    assert [(r["hub_api"], r["method"]) for r in out["requests"]] == [("v0.6", "PUT"), ("v0.1", "POST")]
    assert out["requests"][1]["url"] == "http://hub.example:3000/rooms/ABC123/join"
    assert out["requests"][0]["url"] == "http://hub.example:3000/v1/rooms/ABC123/participants/1f0e-id"
    assert "does not ask" in out["note"]
    assert preview(plan(), "both")["requests"] == out["requests"]
    assert "note" not in preview(plan(), "v0.1")


def test_no_secret_appears_anywhere_and_harmless_keys_are_kept() -> None:
    out = preview(plan(), credentials={"Authorization": f"Bearer {KEY}", "X-Team": "blue"})
    text = json.dumps(out)
    for secret in (PASSWORD, KEY, "sk-in-config", "blue"):
        assert secret not in text
    assert out["local_server_headers"] == {"Authorization": "***", "X-Team": "***"}
    body = out["requests"][1]["body"]
    assert body["config"]["max_tokens"] == 256 and body["specs"]["llm"]["ttftMs"] == 81
    assert body["nickname"] == "ana@box" and body["endpoint"] == "http://192.168.1.20:11434"


def test_an_open_room_sends_no_password_field_at_all() -> None:
    out = preview(plan(password=None, config=None, specs=None))
    for request in out["requests"]:
        assert set(request["body"]) <= {"id", "nickname", "model", "endpoint"}


def test_odd_ids_are_path_encoded_as_the_client_does() -> None:
    p = plan(participant_id="a b/c", code="AB-C_1")
    [v06, v01] = join_requests(p)
    assert v06["url"].endswith("/v1/rooms/AB-C_1/participants/a%20b%2Fc")
    assert v01["body"]["id"] == "a b/c"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("Password", True),
        ("pwd", True),
        ("client_secret", True),
        ("access_token", True),
        ("token", True),
        ("api_key", True),
        ("apiKey", True),
        ("Authorization", True),
        ("max_tokens", False),
        ("bypass", False),
        ("temperature", False),
    ],
)
def test_redact_knows_secret_names(key: str, secret: bool) -> None:
    assert redact({"x": [{key: "v"}]}) == {"x": [{key: "***" if secret else "v"}]}
