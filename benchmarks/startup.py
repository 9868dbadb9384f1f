"""Start-up time of `llmroom --help`, `--version` and `specs --json` next to `python -c pass`.

Run alone: python benchmarks/startup.py [runs]
"""

from __future__ import annotations

import sys

from _common import PY, row, time_cmd


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    base = time_cmd([PY, "-c", "pass"], runs)
    print(f"median of {runs} runs each, stdout not a terminal; baseline measured in the same run")
    row(
        "llmroom --help",
        time_cmd([PY, "-m", "llmroom_cli", "--help"], runs),
        "s",
        "python -c pass",
        base,
        "<= 0.15 s and <= 8x",
    )
    row(
        "llmroom --version",
        time_cmd([PY, "-m", "llmroom_cli", "--version"], runs),
        "s",
        "python -c pass",
        base,
        "<= 0.15 s and <= 8x",
    )
    row(
        "llmroom specs --json",
        time_cmd([PY, "-m", "llmroom_cli", "specs", "--json"], runs),
        "s",
        "python -c pass",
        base,
        "<= 0.35 s",
    )
    row("import httpx (reference)", time_cmd([PY, "-c", "import httpx"], runs), "s", "python -c pass", base)


if __name__ == "__main__":
    main()
