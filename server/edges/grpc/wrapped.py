"""The interceptor's wrapped handlers, made once per method instead of once per call.

grpc.aio asks every server interceptor for the handler of every call. An interceptor that wraps the handler it is
given (the daemon's: the drain gate with the error mapping, server/edges/grpc/calls.py) would otherwise build its
closures and a new ``RpcMethodHandler`` on the event loop for every call. A wrapper that depends only on the inner
handler and the method is the same for every call, so it is made the first time and reused while the inner handler
stays the same object. Measured with
``benchmarks/loop_work.py`` together with the generic-only registration (docs/benchmarks.md, "the event loop's
work per request"): the first step of a call, where the interceptors run, took 37-42 µs of the loop before and
31-36 µs after.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

Wrap = Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]


class WrappedHandlers:
    """``wrap(handler, method)`` remembered per method, for as long as the handler it was made from is returned.

    Keyed by method name and checked by identity: a different handler for the method gets its own wrapper and
    replaces the entry, so nothing is reused across different handlers and the table holds at most one entry per
    method that has a handler (the daemon's interceptor wraps a handler made for one call, a refusal, itself and
    never passes it here: server/edges/grpc/calls.py). Runs on the event loop only.
    """

    def __init__(self, wrap: Wrap) -> None:
        self._wrap = wrap
        self._made: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The wrapper of ``handler`` for ``method``; never blocks."""
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = self._wrap(handler, method)
        self._made[method] = (handler, wrapped)
        return wrapped
