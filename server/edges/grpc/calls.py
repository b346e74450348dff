"""The daemon's one server interceptor: the drain gate, who may call what, and the error mapping.

grpc.aio runs each server interceptor as a coroutine of its own for every call, and each wrapper an interceptor
puts around a handler adds a coroutine to every step of the call. With four of them (drain gate, tokens, model
control, error mapping) that was about 40-50 µs of the event loop per request, most of it in the wrappers
(benchmarks/loop_work.py, docs/benchmarks.md). Here they are one: the token and model-control checks are plain
calls on the call's metadata (:class:`~server.edges.grpc.security.AuthInterceptor`,
:class:`~server.edges.grpc.security.AdminInterceptor` ``.checked``), and the drain gate's wrapper, made once per
method, also maps errors to statuses (:meth:`~server.edges.grpc.drain.DrainGate.wrap` with
:func:`~server.edges.grpc.common.abort_for`). A call the checks refuse gets a handler made for it alone, as
before. Runs on the event loop; never blocks.
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
        return self._wrap(checked, method)  # a refusal made for this call: its wrapper is not kept

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return self._gate.wrap(handler, method, on_error=abort_for)
