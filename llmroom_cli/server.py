"""Where the hub used to live: a re-export of `llmroom_cli.hub` (the aiohttp hub) for old imports."""

from llmroom_cli.hub import *  # noqa: F403
from llmroom_cli.hub import __all__  # noqa: F401
