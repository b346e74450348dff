"""The daemon's one server interceptor: the drain gate, who may call what, and the error mapping.

grpc.aio runs each server interceptor as a coroutine of its own for every call, and each wrapper an interceptor
puts around a handler adds a coroutine to every step of the call. Here the drain gate, the token check, the
model-control check and the error mapping are one interceptor: the checks are plain calls on the call's metadata
(:class:`~server.edges.grpc.security.TokenCheck`, :class:`~server.edges.grpc.security.AdminCheck`
``.checked``), and the drain gate's wrapper, made once per method, also maps errors to statuses
(:meth:`~server.edges.grpc.drain.DrainGate.wrap` with :func:`~server.edges.grpc.common.abort_for`). A call the
checks refuse, and a model-control call (its check needs the call's peer), gets a handler made for it alone, as
before. Measured against the separate interceptors: 1.5-3.2 µs less of the loop in a call's first step
(benchmarks/loop_work.py, docs/benchmarks.md). Runs on the event loop; never blocks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from server.edges.grpc.common import abort_for
from server.edges.grpc.drain import DrainGate
from server.edges.grpc.wrapped import WrappedHandlers


class Check(Protocol):
    """Who may make a call: the handler itself, or one made for this call that refuses it."""

    def checked(self, handler: grpc.RpcMethodHandler | None,
                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None: ...


class CallInterceptor(grpc.aio.ServerInterceptor):
    """``checks`` in order (the first refuses first), inside the drain ``gate``, with errors mapped to statuses."""

    def __init__(self, gate: DrainGate, checks: Sequence[Check] = ()) -> None:
        self._gate = gate
        self._checks = tuple(reversed(checks))  # applied inside out: the first check's wrapper runs first
        self._wrapped = WrappedHandlers(self._wrap)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        checked = handler
        for check in self._checks:
            checked = check.checked(checked, handler_call_details)
        method = handler_call_details.method
        if checked is handler:
            return self._wrapped.get(handler, method)  # the common case: the wrapper made for the method
        # a handler made for this call (a refusal, or a model-control call's check of the peer): not kept
        return self._wrap(checked, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return self._gate.wrap(handler, method, on_error=abort_for)
