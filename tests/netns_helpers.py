"""A network of our own for the mDNS tests: a fresh network namespace holding only a loopback with
multicast on, so no other hub on the machine or the LAN can be seen, and localhost:3000 is free.

`own_network()` yields the command prefix that runs a process in it (`ip netns exec NAME`); the
namespace is deleted in a finaliser whatever happens. Without root or iproute2 it yields None, and
callers fall back to the shared network, filtering by the hub they started where they can.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

STANDIN = """
import sys
from llmroom_cli.standin import StandIn
with StandIn(port=int(sys.argv[1])) as s:
    print(s.url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.contextmanager
def own_network() -> Iterator[list[str] | None]:
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        yield None
        return

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ip, *args], capture_output=True, text=True, timeout=30)

    ns = f"llmroom-quiet-{secrets.token_hex(3)}"
    if run("netns", "add", ns).returncode != 0:
        yield None
        return
    try:
        for step in (
            ("-n", ns, "link", "set", "lo", "up"),
            ("-n", ns, "link", "set", "lo", "multicast", "on"),
            ("-n", ns, "route", "add", "224.0.0.0/4", "dev", "lo"),
        ):
            done = run(*step)
            assert done.returncode == 0, (step, done.stderr)
        yield [ip, "netns", "exec", ns]
    finally:
        run("netns", "del", ns)
        assert ns not in run("netns", "list").stdout, f"namespace {ns} left behind"


@contextlib.contextmanager
def standin_in(prefix: list[str] | None, port: int = 0) -> Iterator[str]:
    """A stand-in LLM server in the namespace of `prefix` (this one when None); yields its URL."""
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", STANDIN, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), url
        yield url
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
