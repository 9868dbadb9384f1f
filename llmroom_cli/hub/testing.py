"""Test hooks: fault injection and request counting, installed only by `start_hub(test_hooks=True)`.

The product's request path has no fault branch: these hooks wrap the request handler of a hub that a
test starts, the way a test double wraps a dependency. Faults: None (normal), "freeze" (hold every
request until the fault changes or the hub stops; then the connection is cut), "500" (`{"error":
"boom"}`), "html" (a 200 HTML page, as a captive portal answers), "slow:<seconds>" (a delay first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
HTML_PAGE = b"<html><body><h1>It works!</h1></body></html>"


class TestHooks:
    """What tests read and set on a RunningHub (`fault`, `frozen_requests()`, `requests_seen()`)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.fault: str | None = None
        self.frozen = 0
        self.seen = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = False

    def set_fault(self, value: str | None) -> None:
        self.fault = value
        if self._loop is not None and self._changed is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._changed.set)

    def stopping(self) -> None:
        self._stopping = True
        if self._changed is not None:
            self._changed.set()

    def wrap(self, handler: Handler, server: Any) -> Handler:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

        async def hooked(request: web.BaseRequest) -> web.StreamResponse:
            self.seen += 1
            if self.fault == "freeze":
                self.frozen += 1
                try:
                    while self.fault == "freeze" and not self._stopping:
                        assert self._changed is not None
                        self._changed.clear()
                        await self._changed.wait()
                finally:
                    self.frozen -= 1
                if self._stopping:
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("the hub stopped while the request was frozen")
            fault = self.fault
            if fault is not None and fault.startswith("slow:"):
                try:
                    delay = float(fault[5:])
                except ValueError:
                    delay = 0.0
                await asyncio.sleep(max(0.0, delay))
                fault = self.fault
            if fault == "500":
                await request.read()
                resp = web.Response(status=500, body=b'{"error":"boom"}')
                resp.headers["Content-Type"] = "application/json;charset=utf-8"
                return resp
            if fault == "html":
                await request.read()
                return web.Response(status=200, body=HTML_PAGE, content_type="text/html")
            return await handler(request)

        return hooked
