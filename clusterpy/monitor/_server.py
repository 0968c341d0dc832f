"""The monitor's HTTP shell (aiohttp): routes, the access guard, the live event stream.

::

    browser --GET /?token=T--> page (sets the cookie, carries T for POSTs)
            --GET /static/...--> monitor.js, monitor.css (shipped in the package)
            --GET /api/events--> text/event-stream: one snapshot per interval   (push)
            --GET /api/snapshot--> the same snapshot once, for scripts
            --POST /api/cancel {"job": key}, POST /api/stop-node {"node": name}  (X-Clusterpy-Token)

Every request first passes :class:`~clusterpy.monitor._guard.Guard` (Host, token, origin); the
routes fix the methods, so a GET on an action is answered 405. The server runs in the event
loop of what it shows and reads it through a :class:`~clusterpy.monitor._sources.MonitorSource`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from importlib import resources
from typing import Awaitable, Callable, Iterable

from aiohttp import web

from ._guard import COOKIE_PREFIX, Guard, allowed_hosts_for
from ._sources import MonitorSource

__all__ = ["MonitorServer"]

log = logging.getLogger("clusterpy.monitor")

_ASSETS = {"monitor.js": "text/javascript", "monitor.css": "text/css"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MAX_BODY = 4096  # an action's JSON body is a few dozen bytes


class MonitorServer:
    """Serve the monitor of ``source`` on ``http://host:port/``.

    Args:
        source: what to show (:class:`ClusterSource` or :class:`SchedulerSource`).
        host: address to bind (default loopback only). Binding elsewhere exposes the page to
            the network: anyone with the URL (its token) can see the jobs and cancel them.
        port: TCP port (0: a free one, see :attr:`port` after :meth:`start`).
        token: the access token (default: a fresh ``secrets.token_urlsafe(24)``).
        interval: seconds between pushed snapshots.
        allowed_hosts: extra Host header values to accept (a reverse proxy's name).
        max_streams: concurrent live pages at most (each holds one connection).

    ``start()`` binds (raises OSError if it cannot); ``aclose()`` ends the live streams and
    closes every connection; both run in the source's event loop.
    """

    def __init__(self, source: MonitorSource, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 interval: float = 1.0, allowed_hosts: Iterable[str] = (), max_streams: int = 32) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(24)
        self.interval = interval
        self.max_streams = max_streams
        self._extra_hosts = tuple(allowed_hosts)
        self.guard: Guard | None = None
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._streams = 0
        self._cache: tuple[float, bytes] | None = None
        self._assets = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _ASSETS}
        self._page = (resources.files(__package__) / "static" / "index.html").read_text("utf-8")

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard_middleware], client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/cancel", self._cancel)
        app.router.add_post("/api/stop-node", self._stop_node)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        server = getattr(site, "_server", None)
        if self.port == 0 and server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self.guard = Guard(self.token, allowed_hosts_for(self.host, self.port, self._extra_hosts))

    async def aclose(self) -> None:
        """End the live streams, close the listener and every connection. Idempotent."""
        self._closing.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def url(self) -> str:
        """The address to open, token included."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/?token={self.token}"

    @property
    def cookie_name(self) -> str:
        # Cookies do not separate ports: name it after the port, so two monitors on one host
        # do not overwrite each other's.
        return f"{COOKIE_PREFIX}{self.port}"

    # ---------------------------------------------------------------- guard

    @web.middleware
    async def _guard_middleware(self, request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        assert self.guard is not None
        auth = request.headers.get("Authorization", "")
        header_token = request.headers.get("X-Clusterpy-Token") or (auth[7:] if auth.startswith("Bearer ") else None)
        refusal = self.guard.check(method=request.method, host=request.headers.get("Host"),
                                   origin=request.headers.get("Origin"), query_token=request.query.get("token"),
                                   header_token=header_token, cookie_token=request.cookies.get(self.cookie_name))
        if refusal is not None:
            log.info("refused %s %s from %s: %s", request.method, request.path, request.remote, refusal.reason)
            return web.json_response({"error": refusal.reason}, status=refusal.status, headers=_HEADERS)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(_HEADERS)
            raise
        if not response.prepared:
            response.headers.update(_HEADERS)
        return response

    # ---------------------------------------------------------------- reading

    def _snapshot_bytes(self, fresh: bool = False) -> bytes:
        """The current snapshot as JSON; live pages share one taken within half an interval."""
        now = time.monotonic()
        if not fresh and self._cache is not None and now - self._cache[0] < self.interval / 2:
            return self._cache[1]
        data = json.dumps(self.source.snapshot(), separators=(",", ":"), default=str).encode()
        self._cache = (now, data)
        return data

    async def _index(self, request: web.Request) -> web.Response:
        page = self._page.replace("{{TOKEN}}", self.token).replace("{{INTERVAL}}", str(self.interval))
        response = web.Response(text=page, content_type="text/html")
        response.set_cookie(self.cookie_name, self.token, httponly=True, samesite="Strict", path="/")
        return response

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=self._assets[name], content_type=_ASSETS[name])

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.Response(body=self._snapshot_bytes(fresh=True), content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: a ``snapshot`` event now and every interval until either side closes."""
        if self._streams >= self.max_streams:
            raise web.HTTPServiceUnavailable(text="too many live pages are open")
        response = web.StreamResponse(headers={**_HEADERS, "Content-Type": "text/event-stream",
                                               "X-Accel-Buffering": "no"})
        self._streams += 1
        try:
            await response.prepare(request)
            await response.write(f"retry: {int(self.interval * 2000)}\n\n".encode())
            while not self._closing.is_set():
                await response.write(b"event: snapshot\ndata: " + self._snapshot_bytes() + b"\n\n")
                try:
                    await asyncio.wait_for(self._closing.wait(), self.interval)
                except TimeoutError:
                    pass
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self._streams -= 1
        return response

    # ---------------------------------------------------------------- actions (POST only)

    async def _body(self, request: web.Request, field: str) -> str:
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="send JSON (Content-Type: application/json)")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        value = body.get(field) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise web.HTTPBadRequest(text=f"the body needs a string {field!r}")
        return value

    async def _cancel(self, request: web.Request) -> web.Response:
        key = await self._body(request, "job")
        ok = self.source.cancel(key)
        self._cache = None
        return web.json_response({"ok": ok, "job": key}, status=200 if ok else 404)

    async def _stop_node(self, request: web.Request) -> web.Response:
        name = await self._body(request, "node")
        ok = self.source.stop_node(name)
        self._cache = None
        return web.json_response({"ok": ok, "node": name}, status=200 if ok else 404)
