"""The gRPC edge's transport security and authentication: TLS / mutual TLS credentials, bearer-token auth, and
who may make model-control calls (:data:`ADMIN_METHODS`).

See docs/security.md for the threat model and the table of who may call what. Reading the files blocks (start-up
only); the checks run on the event loop (in the daemon's one interceptor) and never block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc

from server.edges.common.auth import AdminRule, TokenChecker, is_loopback, read_file
from server.edges.grpc.drain import answers_of

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Health checks need no token: load balancers and orchestrators probe without one."""
ADMIN_METHODS = frozenset({"/classifier.v1.Classifier/ReloadModel", "/classifier.v1.Classifier/LoadModel",
                           "/classifier.v1.Classifier/UnloadModel",
                           "/classifier.v1.Classifier/PromoteVersion", "/classifier.v1.Classifier/RejectVersion",
                           "/classifier.v1.Classifier/RollbackModel",
                           "/inference.GRPCInferenceService/RepositoryModelLoad",
                           "/inference.GRPCInferenceService/RepositoryModelUnload"})
"""Model-control calls: they change what the daemon serves and cost seconds of the shared inference thread, so only
operators may make them (:class:`AdminCheck`). Every model-control method is listed here, and only here."""
Refusal = tuple[grpc.StatusCode, str]


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate it signed (mTLS).

    Blocks on file reads. Raises SecurityConfigError.
    """
    pair = (read_file(key, "TLS key"), read_file(cert, "TLS certificate"))
    root = read_file(client_ca, "client CA certificate") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


class TokenCheck:
    """Requires ``authorization: Bearer <token>`` on every call except health checks → UNAUTHENTICATED. A check of
    the daemon's one interceptor (:mod:`server.edges.grpc.calls`)."""

    def __init__(self, tokens: Sequence[str], exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        self._checker = TokenChecker(tokens)
        self._exempt = tuple(exempt_prefixes)

    def checked(self, handler: grpc.RpcMethodHandler | None,
                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """``handler`` itself when the call may go on, else a handler of the same kind made for this call that
        ends it UNAUTHENTICATED with what is wrong with its token. Never blocks."""
        if handler is None or details.method.startswith(self._exempt):
            return handler
        problem = self._checker.problem(_authorization(details))
        return handler if problem is None else _checked(handler, lambda _: (grpc.StatusCode.UNAUTHENTICATED, problem))


class AdminCheck:
    """The model-control rule (:class:`server.edges.common.auth.AdminRule`) for the calls of :data:`ADMIN_METHODS`.
    Client tokens, when configured, are checked by :class:`TokenCheck` as for every call. A check of the daemon's
    one interceptor (:mod:`server.edges.grpc.calls`)."""

    def __init__(self, admin_tokens: Sequence[str] = (), client_tokens: Sequence[str] = (), *,
                 allow_remote: bool = False, methods: frozenset[str] = ADMIN_METHODS) -> None:
        self._rule = AdminRule(admin_tokens, client_tokens, allow_remote=allow_remote)
        self._methods = methods

    def checked(self, handler: grpc.RpcMethodHandler | None,
                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """``handler`` itself for a call that is not model control, else a handler made for this call that applies
        the rule (it needs the peer, which only the call's context has). Never blocks."""
        method = details.method
        if handler is None or method not in self._methods:
            return handler
        authorization = _authorization(details)

        def refusal(context: grpc.aio.ServicerContext) -> Refusal | None:
            peer = context.peer() if self._rule.needs_peer else ""
            refused = self._rule.refusal(method, authorization, lambda: is_local_peer(peer), peer)
            return None if refused is None else (grpc.StatusCode[refused[0].name], refused[1])

        return _checked(handler, refusal)


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``context.peer()``: ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, possibly
    percent-encoded, ``unix:/run/x.sock``) is this machine: a loopback address or a Unix socket."""
    kind, _, address = unquote(peer).partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    return is_loopback(address.rpartition(":")[0])


def _authorization(details: grpc.HandlerCallDetails) -> str | bytes | None:
    values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
    return values[0] if values else None


def _checked(handler: grpc.RpcMethodHandler,
             refusal: Callable[[grpc.aio.ServicerContext], Refusal | None]) -> grpc.RpcMethodHandler:
    """``handler``, of the same kind, ending each call with ``refusal(context)``'s status when it gives one."""
    inner = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream

    async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if (refused := refusal(context)) is not None:
            await context.abort(*refused)
        return await inner(request, context)

    async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if (refused := refusal(context)) is not None:
            await context.abort(*refused)
        async for answer in answers_of(inner(request, context)):
            yield answer

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(single, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streamed, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(single, **codecs)
    return grpc.stream_stream_rpc_method_handler(streamed, **codecs)
