"""Side by side: candidate server libraries for the embedded hub, and the hub that was there before.

Runs alone: `python benchmarks/hub_servers.py [--seconds 3] [--idle 10000] [--servers a,b]`.
Each server runs in its own process and answers `GET /health` with the hub's JSON:

- `old hub`: the hand-written HTTP/1.1 hub (`llmroom_cli/server.py` at git rev `--old-rev`, default
  the commit before the rebuild), a thread per connection;
- `aiohttp`: `aiohttp.web` with one route, `AppRunner` + `TCPSite`, access log off;
- `uvicorn`: uvicorn with a bare ASGI app (httptools parser, `websockets` installed for its WS
  support), access log and lifespan off;
- `new hub` (when present): `llmroom_cli.hub.serve`, quiet.

Figures: req/s and p99 at 8 and 64 keep-alive connections, medians of `--rounds` rounds run interleaved
across the servers (all up at once; closed loop, load from several client
processes, hub_load.py's worker); RSS idle; RSS and `/health` p99 (8 connections) while `--idle`
extra connections sit open doing nothing (the client raises RLIMIT_NOFILE soft to hard); the server's
import time (`python -X importtime`-free: wall time of `python -c "import <module>"`, median of 5).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_load import _free_port, _worker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

AIOHTTP_SERVER = """
import asyncio, json, sys, time
from aiohttp import web

async def health(request):
    return web.Response(text=json.dumps({"status": "ok", "timestamp": int(time.time() * 1000)}),
                        content_type="application/json", charset="utf-8")

async def main(port):
    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", file=sys.stderr, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""

UVICORN_SERVER = """
import json, sys, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"status": "ok", "timestamp": int(time.time() * 1000)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json;charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

class Ready(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        print("ready", file=sys.stderr, flush=True)

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, lifespan="off",
                        log_level="warning", http="httptools", ws="websockets", backlog=4096)
Ready(config).run()
"""


def _old_hub_dir(rev: str) -> str | None:
    """The old hub's server.py, checked out from git into a temp package (None when git cannot)."""
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:llmroom_cli/server.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = tempfile.mkdtemp(prefix="oldhub-")
    Path(folder, "old_hub_server.py").write_text(text)
    return folder


def _launch(name: str, port: int, old_dir: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if name == "old hub":
        assert old_dir is not None
        env["PYTHONPATH"] = old_dir + os.pathsep + str(ROOT)
        code = f"from old_hub_server import serve; serve('127.0.0.1', {port}, 30.0, True)"
    elif name == "new hub":
        code = f"from llmroom_cli.hub import serve; serve('127.0.0.1', {port}, 30.0, True)"
    elif name == "aiohttp":
        code = AIOHTTP_SERVER
    else:
        code = UVICORN_SERVER
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    if not proc.stderr.readline():
        raise SystemExit(f"{name} did not start")
    return proc


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _load(port: int, conns: int, seconds: float, procs: int) -> tuple[float, float, float, int]:
    import multiprocessing as mp

    start_at = time.perf_counter() + 0.5
    measure_from = start_at + 0.3
    shares = [s for s in (conns // procs + (1 if i < conns % procs else 0) for i in range(procs)) if s]
    with mp.get_context("fork").Pool(len(shares)) as pool:
        jobs = [
            pool.apply_async(
                _worker, (port, REQUEST, n, False, start_at, measure_from, measure_from + seconds)
            )
            for n in shares
        ]
        outs = [j.get(timeout=seconds + 60) for j in jobs]
    lat = sorted(x for o in outs for x in o["lat"])
    errors = sum(o["errors"] for o in outs)
    if not lat:
        return 0.0, float("nan"), float("nan"), errors
    return len(lat) / seconds, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))], errors


def _hold_idle(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            break
    return socks


def _import_s(module: str) -> float:
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", f"import {module}"], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
        )
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


IMPORTS = {"aiohttp": "aiohttp.web", "uvicorn": "uvicorn", "new hub": "llmroom_cli.hub"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=3, help="load client processes")
    parser.add_argument("--idle", type=int, default=10_000, help="idle connections to hold")
    parser.add_argument("--servers", default="old hub,aiohttp,uvicorn,new hub")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--old-rev", default="3333793", help="git rev holding the old server.py")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it too
    print(
        f"# hub_servers: {os.cpu_count()} CPUs, {args.procs} load processes, {args.seconds:.0f} s/scenario,"
        f" RLIMIT_NOFILE {soft} -> {hard}"
    )
    old_dir = _old_hub_dir(args.old_rev)
    names = [n for n in args.servers.split(",") if n != "old hub" or old_dir is not None]
    procs: dict[str, tuple[subprocess.Popen[str], int]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name in names:  # all up at once; each is loaded in turn, round after round
            port = _free_port()
            procs[name] = (_launch(name, port, old_dir), port)
        table = {n: {"server": n, "rss_idle": _rss_mib(procs[n][0].pid)} for n in names}
        samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):  # interleaved, so a busy moment on a shared machine hits all alike
            for conns in (8, 64):
                for name in names:
                    rps, _, p99, errors = _load(procs[name][1], conns, args.seconds, args.procs)
                    samples.setdefault((name, conns), []).append((rps, p99))
                    table[name][f"err{conns}"] = table[name].get(f"err{conns}", 0) + errors
        for (name, conns), got in samples.items():
            table[name][f"rps{conns}"] = statistics.median(r for r, _ in got)
            table[name][f"p99_{conns}"] = statistics.median(p for _, p in got)
            table[name][f"all{conns}"] = [round(r) for r, _ in got]
        for name in names:
            proc, port = procs[name]
            row: dict[str, Any] = table[name]
            socks = _hold_idle(port, args.idle)
            time.sleep(1.0)  # let the server accept the backlog
            row["held"] = len(socks)
            row["rss_conns"] = _rss_mib(proc.pid)
            row["threads"] = _threads(proc.pid)
            rps, _, p99, errors = _load(port, 8, max(1.0, args.seconds), args.procs)
            row["rps_conns"], row["p99_conns"], row["err_conns"] = rps, p99, errors
            for sock in socks:
                sock.close()
            row["import_s"] = _import_s(IMPORTS[name]) if name in IMPORTS else float("nan")
            rows.append(row)
            print(row, flush=True)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print()
    print(
        "| server | req/s @8 | p99 ms @8 | req/s @64 | p99 ms @64 | RSS idle MiB | idle conns held |"
        " RSS then MiB | threads then | /health req/s @8 then | p99 ms then | import s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['server']} | {r['rps8']:.0f} | {r['p99_8']:.2f} | {r['rps64']:.0f} | {r['p99_64']:.2f} |"
            f" {r['rss_idle']:.1f} | {r['held']} | {r['rss_conns']:.1f} | {r['threads']} |"
            f" {r['rps_conns']:.0f} | {r['p99_conns']:.2f} | {r['import_s']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
