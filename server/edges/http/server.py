"""The HTTP server: every HTTP route in one aiohttp app, served on the daemon's own event loop."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from server.edges.http.classify import CONTEXT, HttpContext, add_classify_routes, error_middleware, serving_middleware
from server.edges.http.oip import add_oip_routes
from server.edges.http.status_page import add_status_routes


def build_app(context: HttpContext, middlewares: Sequence[Middleware] = ()) -> web.Application:
    """The app with every route.

    ``middlewares`` run inside the error mapping and before any handler: the slot for request checks such as an
    auth token (raise ``web.HTTPUnauthorized`` and the client gets a JSON 401 with code UNAUTHENTICATED).
    """
    app = web.Application(middlewares=[error_middleware, serving_middleware, *middlewares],
                          client_max_size=context.max_body_bytes)
    app[CONTEXT] = context
    add_classify_routes(app.router)
    add_oip_routes(app.router)
    add_status_routes(app.router)
    return app


class HttpServer:
    """Serves an app on the running event loop: ``await start(host, port)``, ``await stop(grace)``."""

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        self.app = app
        self._ssl_context = ssl_context  # the TLS slot: HTTPS with the same certificate as gRPC's
        self._reuse_port = reuse_port  # --workers: every worker process listens on the same HTTP port
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve. Returns the bound port (``port`` 0 picks a free one). Raises OSError if it cannot bind."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=self._ssl_context, reuse_port=self._reuse_port or None
                              ).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.app[CONTEXT].serving = True
        return int(runner.addresses[0][1])

    async def stop(self, grace: float) -> None:
        """Stop accepting; requests in flight get up to ``grace`` seconds, new ones 503; then close everything."""
        context = self.app[CONTEXT]
        context.serving = False
        if self._runner is None:
            return
        for site in self._runner.sites:
            await site.stop()
        deadline = time.monotonic() + grace
        while context.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._runner.cleanup()
        self._runner = None
