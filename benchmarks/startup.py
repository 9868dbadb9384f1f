"""Start-up time of `llmroom --help`, `--version` and `specs --json` next to `python -c pass`.

Run alone: python benchmarks/startup.py [runs]

Twice: as this environment runs the checkout (PYTHONDONTWRITEBYTECODE=1, so llmroom_cli's own modules
are compiled from source on every start; site-packages have their .pyc from pip), and with bytecode
cached in a temporary PYTHONPYCACHEPREFIX, as an installed package runs.
"""

from __future__ import annotations

import sys
import tempfile

from _common import PY, cached_env, env, row, time_cmd


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    print(f"median of {runs} runs each, stdout not a terminal; baseline measured in the same run")
    with tempfile.TemporaryDirectory(prefix="llmroom-pycache-") as prefix:
        for label, e in (("as is", env()), ("bytecode cached", cached_env(prefix))):
            print(f"-- {label}")
            base = time_cmd([PY, "-c", "pass"], runs, environ=e)
            for args, target in (
                (["--help"], "<= 0.15 s and <= 8x"),
                (["--version"], "<= 0.15 s and <= 8x"),
                (["specs", "--json"], "<= 0.35 s"),
            ):
                took = time_cmd([PY, "-m", "llmroom_cli", *args], runs, environ=e)
                row(f"llmroom {' '.join(args)} ({label})", took, "s", "python -c pass", base, target)
            httpx = time_cmd([PY, "-c", "import httpx"], runs, environ=e)
            row(f"import httpx (reference, {label})", httpx, "s", "python -c pass", base)


if __name__ == "__main__":
    main()
