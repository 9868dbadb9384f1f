"""`python -m llmroom_cli`: the same as the `llmroom` command."""

from llmroom_cli.cli import main

main()
