"""Transport security and authentication: TLS / mutual TLS credentials and bearer-token auth.

See docs/security.md for the threat model. Reading the files blocks (start-up
only); the interceptor runs on the event loop and never blocks.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Health checks need no token: load balancers and orchestrators probe without one."""


class SecurityConfigError(ValueError):
    """A certificate, key or token file is missing, unreadable or empty."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """Raise SecurityConfigError unless the TLS options make sense together (no file is read)."""
    if (cert is None) != (key is None):
        raise SecurityConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    if client_ca is not None and cert is None:
        raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate it signed (mTLS).

    Blocks on file reads. Raises SecurityConfigError.
    """
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    root = _read(client_ca, "client CA certificate") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def read_tokens(path: Path) -> list[str]:
    """The accepted bearer tokens: one per non-empty line (several allow rotation). Raises SecurityConfigError."""
    try:
        text = _read(path, "token file").decode("utf-8")
    except UnicodeDecodeError:
        raise SecurityConfigError(f"token file {path} is not UTF-8") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip()]
    if any(not t.isascii() or not t.isprintable() or " " in t for t in tokens):
        raise SecurityConfigError(f"token file {path}: tokens must be printable ASCII without spaces")
    return tokens


class TokenChecker:
    """Decides whether an ``authorization`` value carries one of the accepted bearer tokens. Never blocks."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise SecurityConfigError("token auth needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    def problem(self, authorization: str | bytes | None) -> str | None:
        """Why a call with this ``authorization`` value is refused, or None when its token is valid."""
        if authorization is None:
            return "missing bearer token: send the metadata 'authorization: Bearer <token>'"
        value = authorization if isinstance(authorization, str) else authorization.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        presented = token.strip().encode("utf-8", "replace")
        # Compare with every token, in constant time, so timing says nothing about which one nearly matched.
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return None if matched else "invalid bearer token"


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
