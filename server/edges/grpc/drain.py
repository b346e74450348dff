"""The gRPC edge's part of a graceful stop: no call ends CANCELLED because the server stopped.

grpc's C core cancels (status CANCELLED, which no retry policy retries) every call that reaches it after
``server.stop()`` began and before the client read the GOAWAY it sends, and every call it queued that the Python
server had not picked up yet (grpc/grpc#41785); at the end of the grace period it cancels the calls still open.
:class:`DrainGate` closes those gaps, as the daemon's stop sequence uses it (docs/production.md):

1. :meth:`DrainGate.hold` when the daemon stops accepting: calls that arrive from then on wait, and so do answers
   that are ready, so no client is told it may send its next call while the listener closes;
2. the daemon calls ``server.stop()`` (GOAWAY; the listener closes) and, once the GOAWAY is out,
   :meth:`DrainGate.release`: the waiting calls are answered UNAVAILABLE (a retrying client sends them to another
   replica: its channel will not use this connection again) and the held answers go out after the GOAWAY;
3. :meth:`DrainGate.end` answers UNAVAILABLE to calls still open: watch streams at once (they would hold the stop
   for the whole grace period), every other call just before the grace period ends.

The gate wraps each method's handler (:meth:`DrainGate.wrap`, called by the daemon's one interceptor,
:mod:`server.edges.grpc.calls`), and the same wrapper maps the handler's errors to statuses, so a call passes
through one coroutine of classifyd's besides its handler (a model-control call through one more: its check).
Everything here runs on the event loop and never blocks.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

REFUSED = "the server is shutting down and accepts no new calls; retry on another replica"
WATCH_METHODS = frozenset({"/classifier.v1.Classifier/WatchModels", "/grpc.health.v1.Health/Watch"})
"""Streams that only end when the client leaves: they end with UNAVAILABLE as soon as the daemon stops accepting."""
ErrorMapper = Callable[[Exception, grpc.aio.ServicerContext, str], Awaitable[None]]
"""``(exc, context, method)``: ends the call with the status ``exc`` stands for (it raises grpc's AbortError)."""


class DrainGate:
    """Tracks the open calls; refuses, holds and ends them as a stop needs. Every handler is wrapped by it
    (:meth:`wrap`), outside everything else classifyd puts around a handler."""

    def __init__(self) -> None:
        self._refusing = False
        self._released = asyncio.Event()
        self._open: dict[asyncio.Task[Any], str] = {}  # the task of each open call → its method
        self._ending: dict[asyncio.Task[Any], str] = {}  # calls end() cancelled → the UNAVAILABLE message

    @property
    def open_calls(self) -> int:
        """Calls being handled now (calls held by :meth:`hold`, waiting to be refused, are not counted)."""
        return len(self._open)

    def hold(self) -> None:
        """Stop accepting: new calls wait for :meth:`release`, then get UNAVAILABLE; so do ready answers."""
        self._refusing = True

    def release(self) -> None:
        """Refuse the waiting calls and send the held answers (call it once the GOAWAY is out)."""
        self._released.set()

    def end(self, reason: str, methods: Collection[str] | None = None) -> int:
        """Answer UNAVAILABLE with ``reason`` to the open calls of ``methods`` (None: all) now; their handlers are
        cancelled (a request waiting in a queue is withdrawn). Returns how many calls it ends."""
        ended = 0
        for task, method in list(self._open.items()):
            if task not in self._ending and (methods is None or method in methods):
                self._ending[task] = reason
                task.cancel()
                ended += 1
        return ended

    def wrap(self, handler: grpc.RpcMethodHandler, method: str,
             on_error: ErrorMapper | None = None) -> grpc.RpcMethodHandler:
        """``handler`` (of ``method``) with the gate around each of its calls; with ``on_error``, an exception a
        handler with a single request raises is handed to it (a stream of requests answers its errors in its own
        messages: ClassifyStream, ModelStreamInfer). Never blocks."""
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._single(handler.unary_unary, method, on_error), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._single(handler.stream_unary, method, None), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streamed(handler.unary_stream, method, on_error),
                                                        **codec)
        return grpc.stream_stream_rpc_method_handler(self._streamed(handler.stream_stream, method, None), **codec)

    def _single(self, inner: Callable[..., Awaitable[Any]], method: str,
                on_error: ErrorMapper | None) -> Callable[..., Awaitable[Any]]:
        async def single(request: Any, context: grpc.aio.ServicerContext) -> Any:
            task = await self._enter(method, context)
            try:
                answer = await inner(request, context)
            except asyncio.CancelledError:
                await self._refuse_if_ended(task, context)
                raise
            except Exception as exc:
                if on_error is None:
                    raise
                await on_error(exc, context, method)
                raise  # unreachable: on_error aborts the call
            finally:
                self._leave(task)
            if self._refusing and not self._released.is_set():
                await self._released.wait()  # this answer goes out after the GOAWAY
            return answer

        return single

    def _streamed(self, inner: Callable[..., AsyncIterator[Any]], method: str,
                  on_error: ErrorMapper | None) -> Callable[..., AsyncIterator[Any]]:
        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            task = await self._enter(method, context)
            try:
                # A stream ended while grpc writes one of its messages (a client that does not read) is cancelled
                # there, outside this generator: it ends CANCELLED, the one case this gate cannot answer.
                async for answer in answers_of(inner(request, context)):  # grpc_health's Watch writes, returns
                    yield answer
            except asyncio.CancelledError:
                await self._refuse_if_ended(task, context)
                raise
            except Exception as exc:
                if on_error is None:
                    raise
                await on_error(exc, context, method)
                raise  # unreachable: on_error aborts the call
            finally:
                self._leave(task)

        return streamed

    async def _enter(self, method: str, context: grpc.aio.ServicerContext) -> asyncio.Task[Any]:
        """Register the call's task; once the daemon stops accepting, refuse it (after :meth:`release`)."""
        if self._refusing:
            await self._released.wait()
            await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs every handler in a task of its own
        self._open[task] = method
        return task

    def _leave(self, task: asyncio.Task[Any]) -> None:
        self._open.pop(task, None)
        self._ending.pop(task, None)

    async def _refuse_if_ended(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext) -> None:
        """When :meth:`end` cancelled the call (not its client), answer UNAVAILABLE instead. Raises AbortError."""
        reason = self._ending.pop(task, None)
        if reason is None:
            return
        self._open.pop(task, None)
        task.uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, reason)


async def answers_of(produced: AsyncIterator[Any] | Awaitable[Any]) -> AsyncIterator[Any]:
    """The messages a streaming handler yields; none for one that writes them itself with ``context.write`` and
    returns (grpc_health's ``Watch``): grpc.aio accepts both kinds, so every wrapper of a handler must."""
    if inspect.isawaitable(produced):
        await produced
        return
    async for answer in produced:
        yield answer
