"""`llmroom list CODE` against a room of 10,000 participants: `--json`, the piped table, and a terminal.

Run alone: python benchmarks/list_big.py [--quick] [--participants 10000]

The hub runs in this process (`start_hub(port=0)`); the room is filled through `hub.state.join_v01` with
join bodies shaped like the CLI's (specs with GPU, VRAM, RAM and the LLM, a generation config), so the
body is about 5 MB, as it would be. Every figure is the median wall time of a subprocess, stdout on a
pipe, next to the baseline measured in the same run: a `python -c` that GETs
/rooms/CODE/participants with `http.client` and writes the raw body to stdout (what `curl` does).
A terminal (rich table, through a pty) is measured too, for information: the target names the piped
table.
"""

from __future__ import annotations

import argparse
import os
import pty
import subprocess
import sys
import threading
import time

from _common import PY, ROOT, env, median, row

RAW_GET = (
    "import http.client, sys\n"
    "c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[1]), timeout=30)\n"
    "c.request('GET', f'/rooms/{sys.argv[2]}/participants')\n"
    "r = c.getresponse(); sys.stdout.buffer.write(r.read()); assert r.status == 200\n"
)


def body(i: int) -> dict[str, object]:
    return {
        "id": f"p-{i:05d}-5f0c2a8e-4d7e-4a63-9c0e",
        "nickname": f"user{i}@host-{i % 97}",
        "model": ("llama3.1:8b-instruct-q4_K_M", "qwen2.5:14b", "mistral-nemo:12b")[i % 3],
        "endpoint": f"http://10.0.{i // 250}.{i % 250 + 1}:11434",
        "specs": {
            "cpu": "AMD Ryzen 9 7950X 16-Core Processor",
            "cpu_cores": 16,
            "ram": 64,
            "os": "Linux 6.8",
            "arch": "x86_64",
            "gpu": "NVIDIA GeForce RTX 4090",
            "vram": 24,
            "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram": 24, "driver": "550.54"}],
            "llm": {"server": "ollama", "version": "0.5.7", "context_length": 8192, "quantization": "Q4_K_M"},
        },
        "config": {"temperature": 0.7, "max_tokens": 1024},
    }


def timed(argv: list[str], runs: int, pipe: bool = True) -> tuple[float, int]:
    """Median wall time over `runs` (after one warm-up) and the byte count of the last stdout."""
    samples, size = [], 0
    for i in range(runs + 1):
        t = time.perf_counter()
        if pipe:
            out = subprocess.run(argv, capture_output=True, env=env(), cwd=ROOT, timeout=120)
            size = len(out.stdout)
            assert out.returncode == 0, out.stderr[-500:]
        else:
            size = _on_terminal(argv)
        if i:
            samples.append(time.perf_counter() - t)
    return median(samples), size


def _on_terminal(argv: list[str]) -> int:
    """Run with stdout on a pty (120 columns), draining it; returns the bytes written."""
    master, slave = pty.openpty()
    got = [0]

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            got[0] += len(chunk)

    e = dict(env(), COLUMNS="120", LINES="40", TERM="xterm-256color")
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, env=e, cwd=ROOT)
    os.close(slave)
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
    reader.join(10)
    os.close(master)
    return got[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7, no terminal run")
    parser.add_argument("--participants", type=int, default=10_000)
    args = parser.parse_args()
    runs = 3 if args.quick else 7
    sys.path.insert(0, ROOT)
    from llmroom_cli.hub import start_hub

    hub = start_hub(port=0)
    try:
        code = hub.state.create_room("big")["code"]
        for i in range(args.participants):
            hub.state.join_v01(code, body(i), "127.0.0.1", 30.0)
        print(f"# list_big: {args.participants} participants, median of {runs} runs, stdout on a pipe")
        base, raw = timed([PY, "-c", RAW_GET, str(hub.port), code], runs)
        cli = [PY, "-m", "llmroom_cli", "list", code, "--hub", hub.url]
        js, size = timed([*cli, "--json"], runs)
        row("llmroom list CODE --json", js, "s", "raw http.client GET", base, "<= 1 s")
        print(f"   (raw body {raw / 1e6:.1f} MB; --json output {size / 1e6:.1f} MB as printed)")
        table, size = timed(cli, runs)
        row("llmroom list CODE (piped table)", table, "s", "raw http.client GET", base, "<= 1 s")
        print(f"   (table {size / 1e6:.1f} MB, tab-separated)")
        if not args.quick:
            term, size = timed(cli, max(1, runs // 2), pipe=False)
            row("llmroom list CODE (terminal)", term, "s", "raw http.client GET", base, "info")
            print(f"   ({size / 1e6:.1f} MB to the terminal)")
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
