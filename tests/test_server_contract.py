"""The embedded hub against hub-api.md, over real HTTP on an ephemeral port.

The client here is `http.client` or a raw socket, never llmroom's HubClient: the two sides of the wire
format are checked independently. Timing is never asserted; conditions are awaited with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from llmroom_cli.errors import LlmroomError
from llmroom_cli.hub import (
    MISSING_JOIN_FIELDS,
    HubState,
    ListenError,
    PortInUse,
    RunningHub,
    serve,
    start_hub,
)
from tests.helpers import WAIT_S, wait_for

JSON_TYPE = "application/json;charset=utf-8"
PARTICIPANT_KEYS = [
    "id",
    "nickname",
    "model",
    "endpoint",
    "specs",
    "config",
    "status",
    "joinedAt",
    "lastSeen",
]
ROOM_KEYS = ["id", "code", "name", "hostId", "createdAt"]
_UNSET: Any = object()


# -- a client that knows nothing of llmroom ------------------------------------------------------------


class Resp:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> Any:
        return self.json().get("error")

    def __repr__(self) -> str:
        return f"Resp({self.status}, {self.body[:300]!r})"


class Http:
    """One keep-alive connection to a hub (reopened by http.client after a `Connection: close`)."""

    def __init__(self, hub: RunningHub) -> None:
        self.conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = _UNSET,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Resp:
        data = raw if raw is not None else (None if body is _UNSET else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=data, headers=hdrs)
        r = self.conn.getresponse()
        payload = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)

    def close(self) -> None:
        self.conn.close()


def read_response(sock: socket.socket, buf: bytearray) -> Resp:
    """Read one HTTP response with a Content-Length (or none, for 204) from a raw socket."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before a full response: {bytes(buf)!r}"
        buf += data
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        data = sock.recv(65536)
        assert data, "connection closed inside a body"
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return Resp(status, headers, body)


def raw_socket(hub: RunningHub) -> socket.socket:
    sock = socket.create_connection((hub.host, hub.port), timeout=WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


class SSE:
    """A `GET /rooms/:code/events` stream read event by event (http.client undoes the chunking)."""

    def __init__(self, hub: RunningHub, code: str) -> None:
        self.conn = http.client.HTTPConnection(hub.host, hub.port, timeout=WAIT_S)
        self.conn.request("GET", f"/rooms/{code}/events")
        self.resp = self.conn.getresponse()
        self.buf = b""
        self.comments: list[str] = []

    def next(self) -> tuple[str, Any] | None:
        """The next event, or None when the stream ended."""
        while True:
            while b"\n\n" in self.buf:
                block, self.buf = self.buf.split(b"\n\n", 1)
                event, data = "message", ""
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data += line[6:]
                if data:
                    return event, json.loads(data)
            try:
                piece = self.resp.read1(65536)
            except (http.client.IncompleteRead, ConnectionError):
                return None
            if not piece:
                return None
            self.buf += piece

    def until(self, name: str) -> Any:
        while True:
            item = self.next()
            assert item is not None, f"the event stream ended before {name!r}"
            if item[0] == name:
                return item[1]

    def close(self) -> None:
        self.conn.close()


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def api(hub: RunningHub) -> Iterator[Http]:
    client = Http(hub)
    yield client
    client.close()


@pytest.fixture
def code(hub: RunningHub) -> str:
    room: str = hub.state.create_room("test room")["code"]
    return room


def member(pid: str = "p1", **extra: Any) -> dict[str, Any]:
    return {
        "id": pid,
        "nickname": f"nick-{pid}",
        "model": "llama3.2:3b",
        "endpoint": "http://127.0.0.1:9",
        **extra,
    }


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- basics -----------------------------------------------------------------------------------------


def test_health(api: Http) -> None:
    r = api("GET", "/health")
    assert r.status == 200
    assert r.headers["content-type"] == JSON_TYPE and r.headers["access-control-allow-origin"] == "*"
    data = r.json()
    assert list(data) == ["status", "timestamp"] and data["status"] == "ok"
    assert isinstance(data["timestamp"], int) and data["timestamp"] > 1_600_000_000_000


def test_create_and_list_rooms(api: Http) -> None:
    r = api("POST", "/rooms", {"name": "Hack night"})
    assert r.status == 201 and r.headers["content-type"] == JSON_TYPE
    data = r.json()
    assert list(data) == ["room", "hostId"]
    room = data["room"]
    assert list(room) == ROOM_KEYS and room["name"] == "Hack night" and room["hostId"] == data["hostId"]
    assert re.fullmatch(r"[A-Z0-9]{6}", room["code"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{21}", room["id"]) and isinstance(room["createdAt"], int)
    assert api("POST", f"/rooms/{room['code']}/join", member()).status == 201
    listed = api("GET", "/rooms")
    assert listed.status == 200
    assert listed.json() == {"rooms": [{**room, "participantCount": 1}]}


def test_room_codes_are_unique_and_from_a_to_z_0_to_9(hub: RunningHub) -> None:
    codes = [hub.state.create_room(f"r{i}")["code"] for i in range(300)]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[A-Z0-9]{6}", c) for c in codes)


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "   "}, {"name": None}, {"password": "x"}])
def test_create_room_requires_a_name(api: Http, body: dict[str, Any]) -> None:
    r = api("POST", "/rooms", body)
    assert (r.status, r.error) == (400, "Name is required")


def test_request_content_type_is_not_checked(api: Http) -> None:
    r = api("POST", "/rooms", raw=b'{"name": "plain"}', headers={"Content-Type": "text/plain"})
    assert r.status == 201


# -- join -------------------------------------------------------------------------------------------


def test_join_answers_the_participant_and_room_id(api: Http, hub: RunningHub, code: str) -> None:
    body = member("p1", specs={"gpu": "RTX", "vram": 24}, config={"temperature": 0.7})
    r = api("POST", f"/rooms/{code}/join", body)
    assert r.status == 201
    data = r.json()
    assert list(data) == ["participant", "roomId"]
    p = data["participant"]
    assert list(p) == PARTICIPANT_KEYS
    assert p["status"] == "online" and p["joinedAt"] == p["lastSeen"] and isinstance(p["joinedAt"], int)
    assert data["roomId"] == api("GET", "/rooms").json()["rooms"][0]["id"]
    assert hub.state.participants(code) == [p]


def test_optional_specs_and_config_are_left_out_when_absent(api: Http, code: str) -> None:
    p = api("POST", f"/rooms/{code}/join", member()).json()["participant"]
    assert list(p) == ["id", "nickname", "model", "endpoint", "status", "joinedAt", "lastSeen"]


def test_specs_and_config_are_stored_verbatim(api: Http, code: str) -> None:
    specs = {"gpu": "NVIDIA H200", "vram": 141, "extra": {"nested": [1, 2.5, None, {"deep": True}]}, "ü": "ß"}
    config = {"temperature": 0.7, "stop": ["\n\n"], "unknown_knob": {"a": [], "b": {}}}
    api("POST", f"/rooms/{code}/join", member(specs=specs, config=config))
    (p,) = api("GET", f"/rooms/{code}/participants").json()["participants"]
    assert p["specs"] == specs and p["config"] == config
    assert list(p["specs"]) == list(specs)


@pytest.mark.parametrize("field", ["id", "nickname", "model", "endpoint"])
@pytest.mark.parametrize("how", ["missing", "empty", "null", "blank"])
def test_join_requires_each_field(api: Http, code: str, field: str, how: str) -> None:
    body = member()
    if how == "missing":
        del body[field]
    else:
        body[field] = {"empty": "", "null": None, "blank": "  "}[how]
    r = api("POST", f"/rooms/{code}/join", body)
    assert (r.status, r.error) == (400, MISSING_JOIN_FIELDS)
    assert MISSING_JOIN_FIELDS == "Missing required fields: id, nickname, model, endpoint"


def test_join_order_of_checks(api: Http, hub: RunningHub) -> None:
    locked = hub.state.create_room("locked", password="hunter22")["code"]
    # 1. room first: even a broken body on a missing room is 404
    r = api("POST", "/rooms/NOPE00/join", raw=b"{broken")
    assert (r.status, r.error) == (404, "Room not found")
    # 2. then fields, before the password
    r = api("POST", f"/rooms/{locked}/join", {"id": "p1"})
    assert (r.status, r.error) == (400, MISSING_JOIN_FIELDS)
    # 3. then the password: missing, wrong, then right
    r = api("POST", f"/rooms/{locked}/join", member())
    assert (r.status, r.error) == (401, "Invalid password")
    r = api("POST", f"/rooms/{locked}/join", member(password="wrong"))
    assert (r.status, r.error) == (401, "Invalid password")
    r = api("POST", f"/rooms/{locked}/join", member(password=""))
    assert (r.status, r.error) == (401, "Invalid password")
    assert api("POST", f"/rooms/{locked}/join", member(password="hunter22")).status == 201


def test_password_sent_to_an_open_room_is_ignored(api: Http, code: str) -> None:
    assert api("POST", f"/rooms/{code}/join", member(password="whatever")).status == 201


def test_rejoin_with_same_id_upserts_in_place(api: Http, code: str) -> None:
    for pid in ("a", "b", "c"):
        assert api("POST", f"/rooms/{code}/join", member(pid)).status == 201
    r = api("POST", f"/rooms/{code}/join", member("b", nickname="bee", model="other"))
    assert r.status == 201
    parts = api("GET", f"/rooms/{code}/participants").json()["participants"]
    assert [p["id"] for p in parts] == ["a", "b", "c"]
    assert parts[1]["nickname"] == "bee" and parts[1]["model"] == "other"


def test_codes_are_case_insensitive(api: Http, code: str) -> None:
    low = code.lower()
    assert api("POST", f"/rooms/{low}/join", member()).status == 201
    assert api("POST", f"/rooms/{low}/health", {"id": "p1"}).status == 200
    assert len(api("GET", f"/rooms/{low}/participants").json()["participants"]) == 1
    assert len(api("GET", f"/rooms/{low}/v1/models").json()["data"]) == 1
    assert api("DELETE", f"/rooms/{low}/leave/p1").json() == {"success": True}


# -- leave, health, participants, models -------------------------------------------------------------


def test_leave(api: Http, code: str) -> None:
    odd = "id with/slash & spaces"
    api("POST", f"/rooms/{code}/join", member(odd))
    r = api("DELETE", f"/rooms/{code}/leave/{quote(odd, safe='')}")
    assert (r.status, r.json()) == (200, {"success": True})
    r = api("DELETE", f"/rooms/{code}/leave/{quote(odd, safe='')}")
    assert (r.status, r.error) == (404, "Participant not found")
    r = api("DELETE", "/rooms/NOPE00/leave/x")
    assert (r.status, r.error) == (404, "Room not found")
    assert api("GET", f"/rooms/{code}/participants").json() == {"participants": []}


def test_health_check(api: Http, code: str) -> None:
    r = api("POST", "/rooms/NOPE00/health", {"id": "p1"})
    assert (r.status, r.error) == (404, "Room not found")
    r = api("POST", "/rooms/NOPE00/health", raw=b"")
    assert (r.status, r.error) == (404, "Room not found")
    for body in ({}, {"id": ""}, {"id": None}):
        r = api("POST", f"/rooms/{code}/health", body)
        assert (r.status, r.error) == (400, "Participant ID is required")
    r = api("POST", f"/rooms/{code}/health", {"id": "ghost"})
    assert (r.status, r.error) == (404, "Participant not found")
    joined = api("POST", f"/rooms/{code}/join", member()).json()["participant"]
    r = api("POST", f"/rooms/{code}/health", {"id": "p1"})
    assert (r.status, r.json()) == (200, {"success": True})
    (p,) = api("GET", f"/rooms/{code}/participants").json()["participants"]
    assert p["lastSeen"] >= joined["lastSeen"]


def test_participants_and_models_of_a_missing_room(api: Http) -> None:
    for path in ("/rooms/NOPE00/participants", "/rooms/NOPE00/v1/models", "/rooms/NOPE00/events"):
        r = api("GET", path)
        assert (r.status, r.error) == (404, "Room not found")
    r = api("POST", "/rooms/NOPE00/v1/chat/completions", {"model": "*"})
    assert (r.status, r.error) == (404, "Room not found")


def test_models_lists_online_participants_only(api: Http, hub: RunningHub, code: str) -> None:
    api("POST", f"/rooms/{code}/join", member("a"))
    api("POST", f"/rooms/{code}/join", member("b", nickname="Bob", model="qwen"))
    assert hub.state.sweep(0.0) == 2  # everyone is now "silent for too long"
    assert api("POST", f"/rooms/{code}/health", {"id": "b"}).status == 200
    r = api("GET", f"/rooms/{code}/v1/models")
    assert r.status == 200
    joined_at = api("GET", f"/rooms/{code}/participants").json()["participants"][1]["joinedAt"]
    assert r.json() == {
        "object": "list",
        "data": [
            {
                "id": "b",
                "object": "model",
                "created": joined_at // 1000,
                "owned_by": "Bob",
                "gambiarra": {"nickname": "Bob", "model": "qwen", "endpoint": "http://127.0.0.1:9"},
            }
        ],
    }


def test_sweep_marks_offline_keeps_listing_and_health_brings_back(hub: RunningHub) -> None:
    with start_hub(port=0, participant_timeout_s=0.3) as quick:
        api = Http(quick)
        code = quick.state.create_room("quick")["code"]
        events = SSE(quick, code)
        events.until("connected")
        api("POST", f"/rooms/{code}/join", member())

        def status() -> str:
            return str(api("GET", f"/rooms/{code}/participants").json()["participants"][0]["status"])

        wait_for(lambda: status() == "offline", "the sweep to mark the participant offline")
        assert events.until("participant:offline") == {"participantId": "p1"}
        assert api("GET", f"/rooms/{code}/v1/models").json()["data"] == []
        assert api("POST", f"/rooms/{code}/health", {"id": "p1"}).status == 200
        events.close()
        api.close()
    # "back online at once", checked where no sweep can race the assertion:
    code = hub.state.create_room("slow sweep")["code"]
    api = Http(hub)
    api("POST", f"/rooms/{code}/join", member())
    hub.state.sweep(0.0)
    assert [p["status"] for p in hub.state.participants(code)] == ["offline"]
    api("POST", f"/rooms/{code}/health", {"id": "p1"})
    assert [p["status"] for p in hub.state.participants(code)] == ["online"]
    api("POST", f"/rooms/{code}/join", member())  # a join too
    hub.state.sweep(0.0)
    api("POST", f"/rooms/{code}/join", member())
    assert [p["status"] for p in hub.state.participants(code)] == ["online"]
    api.close()


# -- CORS, unknown routes, methods ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rooms", "/health", "/rooms/ABC123/join", "/no/such/path", "*"])
def test_options_is_204_with_cors(hub: RunningHub, path: str) -> None:
    sock = raw_socket(hub)
    sock.sendall(
        f"OPTIONS {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    buf = bytearray()
    r = read_response(sock, buf)
    assert r.status == 204 and r.body == b""
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert r.headers["access-control-allow-headers"] == "Content-Type, Authorization"
    assert read_response(sock, buf).status == 200  # nothing was left over
    sock.close()


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/rooms/ABC123", "/rooms/ABC123/leave", "/health/x", "/rooms/A/v1"]
)
def test_unknown_routes_are_json_404(api: Http, path: str) -> None:
    r = api("GET", path)
    assert (r.status, r.json()) == (404, {"error": "Not found"})
    assert r.headers["content-type"] == JSON_TYPE and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/rooms"),
        ("DELETE", "/health"),
        ("GET", "/rooms/ABC123/join"),
        ("POST", "/rooms/A/participants"),
    ],
)
def test_wrong_method_is_json_405(api: Http, method: str, path: str) -> None:
    r = api(method, path, {"x": 1})
    assert (r.status, r.json()) == (405, {"error": "Method not allowed"})
    assert "OPTIONS" in r.headers["allow"]
    assert api("GET", "/health").status == 200  # the connection is still in step


def test_query_strings_and_a_trailing_slash_are_tolerated(api: Http) -> None:
    assert api("GET", "/health?x=1").status == 200
    assert api("GET", "/rooms/").status == 200


# -- malformed input --------------------------------------------------------------------------------

BAD_BODIES = [
    (b"", "Invalid JSON body"),
    (b"{", "Invalid JSON body"),
    (b"\xff\xfe{}", "Invalid JSON body"),
    (b'{"name": "\xe9"}', "Invalid JSON body"),
    (b'{"name": NaN}', "Invalid JSON body"),
    (b'{"name": 1e999}', "Invalid JSON body"),
    (b"[" * 100_000 + b"]" * 100_000, "Invalid JSON body"),
    (b"[]", "Request body must be a JSON object"),
    (b"null", "Request body must be a JSON object"),
    (b"42", "Request body must be a JSON object"),
    (b'"text"', "Request body must be a JSON object"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_BODIES)
@pytest.mark.parametrize(
    "route", ["/rooms", "/rooms/{code}/join", "/rooms/{code}/health", "/rooms/{code}/v1/chat/completions"]
)
def test_malformed_bodies_are_400(api: Http, code: str, route: str, raw: bytes, message: str) -> None:
    r = api("POST", route.format(code=code), raw=raw)
    assert (r.status, r.error) == (400, message)
    assert r.headers["content-type"] == JSON_TYPE
    assert api("GET", "/health").status == 200


@pytest.mark.parametrize(
    "change",
    [
        {"nickname": 5},
        {"id": ["x"]},
        {"model": {"a": 1}},
        {"endpoint": True},
        {"specs": "big"},
        {"specs": [1]},
        {"config": 3},
        {"password": 1234},
        {"nickname": "n" * 257},
        {"id": "i" * 257},
        {"model": "m" * 257},
        {"endpoint": "http://h/" + "e" * 2048},
        {"endpoint": "ftp://host/x"},
        {"endpoint": "localhost:11434"},
        {"endpoint": "http://"},
        {"endpoint": "http://host:99999"},
        {"endpoint": "http://host/a b"},
        {"specs": {"a": json.loads("[" * 40 + "]" * 40)}},
    ],
)
def test_wrong_types_and_lengths_are_400(api: Http, code: str, change: dict[str, Any]) -> None:
    r = api("POST", f"/rooms/{code}/join", {**member(), **change})
    assert r.status == 400 and isinstance(r.error, str), r
    assert "connection" not in r.headers  # a refused body that was read whole keeps the connection
    assert api("GET", f"/rooms/{code}/participants").json() == {"participants": []}


@pytest.mark.parametrize("body", [{"name": 5}, {"name": "n" * 257}, {"name": "ok", "password": ["x"]}])
def test_create_room_types_are_checked(api: Http, body: dict[str, Any]) -> None:
    r = api("POST", "/rooms", body)
    assert r.status == 400 and isinstance(r.error, str)


def test_longest_allowed_fields_are_accepted(api: Http, code: str) -> None:
    body = member("i" * 256, nickname="n" * 256, model="m" * 256, endpoint="https://h/" + "e" * 2038)
    assert api("POST", f"/rooms/{code}/join", body).status == 201


def test_body_over_1_mib_is_413_without_reading_it(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    size = 2 << 20
    sock.sendall(
        f"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"{" + b" " * 10_000
    )
    # The hub answers with most of the declared body never sent, then closes the connection.
    r = read_response(sock, bytearray())
    assert r.status == 413 and r.headers["connection"] == "close" and "error" in r.json()
    assert read_until_closed(sock) == b""
    sock.close()


def test_chunked_body_over_1_mib_is_413(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    chunk = b"x" * 65536
    sock.sendall(b"POST /rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    r = None
    buf = bytearray()
    for _ in range(40):  # up to 2.5 MiB, but the answer comes after 1 MiB
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            break
    r = read_response(sock, buf)
    assert r.status == 413
    sock.close()


def test_chunked_body_is_accepted(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    body = b'{"name": "chunky"}'
    sock.sendall(
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (5, body[:5])
        + b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(body) - 5, body[5:])
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    buf = bytearray()
    r = read_response(sock, buf)
    assert r.status == 201 and r.json()["room"]["name"] == "chunky"
    assert read_response(sock, buf).status == 200
    sock.close()


def test_expect_100_continue(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    body = b'{"name": "patient"}'
    sock.sendall(
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    buf = bytearray()
    r = read_response(sock, buf)
    assert r.status == 100
    sock.sendall(body)
    assert read_response(sock, buf).status == 201
    sock.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/2.0\r\n\r\n",
        b"GET health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
)
def test_malformed_requests_get_json_4xx_or_5xx_protocol_errors_and_a_close(
    hub: RunningHub, head: bytes
) -> None:
    sock = raw_socket(hub)
    sock.sendall(head)
    r = read_response(sock, bytearray())
    assert r.status in (400, 431, 501) and "error" in r.json()
    assert r.headers["connection"] == "close"
    sock.close()


def test_keep_alive_after_an_early_refusal(hub: RunningHub) -> None:
    """A body the hub refused (missing room) is still consumed: the next request on the connection
    gets its own correct answer, not garbage."""
    sock = raw_socket(hub)
    body = json.dumps(member()).encode() + b" " * 50_000
    first = b"POST /rooms/NOPE00/join HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"DELETE /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{ }"
    third = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(first + second + third)
    buf = bytearray()
    a, b, c = (read_response(sock, buf) for _ in range(3))
    assert (a.status, a.error) == (404, "Room not found")
    assert b.status == 405
    assert c.status == 200 and c.json()["status"] == "ok"
    sock.close()
    # and through http.client, the way a reusing client does it
    api = Http(hub)
    assert api("POST", "/rooms/NOPE00/health", {"id": "x" * 1000}).status == 404
    assert api("GET", "/health").json()["status"] == "ok"
    api.close()


def test_http_1_0_closes(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    r = read_response(sock, bytearray())
    assert r.status == 200 and r.headers["connection"] == "close"
    assert read_until_closed(sock) == b""
    sock.close()


def test_connection_close_is_honoured(hub: RunningHub) -> None:
    sock = raw_socket(hub)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_response(sock, bytearray()).headers["connection"] == "close"
    assert read_until_closed(sock) == b""
    sock.close()


# -- passwords ----------------------------------------------------------------------------------------


def test_password_never_leaves_the_hub(hub: RunningHub) -> None:
    secret = "correct-horse-battery"
    lines: list[str] = []
    with start_hub(port=0, quiet=False, log=lines.append) as loud:
        api = Http(loud)
        open_room = api("POST", "/rooms", {"name": "open"}).json()
        made = api("POST", "/rooms", {"name": "locked", "password": secret})
        code = made.json()["room"]["code"]
        events = SSE(loud, code)
        seen = [
            made,
            api("GET", "/rooms"),
            api("POST", f"/rooms/{code}/join", member(password="nope")),
            api("POST", f"/rooms/{code}/join", member(password=secret)),
            api("GET", f"/rooms/{code}/participants"),
            api("GET", f"/rooms/{code}/v1/models"),
        ]
        joined = events.until("participant:joined")
        for r in seen:
            text = r.body.decode()
            assert secret not in text and '"password"' not in text.lower(), r
            assert "hash" not in text.lower() and "salt" not in text.lower()
        assert "password" not in joined
        # a protected room looks exactly like an open one
        assert list(made.json()["room"]) == list(open_room["room"]) == ROOM_KEYS
        rooms = api("GET", "/rooms").json()["rooms"]
        assert [list(r) for r in rooms] == [ROOM_KEYS + ["participantCount"]] * 2
        events.close()
        api.close()
    assert lines and all(secret not in line for line in lines)
    assert any(re.search(r"POST /rooms/\w+/join 201 [\d.]+ms", line) for line in lines)


# -- events ---------------------------------------------------------------------------------------


def test_event_stream(hub: RunningHub, api: Http, code: str) -> None:
    events = SSE(hub, code.lower())
    assert events.resp.status == 200
    assert events.resp.getheader("Content-Type", "").startswith("text/event-stream")
    assert events.resp.getheader("Access-Control-Allow-Origin") == "*"
    first = events.next()
    assert first is not None and first[0] == "connected"
    assert isinstance(first[1]["clientId"], str) and first[1]["clientId"]
    other = api("POST", "/rooms", {"name": "another"}).json()["room"]
    assert events.until("room:created") == other
    joined = api("POST", f"/rooms/{code}/join", member()).json()["participant"]
    assert events.until("participant:joined") == joined
    api("DELETE", f"/rooms/{code}/leave/p1")
    assert events.until("participant:left") == {"participantId": "p1"}
    events.close()


def test_events_are_per_room_but_room_created_goes_to_all(hub: RunningHub, api: Http, code: str) -> None:
    other = hub.state.create_room("other")["code"]
    events = SSE(hub, code)
    events.until("connected")
    api("POST", f"/rooms/{other}/join", member("elsewhere"))
    api("POST", f"/rooms/{code}/join", member("here"))
    assert events.until("participant:joined")["id"] == "here"
    events.close()


def test_event_stream_keepalive_comment(hub: RunningHub, code: str) -> None:
    hub.keepalive_s = 0.01
    events = SSE(hub, code)
    events.until("connected")
    wait_for(lambda: events.resp.read1(65536).startswith(b": keepalive"), "a keepalive comment")
    events.close()


def test_deleting_a_room_ends_its_event_streams(hub: RunningHub, code: str) -> None:
    events = SSE(hub, code)
    events.until("connected")
    assert hub.state.delete_room(code)
    assert events.next() is None
    events.close()


# -- faults and lifecycle ----------------------------------------------------------------------------


def test_fault_500_and_html(hub: RunningHub, api: Http) -> None:
    hub.fault = "500"
    for path in ("/health", "/rooms", "/nope"):
        r = api("GET", path)
        assert (r.status, r.json()) == (500, {"error": "boom"})
    hub.fault = "html"
    r = api("POST", "/rooms", {"name": "x"})
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert r.body.startswith(b"<html>")
    hub.fault = "slow:0.01"
    assert api("GET", "/health").status == 200
    hub.fault = None
    assert api("GET", "/rooms").json() == {"rooms": []}


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_requests_seen_counts_requests(hub: RunningHub, api: Http) -> None:
    assert hub.requests_seen() == 0
    hub.state.create_room("not over HTTP")
    assert hub.requests_seen() == 0
    api("GET", "/health")
    api("GET", "/nope")
    assert hub.requests_seen() == 2


def test_freeze_holds_requests_until_lifted(hub: RunningHub) -> None:
    hub.fault = "freeze"
    api = Http(hub)
    t, out = _in_thread(lambda: api("GET", "/health"))
    wait_for(lambda: hub.frozen_requests() == 1, "the request to be frozen")
    assert not out
    hub.fault = None
    t.join(WAIT_S)
    assert out[0].status == 200
    assert hub.frozen_requests() == 0
    api.close()


def test_stop_unblocks_frozen_requests_and_event_streams(hub: RunningHub, code: str) -> None:
    events = SSE(hub, code)
    events.until("connected")
    hub.fault = "freeze"
    api = Http(hub)
    t, out = _in_thread(lambda: api("POST", f"/rooms/{code}/health", {"id": "x"}))
    wait_for(lambda: hub.frozen_requests() == 1, "the request to be frozen")
    hub.stop()
    t.join(WAIT_S)
    assert not t.is_alive() and isinstance(out[0], (ConnectionError, http.client.HTTPException)), out
    assert events.next() is None
    hub.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection((hub.host, hub.port), timeout=WAIT_S).close()
    events.close()
    api.close()


def test_restart_on_the_same_port_with_and_without_state() -> None:
    first = start_hub(port=0)
    code = first.state.create_room("survivor")["code"]
    api = Http(first)
    api("POST", f"/rooms/{code}/join", member())
    api.close()
    state, port = first.state, first.port
    first.stop()
    with start_hub(port=port, state=state) as back:
        api = Http(back)
        assert [r["code"] for r in api("GET", "/rooms").json()["rooms"]] == [code]
        assert api("POST", f"/rooms/{code}/health", {"id": "p1"}).status == 200
        api.close()
    with start_hub(port=port) as fresh:
        api = Http(fresh)
        r = api("POST", f"/rooms/{code}/health", {"id": "p1"})
        assert (r.status, r.error) == (404, "Room not found")
        api.close()


def test_hub_state_api(hub: RunningHub, api: Http) -> None:
    state = hub.state
    room = state.create_room("direct", password="pw")
    code = room["code"]
    assert list(room) == ROOM_KEYS
    api("POST", f"/rooms/{code}/join", member(password="pw"))
    api("POST", f"/rooms/{code}/join", member("p2", password="pw", specs={"a": [1]}))
    copy = state.participants(code.lower())
    copy[1]["specs"]["a"].append(2)
    copy.pop()
    assert len(state.participants(code)) == 2 and state.participants(code)[1]["specs"] == {"a": [1]}
    assert state.forget_participant(code, "p1") and not state.forget_participant(code, "p1")
    r = api("POST", f"/rooms/{code}/health", {"id": "p1"})
    assert (r.status, r.error) == (404, "Participant not found")
    assert state.delete_room(code.lower()) and not state.delete_room(code)
    with pytest.raises(KeyError):
        state.participants(code)
    r = api("POST", f"/rooms/{code}/health", {"id": "p2"})
    assert (r.status, r.error) == (404, "Room not found")
    state.create_room("a")
    state.clear()
    assert api("GET", "/rooms").json() == {"rooms": []}
    assert isinstance(HubState(), HubState)


def test_log_lines_name_method_path_status_and_time_but_no_body() -> None:
    lines: list[str] = []
    with start_hub(port=0, quiet=False, log=lines.append) as loud:
        api = Http(loud)
        api("POST", "/rooms", {"name": "sekrit-room-name"})
        api("GET", "/nope")
        api.close()
    wait_for(lambda: len(lines) >= 2, "two log lines")
    assert re.search(r"POST /rooms 201 [\d.]+ms$", lines[0]) and re.search(
        r"GET /nope 404 [\d.]+ms$", lines[1]
    )
    assert not any("sekrit" in line for line in lines)


def test_quiet_logs_nothing() -> None:
    lines: list[str] = []
    with start_hub(port=0, quiet=True, log=lines.append) as hub:
        api = Http(hub)
        api("GET", "/health")
        api.close()
    assert lines == []


# -- serve(): the foreground process ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_signal(sig: int) -> None:
    code = "import sys; from llmroom_cli.hub import serve; sys.exit(serve('127.0.0.1', 0, 30.0, False))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.fullmatch(r"llmroom hub listening on http://127\.0\.0\.1:(\d+) \(Ctrl-C to stop\)\n", line)
        assert match, line
        port = int(match.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s, bytearray()).status == 200
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait(WAIT_S) == 0, rest
        assert "Traceback" not in rest
        assert re.search(r"GET /health 200", rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            serve("127.0.0.1", port, 30.0, True)
        assert str(port) in str(info.value) and "already in use" in str(info.value)
        assert isinstance(info.value, LlmroomError) and info.value.exit_code == 1
        with pytest.raises(PortInUse):
            start_hub(port=port)


def test_bad_host_is_a_clear_error() -> None:
    with pytest.raises(ListenError) as info:
        start_hub(host="no-such-host.invalid", port=0)
    assert "no-such-host.invalid" in str(info.value)


def test_server_imports_only_the_standard_library() -> None:
    code = (
        "import sys, llmroom_cli.server; "
        "print(sorted({'httpx', 'rich', 'psutil', 'llmroom_cli.client'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S)
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr
