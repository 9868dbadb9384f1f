"""https URLs are verified the normal way (the CA bundle, or SSL_CERT_FILE; the host name checked):
`join --advertise https://...` and `doctor` with an https endpoint work against a trusted
certificate, and refuse an untrusted one."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmroom_cli.server import RunningHub
from llmroom_cli.standin import StandIn
from tests.helpers import Agent, cli
from tests.hostile_hubs import HostileHub

TLS = Path(__file__).resolve().parent / "fixtures" / "tls"
CERT = str(TLS / "localhost-cert.pem")


@pytest.fixture
def https_server() -> Iterator[HostileHub]:
    """An OpenAI-compatible server (and proxy stand-in) on https://localhost:PORT."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERT, str(TLS / "localhost-key.pem"))
    with HostileHub(tls=ctx) as server:
        server.models = ["tls-model"]
        yield server


def test_advertise_https_is_checked_with_real_verification(hub: RunningHub, https_server: HostileHub) -> None:
    room = hub.state.create_room("r")["code"]
    with StandIn() as llm:
        trusted = dict(os.environ, SSL_CERT_FILE=CERT)
        a = Agent(
            room, "--hub", hub.url, "-e", llm.url, "--advertise", https_server.url, "--json", env=trusted
        )
        joined = a.wait_event("joined")
        assert joined["endpoint"] == https_server.url
        a.signal()
        assert a.finish() == 0, a.stderr
        # The same certificate, not trusted: the check fails (verification is on, not skipped).
        untrusted = Agent(room, "--hub", hub.url, "-e", llm.url, "--advertise", https_server.url, "--json")
        assert untrusted.finish() == 6
        assert "nothing answers at" in untrusted.stderr


def test_doctor_with_an_https_endpoint(hub: RunningHub, https_server: HostileHub) -> None:
    env = dict(os.environ, SSL_CERT_FILE=CERT)
    r = cli("doctor", "--hub", hub.url, "--endpoint", https_server.url, "--json", env=env)
    assert '"tls-model"' in r.stdout, r.stdout + r.stderr
    assert '"published address"' in r.stdout
    import json

    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks[f"LLM server {https_server.url}"]["ok"] is True
    assert checks["published address"]["ok"] is True, checks["published address"]
