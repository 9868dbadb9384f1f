"""`llmroom join` pauses the participant while the local server it shares is down, and brings it
back with the same id once the server answers again: real processes, a real embedded hub, a real
stand-in server killed and restarted on the same port, on both hub generations."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from llmroom_cli.hub import RunningHub
from llmroom_cli.standin import MODEL as STANDIN_MODEL
from tests.helpers import Agent, cli, wait_for

INTERVAL = "0.3"


class ServerProcess:
    """The stand-in LLM server in a process of its own, so that killing it closes every connection
    to it, as a crashed Ollama does (an in-process server keeps serving kept-alive connections)."""

    def __init__(self, port: int = 0) -> None:
        code = (
            "import sys, time\n"
            "from llmroom_cli.standin import StandIn\n"
            f"s = StandIn(port={port})\n"
            "print(s.url, flush=True)\n"
            "time.sleep(3600)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _chat(hub: RunningHub, room: str) -> int:
    body = {"model": STANDIN_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(trust_env=False, timeout=10) as http:
        return http.post(f"{hub.url}/rooms/{room}/v1/chat/completions", json=body).status_code


@pytest.mark.parametrize("api", ["v0.1", "v0.6"])
def test_a_dead_server_pauses_the_participant_and_its_return_resumes_it(
    hub: RunningHub, api: str, clean_env: dict[str, str]
) -> None:
    room = hub.state.create_room("r")["code"]
    llm = ServerProcess()
    port = llm.port
    agent = Agent(room, "--hub", hub.url, "-e", llm.url, "--hub-api", api, "--json", "--interval", INTERVAL)
    try:
        joined = agent.wait_event("joined")
        pid = joined["id"]

        def routable() -> bool:
            parts = [p for p in hub.state.participants(room) if p["id"] == pid]
            return bool(parts) and parts[0].get("status") == "online" and _chat(hub, room) == 200

        wait_for(routable, "a chat answered through the participant")
        llm.kill()
        paused = agent.wait_event("paused")
        assert paused["cause"] == "server_down" and paused["reason"]
        # The room stops sending requests to it: no online participant with this id any more.
        wait_for(
            lambda: (
                not any(p["id"] == pid and p.get("status") == "online" for p in hub.state.participants(room))
            ),
            "the hub to stop routing to the paused participant",
        )
        assert _chat(hub, room) != 200
        status = cli("status", "--json", env=clean_env).stdout
        assert '"state":"paused"' in status.replace(" ", "")

        wait_for(lambda: _free(port), "the port to be free")
        llm = ServerProcess(port)  # the server is back on the same address
        resumed = agent.wait_event("resumed")
        assert resumed.get("id", pid) == pid
        wait_for(routable, "the participant back with the same id")
        agent.signal()
        assert agent.finish() == 0, agent.stderr
        assert "Traceback" not in agent.stderr
    finally:
        llm.kill()


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")), reason="this machine has an NVIDIA GPU")
def test_pause_when_busy_without_a_gpu_says_so_once_and_keeps_sharing(
    hub: RunningHub, clean_env: dict[str, str]
) -> None:
    room = hub.state.create_room("r")["code"]
    llm = ServerProcess()
    agent = Agent(
        room, "--hub", hub.url, "-e", llm.url, "--json", "--interval", INTERVAL, "--pause-when-busy"
    )
    try:
        agent.wait_event("joined")
        agent.wait_event("heartbeat", count=5)
        assert "paused" not in agent.names()
        wait_for(lambda: _chat(hub, room) == 200, "a chat answered")
        agent.signal()
        assert agent.finish() == 0, agent.stderr
        notes = [line for line in agent.stderr.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "GPU" in notes[0], agent.stderr
    finally:
        llm.kill()
