"""TLS and bearer tokens for the HTTP listener (``--http-port``), matching the gRPC port's (docs/security.md).

Without these, ``--auth-token-file`` or ``--tls-client-ca`` on gRPC would leave the HTTP port as a way around
them. Reading certificate files blocks (start-up only); the middleware never blocks.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from server.edges.common.auth import SecurityConfigError, TokenChecker

HTTP_EXEMPT_PREFIXES = ("/v2/health/", "/static/")
"""Liveness/readiness probes and the status page's static files need no token (the page's data does)."""


def token_middleware(checker: TokenChecker) -> Middleware:
    """An aiohttp middleware answering 401 (code UNAUTHENTICATED) without a valid ``Authorization: Bearer``."""

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/" and not request.path.startswith(HTTP_EXEMPT_PREFIXES):
            problem = checker.problem(request.headers.get("Authorization"))
            if problem is not None:
                raise web.HTTPUnauthorized(text=problem.replace("metadata", "header"))
        return await handler(request)

    return require_token


def http_ssl_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server-side TLS context from the gRPC port's PEM files; with ``client_ca``, client certificates required.

    Blocks on file reads. Raises SecurityConfigError.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"cannot use TLS files {cert}, {key}, {client_ca}: {exc}") from None
    return context
