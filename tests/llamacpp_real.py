"""A real llama.cpp server for the suite: a tiny random-weight GGUF and llama.cpp's own server code.

Models cannot be downloaded here, so `make_tiny_gguf` writes one with the `gguf` package (from the
llama.cpp project): llama architecture, 2 layers, dim 64, a 300-token SentencePiece-style vocabulary
(the three control tokens, the 256 byte-fallback tokens and a few word pieces, so any text
tokenizes), a ChatML chat template, weights in Q8_0 (about 150 KB; it answers gibberish, fast).

`LlamaServer` runs the server from the `xllamacpp` wheel (llama.cpp's server.cpp compiled as a Python
extension; `xllamacpp.Server(CommonParams)` starts its HTTP server on a thread) in a subprocess, so a
test can kill it with a real signal and start it again on the same port:

    with LlamaServer(model_path, api_key="k") as server:   # port 0: llama.cpp picks one
        server.url                                          # http://127.0.0.1:PORT
        server.kill(); server.start()                       # same port again

Run as `python -m tests.llamacpp_real MODEL PORT [--api-key K] [--sleep-idle-seconds N]`: prints one
line `listening http://HOST:PORT` when the server answers, then serves until killed.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
N_VOCAB = 300
DIM = 64
N_LAYERS = 2
N_HEADS = 4
N_FF = 128
N_CTX_TRAIN = 512
MODEL_NAME = "tiny-random-llama"
START_S = 60.0  # a hang guard for the server's start, not a speed assertion


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece ("llama") vocab: <unk> <s> </s>, byte fallback <0x00>..<0xFF>, then word pieces."""
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    for i in range(256):
        tokens.append(f"<0x{i:02X}>".encode())
        types.append(6)  # BYTE
    pieces = ["\u2581"] + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("etaoinshr")
    pieces += ["\u2581the", "\u2581hello", "\u2581world", "er", "in"]
    for piece in pieces:
        if len(tokens) >= N_VOCAB:
            break
        tokens.append(piece.encode())
        types.append(1)  # NORMAL
    while len(tokens) < N_VOCAB:
        tokens.append(f"\u2581w{len(tokens)}".encode())
        types.append(1)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def make_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny random llama model to `path` (Q8_0 matrices, F32 norms) and return it."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(DIM)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_rope_dimension_count(DIM // N_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(N_VOCAB)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(DIM, dtype=np.float32))

    matrix("token_embd.weight", N_VOCAB, DIM)
    norm("output_norm.weight")
    matrix("output.weight", N_VOCAB, DIM)
    for i in range(N_LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("q", "k", "v", "output"):
            matrix(f"blk.{i}.attn_{part}.weight", DIM, DIM)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", N_FF, DIM)
        matrix(f"blk.{i}.ffn_up.weight", N_FF, DIM)
        matrix(f"blk.{i}.ffn_down.weight", DIM, N_FF)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def xllamacpp_missing() -> str | None:
    """Why the real server cannot run here (the reason a test skips with), or None."""
    try:
        import gguf  # noqa: F401
        import xllamacpp  # noqa: F401
    except ImportError as exc:
        return f"the xllamacpp/gguf wheels are not installed ({exc}): pip install -e '.[dev]'"
    return None


class LlamaServer:
    """llama.cpp's server (xllamacpp) in a subprocess on 127.0.0.1; `start()` waits until it answers."""

    def __init__(
        self,
        model: Path,
        port: int = 0,
        api_key: str | None = None,
        sleep_idle_s: int | None = None,
        n_ctx: int = 256,
    ) -> None:
        self.model = model
        self.port = port
        self.api_key = api_key
        self.sleep_idle_s = sleep_idle_s
        self.n_ctx = n_ctx
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        cmd = [sys.executable, "-m", "tests.llamacpp_real", str(self.model), str(self.port)]
        cmd += ["--n-ctx", str(self.n_ctx)]
        if self.api_key:
            cmd += ["--api-key-env", "LLAMA_TEST_API_KEY"]  # not on the command line: ps shows it
        if self.sleep_idle_s is not None:
            cmd += ["--sleep-idle-seconds", str(self.sleep_idle_s)]
        env = dict(os.environ)
        if self.api_key:
            env["LLAMA_TEST_API_KEY"] = self.api_key
        root = Path(__file__).resolve().parent.parent
        # llama.cpp logs a lot: to a file, whose tail explains a failed start.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_S
        ready, _, _ = select.select([self.proc.stdout], [], [], START_S)
        line = self.proc.stdout.readline() if ready else ""
        match = re.match(r"listening http://[^:]+:(\d+)", line)
        if not match:
            tail = self.log_tail()
            self.kill()
            raise RuntimeError(f"llama.cpp server did not start: {line!r}; log: {tail!r}")
        self.port = int(match.group(1))
        with httpx.Client(trust_env=False, timeout=2.0) as http:
            while time.monotonic() < deadline:
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        tail = self.log_tail()
        self.kill()
        raise RuntimeError(f"llama.cpp server never became healthy; log: {tail!r}")

    def log_tail(self, size: int = 2000) -> str:
        """The end of the server's log (stderr) so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-size:]

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye on open connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
        self.proc = None
        self._log = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("port", type=int)
    parser.add_argument("--api-key-env")
    parser.add_argument("--sleep-idle-seconds", type=int)
    parser.add_argument("--n-ctx", type=int, default=256)
    args = parser.parse_args(argv)
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = 2
    params.n_predict = 16
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.endpoint_props = True
    params.warmup = False
    if args.api_key_env:
        params.api_keys = [os.environ[args.api_key_env]]
    if args.sleep_idle_seconds is not None:
        params.sleep_idle_seconds = args.sleep_idle_seconds
    server = xllamacpp.Server(params)
    print(f"listening {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _serve(sys.argv[1:])
