"""The HTTP server: every HTTP route in one aiohttp app, served on the daemon's own event loop.

It binds its listening sockets itself (:func:`listening_sockets`) so that a stop can pause accepting before the
sockets close: asyncio leaks a connection it accepted just before ``Server.close()`` (the transport is never made,
CPython gh-109564), and that connection's client would wait forever for an answer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from server.edges.common.auth import AdminRule
from server.edges.common.oip_repository import OipRepository
from server.edges.http.classify import CONTEXT, HttpContext, add_classify_routes, error_middleware, serving_middleware
from server.edges.http.oip import add_oip_routes
from server.edges.http.oip_repository import add_repository_routes
from server.edges.http.status_page import add_status_routes


def build_app(context: HttpContext, middlewares: Sequence[Middleware] = (), *,
              repository: OipRepository | None = None, admin: AdminRule | None = None) -> web.Application:
    """The app with every route; with ``repository``, the OIP model-repository extension, model configuration and
    statistics too, their load and unload calls under the operator rule ``admin`` (default: this machine only).

    ``middlewares`` run inside the error mapping and before any handler: the slot for request checks such as an
    auth token (raise ``web.HTTPUnauthorized`` and the client gets a JSON 401 with code UNAUTHENTICATED).
    """
    app = web.Application(middlewares=[error_middleware, serving_middleware, *middlewares],
                          client_max_size=context.max_body_bytes)
    app[CONTEXT] = context
    add_classify_routes(app.router)
    if repository is not None:
        add_repository_routes(app, repository, admin or AdminRule())
    add_oip_routes(app.router)
    add_status_routes(app.router)
    if context.status_share is not None:
        app.cleanup_ctx.append(context.status_share.background)
    return app


class HttpServer:
    """Serves an app on the running event loop: ``await start(host, port)``, ``await stop(grace)``."""

    def __init__(self, app: web.Application, *, ssl_context: ssl.SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        self.app = app
        self._ssl_context = ssl_context  # the TLS slot: HTTPS with the same certificate as gRPC's
        self._reuse_port = reuse_port  # --workers: every worker process listens on the same HTTP port
        self._runner: web.AppRunner | None = None
        self._sockets: list[socket.socket] = []

    async def start(self, host: str, port: int) -> int:
        """Bind and serve. Returns the bound port (``port`` 0 picks a free one). Raises OSError if it cannot bind."""
        sockets = await asyncio.to_thread(listening_sockets, host, port, self._reuse_port)  # resolving blocks
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, ssl_context=self._ssl_context).start()
        except OSError:
            await runner.cleanup()
            for sock in sockets:
                sock.close()
            raise
        self._runner, self._sockets = runner, sockets
        self.app[CONTEXT].serving = True
        return int(sockets[0].getsockname()[1])

    def loading(self, loading: bool) -> None:
        """While the daemon's initial load is under way ``/v2/health/ready`` says not ready; requests are still
        answered (a model not yet ready is UNAVAILABLE, "is loading")."""
        self.app[CONTEXT].loading = loading

    def draining(self) -> None:
        """The daemon begins to stop: ``/v2/health/ready`` says not ready; requests are still served."""
        self.app[CONTEXT].draining = True

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self.app[CONTEXT].in_flight

    async def stop_accepting(self) -> None:
        """New requests get 503 (UNAVAILABLE) and the listener closes; requests in flight carry on. A connection
        accepted in the moment before is served too (its request gets 503), never left unanswered."""
        self.app[CONTEXT].serving = False
        if self._runner is None or not self._sockets:
            return
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())  # accept no more; clients still in the backlog are reset on close
        self._sockets = []
        for _ in range(2):  # the connections accepted already get their transports (made one loop turn later)
            await asyncio.sleep(0)
        for site in self._runner.sites:
            await site.stop()

    async def close(self) -> None:
        """Close every connection (a request still in flight is cancelled: the client sees the connection close)
        and release the app. Call it once :attr:`in_flight` is 0 or the grace period is over."""
        await self.stop_accepting()
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await runner.cleanup()


def listening_sockets(host: str, port: int, reuse_port: bool = False, backlog: int = 128) -> list[socket.socket]:
    """Non-blocking listening TCP sockets on every address ``host`` resolves to, all on one port (``port`` 0: the
    first free one), as asyncio's ``create_server`` binds them. Blocks (name resolution). Raises OSError."""
    resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(resolved):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bound = sockets[0].getsockname()[1] if len(sockets) > 1 else port  # every address on one port
            sock.bind((address[0], bound, *address[2:]))
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
