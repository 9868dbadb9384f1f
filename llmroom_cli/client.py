"""HubClient: every route of the hub API over one injected httpx.Client; HTTP failures -> errors.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from llmroom_cli.errors import (
    HubProtocolError,
    HubRejected,
    HubUnavailable,
    InvalidPassword,
    ParticipantNotFound,
    RoomNotFound,
)
from llmroom_cli.http import Answer, AnswerTooLarge, exchange

_START_HINT = "is the hub running? start one with: llmroom serve"

# What is read from a hub answer, at most (decompressed). Join, heartbeat, leave, health and create
# answer with one small object: 64 KiB is ample and bounds what a hostile hub costs us. Listings grow
# with the room: a participant with full specs is about 1 KiB, so 32 MiB holds some 30,000 of them.
ANSWER_CAP_BYTES = 64 * 1024
LIST_CAP_BYTES = 32 * 1024 * 1024
# One event of the room's event stream (a line of `data:`), at most.
EVENT_CAP_BYTES = 1024 * 1024
# The whole exchange (connect, send, headers, body) of a call without its own deadline.
CALL_DEADLINE_S = 10.0
LIST_DEADLINE_S = 30.0


class HubClient:
    """A hub at `base_url`, spoken to through `http` (built by the CLI; tests pass a MockTransport)."""

    def __init__(self, http: httpx.Client, base_url: str) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")

    # -- routes -----------------------------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/health", timeout_s=timeout_s)

    def create_room(self, name: str, password: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if password:
            body["password"] = password
        data = self._json("POST", "/rooms", body)
        room = data.get("room")
        if not isinstance(room, dict) or not isinstance(room.get("code"), str):
            raise self._bad_shape("POST /rooms")
        return data

    def list_rooms(self) -> list[dict[str, Any]]:
        data = self._json("GET", "/rooms", max_bytes=LIST_CAP_BYTES, timeout_s=LIST_DEADLINE_S)
        rooms = data.get("rooms")
        if not isinstance(rooms, list) or not all(isinstance(r, dict) for r in rooms):
            raise self._bad_shape("GET /rooms")
        return rooms

    def rooms_body(self) -> dict[str, Any]:
        """The raw body of GET /rooms (for `list --json`), shape-checked."""
        data = self._json("GET", "/rooms", max_bytes=LIST_CAP_BYTES, timeout_s=LIST_DEADLINE_S)
        if not isinstance(data.get("rooms"), list):
            raise self._bad_shape("GET /rooms")
        return data

    def participants_body(self, code: str) -> dict[str, Any]:
        path = f"/rooms/{_seg(code)}/participants"
        data = self._json("GET", path, max_bytes=LIST_CAP_BYTES, timeout_s=LIST_DEADLINE_S)
        parts = data.get("participants")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise self._bad_shape("GET /rooms/:code/participants")
        return data

    def participants(self, code: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = self.participants_body(code)["participants"]
        return parts

    def join(self, code: str, body: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        data = self._json("POST", f"/rooms/{_seg(code)}/join", body, timeout_s=timeout_s)
        if not isinstance(data.get("participant"), dict):
            raise self._bad_shape("POST /rooms/:code/join")
        return data

    def heartbeat(self, code: str, participant_id: str, timeout_s: float | None = None) -> None:
        self._json("POST", f"/rooms/{_seg(code)}/health", {"id": participant_id}, timeout_s=timeout_s)

    def leave(self, code: str, participant_id: str, timeout_s: float | None = None) -> None:
        path = f"/rooms/{_seg(code)}/leave/{_seg(participant_id)}"
        self._json("DELETE", path, timeout_s=timeout_s)

    def models(self, code: str) -> dict[str, Any]:
        return self._json("GET", f"/rooms/{_seg(code)}/v1/models", max_bytes=LIST_CAP_BYTES)

    def chat(self, code: str, body: dict[str, Any], timeout_s: float | None = 60.0) -> dict[str, Any]:
        path = f"/rooms/{_seg(code)}/v1/chat/completions"
        return self._json("POST", path, body, timeout_s=timeout_s, max_bytes=LIST_CAP_BYTES)

    def events(
        self, code: str, prefix: str = "", silence_s: float | None = None
    ) -> Iterator[tuple[str, Any]]:
        """Follow the room's Server-Sent Events: yields (event, data) until the stream ends. `prefix`
        "/v1" follows a v0.6 hub's `/v1/rooms/:code/events`; a stream that sends nothing (not even a
        comment) for `silence_s` raises HubUnavailable, so the caller can open a new one."""
        url = f"{self.base_url}{prefix}/rooms/{_seg(code)}/events"
        timeout = httpx.Timeout(connect=self.http.timeout.connect, read=silence_s, write=5.0, pool=5.0)
        try:
            with self.http.stream("GET", url, timeout=timeout) as resp:
                if resp.status_code != 200:
                    head = bytearray()
                    for chunk in resp.iter_bytes():
                        head += chunk
                        if len(head) > ANSWER_CAP_BYTES:
                            break
                    answer = Answer(resp.status_code, resp.headers, bytes(head[:ANSWER_CAP_BYTES]))
                    self._raise_for(answer, "GET", f"{prefix}/rooms/{code}/events")
                event, data = "message", ""
                for line in resp.iter_lines():
                    if len(data) + len(line) > EVENT_CAP_BYTES:
                        raise HubProtocolError(
                            f"the hub at {self.base_url} sent an event larger than {EVENT_CAP_BYTES} bytes"
                        )
                    if not line:
                        if data:
                            yield event, _loads_or_text(data)
                        event, data = "message", ""
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
        except httpx.ReadTimeout as exc:
            raise HubUnavailable(f"the hub at {self.base_url} sent no event for {silence_s} s") from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        except httpx.DecodingError as exc:
            raise HubProtocolError(
                f"the hub at {self.base_url} sent an undecodable event stream: {exc}"
            ) from exc

    # -- plumbing ---------------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        max_bytes: int = ANSWER_CAP_BYTES,
    ) -> dict[str, Any]:
        """One call: the whole exchange ends within `timeout_s` and reads at most `max_bytes`; every
        way a hub can answer badly (slow, huge, undecodable, not JSON, absurdly nested) becomes
        HubUnavailable or HubProtocolError, never anything else."""
        url = self.base_url + path
        total_s = timeout_s if timeout_s is not None else CALL_DEADLINE_S
        try:
            resp = exchange(self.http, method, url, json=body, total_s=total_s, max_bytes=max_bytes)
        except httpx.TimeoutException as exc:
            raise HubUnavailable(f"the hub at {self.base_url} did not answer in time", _START_HINT) from exc
        except AnswerTooLarge as exc:
            raise HubProtocolError(
                f"the hub at {self.base_url} answered {method} {path} with too much data ({exc})",
                "check the --hub URL",
            ) from exc
        except httpx.DecodingError as exc:
            raise HubProtocolError(
                f"the hub at {self.base_url} answered {method} {path} with an undecodable body ({exc})",
                "check the --hub URL",
            ) from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code >= 400:
            self._raise_for(resp, method, path)
        data = _json_object(resp)
        if data is None:
            raise HubProtocolError(
                f"{self.base_url} answered {method} {path} with something that is not the hub API"
                f" ({_describe(resp)})",
                "check the --hub URL",
            )
        return data

    def _raise_for(self, resp: Answer | httpx.Response, method: str, path: str) -> None:
        data = _json_object(resp)
        message = data.get("error") if data is not None else None
        envelope_hint: str | None = None
        if isinstance(message, dict):
            # A v0.6 management error envelope ({"error": {"code", "message", "hint"}}), met on the
            # routes both generations share (the event stream): its hint is worth showing.
            ecode, text, hint = message.get("code"), message.get("message"), message.get("hint")
            envelope_hint = hint[:300] if isinstance(hint, str) and hint else None
            if ecode == "ROOM_NOT_FOUND":
                text = "Room not found"
            elif ecode == "PARTICIPANT_NOT_FOUND":
                text = "Participant not found"
            message = text[:300].rstrip(".") if isinstance(text, str) and text else None
        if not isinstance(message, str):
            if resp.status_code >= 500 or data is None:
                raise HubProtocolError(
                    f"the hub at {self.base_url} answered {method} {path} with {_describe(resp)}",
                    "check the --hub URL, or try again later",
                )
            message = f"HTTP {resp.status_code}"
        status = resp.status_code
        if status == 404 and message == "Room not found":
            raise RoomNotFound(
                f"room not found on {self.base_url}",
                envelope_hint
                or f"check the code with: llmroom list --hub {self.base_url}; a restarted hub has no rooms",
            )
        if status == 404 and message == "Participant not found":
            raise ParticipantNotFound(f"the hub at {self.base_url} does not know this participant", status)
        if status == 401:
            raise InvalidPassword(
                f"invalid password for this room on {self.base_url}",
                "give it with --password-stdin or LLMROOM_PASSWORD",
            )
        if status >= 500:
            raise HubUnavailable(f"the hub at {self.base_url} failed: {status} {message}")
        if status in (404, 405):
            # Every route we call exists on a hub: a server without it is not speaking the hub API.
            raise HubProtocolError(
                f"{self.base_url} does not know {method} {path} ({status} {message}): it is not the hub API",
                "check the --hub URL",
            )
        raise HubRejected(
            f"the hub at {self.base_url} refused {method} {path}: {message}", status, envelope_hint
        )

    def _unreachable(self, exc: Exception) -> HubUnavailable:
        from llmroom_cli.http import in_words

        reason = str(in_words(exc) if isinstance(exc, httpx.TransportError) else exc) or type(exc).__name__
        return HubUnavailable(f"cannot reach the hub at {self.base_url}: {reason}", _START_HINT)

    def _bad_shape(self, route: str) -> HubProtocolError:
        return HubProtocolError(
            f"the hub at {self.base_url} answered {route} with an unexpected shape", "check the --hub URL"
        )


def _seg(value: str) -> str:
    return quote(value, safe="")


def _json_object(resp: Answer | httpx.Response) -> dict[str, Any] | None:
    try:
        data = json.loads(resp.content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: JSON nested thousands deep is hub trouble like any other non-JSON answer.
        return None
    return data if isinstance(data, dict) else None


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _describe(resp: Answer | httpx.Response) -> str:
    ctype = resp.headers.get("content-type", "no content type").split(";")[0]
    return f"HTTP {resp.status_code}, {ctype}"
