"""How each hub generation is spoken: `generation` tells them apart, `v06` speaks the /v1 API + tunnel.

The v0.1 routes live in `llmroom_cli.client` (HubClient) and `llmroom_cli.session`. Nothing here is
imported by `llmroom --help`: each module imports its heavy libraries (httpx, websockets) itself.
"""
