"""`llmroom demo`: an embedded hub, a stand-in LLM server, a room, and a real participant in it.

The participant runs through exactly the code path of `llmroom join`; the demo only adds a script
that sends one chat request through the hub and lists the room while the participant is online.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

from llmroom_cli.errors import LlmroomError
from llmroom_cli.identity import default_nickname

if TYPE_CHECKING:
    from llmroom_cli.share import ShareUI

PROMPT = "Say hello to the room in one sentence."


# Where `llmroom serve` listens by default: the next steps are copy-paste right after it.
SERVE_HUB = "http://localhost:3000"


def next_steps() -> list[str]:
    """What the demo ends with: how to share a real LLM in a real room, and how to use that room."""
    from llmroom_cli.options import curl_example, room_api_url

    return [
        "next: share your own LLM in a real room:",
        "  llmroom serve              (a hub on this machine; or name your team's with --hub URL)",
        "  llmroom create 'My room'   (prints the room CODE)",
        "  llmroom join CODE          (shares the LLM server found on this machine)",
        f"the room is then an OpenAI-compatible API at {room_api_url(SERVE_HUB, 'CODE')}:",
        f"  {curl_example(SERVE_HUB, 'CODE')}",
    ]


def run_demo(duration_s: float, endpoint: str | None, interval_s: float, ui: ShareUI, port: int = 0) -> int:
    """Run the demo; the participant is a `share.run_share` like `llmroom join`'s. `port`: the
    embedded hub's (0: a free one)."""
    from llmroom_cli import render
    from llmroom_cli.client import HubClient
    from llmroom_cli.endpoints import normalize_endpoint
    from llmroom_cli.http import make_http
    from llmroom_cli.hub import start_hub
    from llmroom_cli.options import curl_example, room_api_url
    from llmroom_cli.standin import StandIn

    ep = normalize_endpoint(endpoint) if endpoint else None
    hub = start_hub(port=port, quiet=True)
    standin = None if ep else StandIn()
    ep = ep or (standin.url if standin else "")
    try:
        client = HubClient(make_http(hub.url), hub.url)
        room = client.create_room("llmroom demo")["room"]["code"]
        mode = "live" if sys.stdout.isatty() else "plain"
        what = "a real local server" if endpoint else "the built-in stand-in LLM"
        render.print_text(
            f"embedded hub on {hub.url} · room {room} created · sharing {what} at {ep}", style="bold"
        )
        url = room_api_url(hub.url, room)
        line = f"use the room (OpenAI-compatible) while the demo runs: {url}"
        render.print_text(line, style="dim", soft_wrap=True)
        render.print_text(f"  {curl_example(hub.url, room)}", style="dim", soft_wrap=True)
        wake = threading.Event()
        outputs: list[Any] = []

        def script() -> None:
            out = outputs[0]
            try:
                # Wait for the first heartbeat to land, so the room shows a live participant.
                if wake.wait(min(interval_s * 1.5, 2.0)):
                    return
                out.note(f"> sending a chat request to room {room} through the hub: {PROMPT!r}")
                body = {"model": "*", "messages": [{"role": "user", "content": PROMPT}]}
                answer = client.chat(room, body)
                choices = answer.get("choices") or [{}]
                content = (choices[0].get("message") or {}).get("content", "")
                out.note(f"< the participant answered: {str(content).strip()}")
                parts = client.participants(room)
                # Piped, the scripts' format (whole ids, ISO times), as `list` prints it.
                rows, dim = render.participants_view(parts, plain=not sys.stdout.isatty())
                out.note(f"room {room} now lists:", (render.PARTICIPANT_COLUMNS, rows, dim))
            except LlmroomError as exc:
                out.note(f"! the chat request failed: {exc}")
            wake.wait(duration_s)
            wake.set()

        from llmroom_cli.share import SharePlan, run_share

        plan = SharePlan(
            room,
            hub.url,
            ep,
            default_nickname(),
            interval_s=interval_s,
            mode=mode,
            on_started=lambda: threading.Thread(target=script, name="llmroom-demo", daemon=True).start(),
            wake=wake,
            output_hook=outputs.append,
        )
        code = run_share(plan, ui)
        for i, line in enumerate(next_steps()):
            render.print_text(line, style="bold" if i == 0 else "dim", soft_wrap="curl " in line)
        return code
    finally:
        hub.stop()
        if standin is not None:
            standin.stop()
