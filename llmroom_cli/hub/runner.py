"""Running the hub: Config (what the operator chose) and Server (aiohttp in an event loop thread).

`start_hub()` runs one in a background thread and returns once it listens (tests bind port 0);
`serve()` runs one in the foreground for `llmroom serve` until SIGINT, SIGTERM or SIGHUP. Stopping
closes the listener, sends 1001 "Hub shutting down." to every tunnel, ends event streams, and cuts
whatever is still in flight. Protocol errors (a malformed request line or header) are answered with
the hub's JSON error body and `Connection: close`, like every other refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

from llmroom_cli.errors import LlmroomError
from llmroom_cli.hub import routes_v01, routes_v1, tunnel
from llmroom_cli.hub.context import Context
from llmroom_cli.hub.limits import Limits
from llmroom_cli.hub.state import HubState, Refused, dumps
from llmroom_cli.hub.wire import CORS_V01, CORS_V06, JSON_TYPE, BadRequest, error_v01

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ListenError(LlmroomError):
    """`llmroom serve` cannot listen on this host and port (bad address, no permission ...)."""


class PortInUse(ListenError):
    """Another process already listens on this port."""


@dataclass
class Config:
    """What the operator chose (`llmroom serve` options), plus the limits."""

    host: str = "127.0.0.1"
    port: int = 0
    participant_timeout_s: float = 30.0
    quiet: bool = True
    log: Callable[[str], None] | None = None
    limits: Limits = field(default_factory=Limits)


class _JsonErrors(web.RequestHandler):
    """aiohttp's connection handler with the hub's own answer to protocol errors (JSON, then close)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started already")
        text = "Internal server error" if status == 500 else "Bad request"
        if status == 400 and message and "Got more than" in message:
            status, text = 431, "Request headers too large"
        elif status == 501 or (message and "encoding" in message.lower() and status == 400):
            status, text = 501, "Unsupported transfer encoding"
        resp = web.Response(status=status, body=dumps({"error": text}).encode())
        resp.headers["Content-Type"] = JSON_TYPE
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Connection"] = "close"
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


def _segments(raw_path: str) -> list[str]:
    raw = raw_path.split("?", 1)[0]
    if raw.startswith(("http://", "https://")):
        raw = urlsplit(raw).path or "/"
    parts = raw.split("/")[1:]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing slash is forgiven
    return [unquote(s, errors="replace") if "%" in s else s for s in parts]


def _printable(path: str) -> str:
    if path.isascii() and path.isprintable():
        return path
    return "".join(c if c.isascii() and c.isprintable() else f"%{ord(c):02X}" for c in path)


def _cross_origin_write(request: web.BaseRequest, segs: list[str]) -> bool:
    """A browser page from another origin asking to change the hub (README: cross-origin decision)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not a browser: CLIs and agents send no Origin
    with contextlib.suppress(ValueError):
        if urlsplit(origin).netloc == request.host:
            return False  # same origin
    return segs[:1] == ["v1"] or routes_v01.shape(segs) not in routes_v01.CROSS_ORIGIN_WRITES


class Server:
    """One hub: an aiohttp low-level server on a socket, serving `Config`, in its own event loop."""

    def __init__(self, config: Config, state: HubState, sock: socket.socket, test_hooks: Any = None) -> None:
        self.config = config
        self.state = state
        self.sock = sock
        self.hooks = test_hooks
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ctx: Context | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._log = config.log or _stderr_line

    # -- in the loop ------------------------------------------------------------------------------------

    async def start(self) -> None:
        limits = self.config.limits
        self.loop = asyncio.get_running_loop()
        self.ctx = Context(
            self.state, limits, self.config.participant_timeout_s, port=self.sock.getsockname()[1]
        )
        self.ctx.keepalive_s = limits.sse_keepalive_s
        handler: Handler = self.handle
        if self.hooks is not None:
            handler = self.hooks.wrap(handler, self)
        server = _Server(
            handler,
            handler_cancellation=True,  # a client that leaves cancels its request: streams are freed
            keepalive_timeout=limits.idle_timeout_s,
            max_field_size=limits.max_header_field_bytes,
            max_line_size=limits.max_header_field_bytes,
            lingering_time=2.0,
            access_log=None,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.SockSite(self._runner, self.sock)
        await self._site.start()
        sweep_s = max(0.01, min(10.0, self.config.participant_timeout_s / 2))
        self._tasks = [
            asyncio.ensure_future(self._sweep(sweep_s)),
            asyncio.ensure_future(tunnel.watch_liveness(self.ctx)),
        ]

    async def _sweep(self, every_s: float) -> None:
        while self.ctx is not None and not self.ctx.stopping:
            await asyncio.sleep(every_s)
            self.state.sweep(self.config.participant_timeout_s)

    async def shutdown(self) -> None:
        ctx = self.ctx
        assert ctx is not None and self._runner is not None
        ctx.stopping = True
        if self.hooks is not None:
            self.hooks.stopping()
        if self._site is not None:
            await self._site.stop()
        for t in list(ctx.tunnels):
            await t.close(*tunnel.SHUTDOWN)
        self.state.end_all_streams()
        for wake in list(ctx.streams):
            wake.set()
        for _ in range(3):
            await asyncio.sleep(0)  # let event streams write their last chunk
        server = self._runner.server
        if server is not None:
            for conn in list(server.connections):
                conn.force_close()
        for task in self._tasks:
            task.cancel()
        await self._runner.cleanup()
        if ctx.upstream is not None:
            await ctx.upstream.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        resp = await self._route(request)
        if not resp.prepared:
            if resp.status in (408, 413):
                resp.force_close()  # the rest of the body is not read: the connection is not reused
            if not request.keep_alive or resp.keep_alive is False:
                resp.headers["Connection"] = "close"  # said for HTTP/1.0 too, as the old hub did
        if not self.config.quiet:
            ms = (time.perf_counter() - started) * 1000
            self.log(
                f"{request.method} {_printable(request.raw_path.split('?', 1)[0])} {resp.status} {ms:.1f}ms"
            )
        return resp

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = self.ctx
        assert ctx is not None
        if request.version.major != 1:  # "HTTP/2.0" in a request line is not HTTP/2: refuse it
            resp = error_v01(400, "Bad request")
            resp.force_close()
            return resp
        segs = _segments(request.raw_path)
        v1 = segs[:1] == ["v1"]
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=CORS_V06 if v1 else CORS_V01)
        try:
            if _cross_origin_write(request, segs):
                return error_v01(403, "Cross-origin requests may not change the hub")
            if v1:
                return await routes_v1.dispatch(ctx, request, segs)
            return await routes_v01.dispatch(ctx, request, segs)
        except (BadRequest, Refused) as exc:
            return error_v01(exc.status, exc.message)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: answer like a server, keep the hub up, say it in the log
            self.log(f"internal error on {request.method} {_printable(request.path)}: {exc!r}")
            resp = error_v01(500, "Internal server error")
            resp.force_close()
            return resp

    def log(self, line: str) -> None:
        with contextlib.suppress(Exception):
            self._log(f"{time.strftime('%H:%M:%S')} {line}")


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc}", "check --host") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "nt":  # SO_REUSEADDR on Windows lets another process steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:  # restart on the same port at once, whatever is left in TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is already in use on {host}", "pick another with --port") from None
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", "check --host and --port"
        ) from None
    return sock


class RunningHub:
    """A hub serving in a background thread; `stop()` (or leaving the `with` block) shuts it down."""

    def __init__(self, server: Server) -> None:
        self._server = server
        addr = server.sock.getsockname()
        self.host: str = addr[0]
        self.port: int = addr[1]
        self.url = (
            f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"
        )
        self.state = server.state
        self.participant_timeout_s = server.config.participant_timeout_s
        self.quiet = server.config.quiet
        self._stopped = False
        self._lock = threading.Lock()
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failed.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="llmroom-hub", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    @property
    def keepalive_s(self) -> float:
        """How often an idle event stream sends `: keepalive` (finds dead clients, keeps proxies open)."""
        assert self._server.ctx is not None
        return self._server.ctx.keepalive_s

    @keepalive_s.setter
    def keepalive_s(self, value: float) -> None:
        assert self._server.ctx is not None
        self._server.ctx.keepalive_s = value

    @property
    def limits(self) -> Limits:
        return self._server.config.limits

    # -- test hooks (present only with start_hub(test_hooks=True)) -------------------------------------

    def _hooks(self) -> Any:
        if self._server.hooks is None:
            raise AttributeError("this hub has no test hooks: start it with start_hub(test_hooks=True)")
        return self._server.hooks

    @property
    def fault(self) -> str | None:
        """None, "freeze", "500", "html" or "slow:<seconds>": how every request is answered (tests)."""
        value: str | None = self._hooks().fault
        return value

    @fault.setter
    def fault(self, value: str | None) -> None:
        self._hooks().set_fault(value)

    def frozen_requests(self) -> int:
        """How many requests are held by the "freeze" fault right now (tests)."""
        count: int = self._hooks().frozen
        return count

    def requests_seen(self) -> int:
        """How many requests this hub has received since it started (tests)."""
        count: int = self._hooks().seen
        return count

    # -- lifecycle ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Close the listener, tunnels (1001), event streams and every connection; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        loop = self._server.loop
        if loop is not None and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._server.shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._server.sock.close()

    def __enter__(self) -> RunningHub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_hub(
    host: str = "127.0.0.1",
    port: int = 0,
    participant_timeout_s: float = 30.0,
    quiet: bool = True,
    state: HubState | None = None,
    log: Callable[[str], None] | None = None,
    *,
    limits: Limits | None = None,
    test_hooks: bool = False,
) -> RunningHub:
    """Start a hub in a background thread and return once it listens (port 0 picks a free port).

    Pass the `state` of a stopped hub to bring it back with its rooms; omit it for a restarted hub.
    `test_hooks=True` installs the fault injection tests use (`hub.fault`, `frozen_requests()`,
    `requests_seen()`); it wraps the request handler and is never part of `llmroom serve`.
    """
    chosen = limits or Limits()
    config = Config(host, port, participant_timeout_s, quiet, log, chosen)
    sock = _listen(host, port)
    if state is None:
        state = HubState(chosen.max_rooms, chosen.max_participants_per_room)
    hooks = None
    if test_hooks:
        from llmroom_cli.hub.testing import TestHooks

        hooks = TestHooks()
    try:
        return RunningHub(Server(config, state, sock, hooks))
    except BaseException:
        sock.close()
        raise


def serve(
    host: str,
    port: int,
    participant_timeout_s: float,
    quiet: bool,
    on_ready: Callable[[RunningHub], Callable[[], None] | None] | None = None,
    limits: Limits | None = None,
) -> int:
    """Run a hub in the foreground until SIGINT, SIGTERM or SIGHUP; returns the exit code (0).

    `on_ready(hub)` runs once the hub listens (`serve --mdns` announces it there) and may return a
    cleanup, which runs before the hub stops."""
    hub = start_hub(host, port, participant_timeout_s, quiet, limits=limits)
    cleanup: Callable[[], None] | None = None
    done = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        # SIGHUP (a closed terminal) stops it cleanly too, where the platform has it.
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
            previous[sig] = signal.signal(sig, handle)
    try:
        _stderr_line(f"llmroom hub listening on {hub.url} (Ctrl-C to stop)")
        if on_ready is not None:
            cleanup = on_ready(hub)
        while not done.wait(0.5):
            pass
    finally:
        if cleanup is not None:
            cleanup()
        hub.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0
