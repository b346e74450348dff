"""The gRPC edge's transport security and authentication: TLS / mutual TLS credentials and bearer-token auth.

See docs/security.md for the threat model. Reading the files blocks (start-up
only); the interceptor runs on the event loop and never blocks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from server.edges.common.auth import TokenChecker, read_file

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Health checks need no token: load balancers and orchestrators probe without one."""


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate it signed (mTLS).

    Blocks on file reads. Raises SecurityConfigError.
    """
    pair = (read_file(key, "TLS key"), read_file(cert, "TLS certificate"))
    root = read_file(client_ca, "client CA certificate") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks → UNAUTHENTICATED."""

    def __init__(self, tokens: Sequence[str], exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        self._checker = TokenChecker(tokens)
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._exempt):
            return handler
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        problem = self._checker.problem(values[0] if values else None)
        return handler if problem is None else _refusing(handler, problem)


def _refusing(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codecs)
