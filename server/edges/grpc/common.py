"""What both gRPC servicers (``classifier.v1`` and the Open Inference Protocol) share: status codes, deadlines,
concurrent streams and the serving-process trailer."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from server.core import errors
from server.core.errors import Status
from server.edges.common.requests import Outcome

Request = TypeVar("Request")
Response = TypeVar("Response")
PID_METADATA = "classifyd-pid"
log = logging.getLogger("classifyd.grpc")


def grpc_code(status: Status) -> grpc.StatusCode:
    """The gRPC code of a domain status (the names are the same)."""
    return grpc.StatusCode[status.name]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a request that raised ``exc`` gets (the table is :mod:`server.core.errors`)."""
    status, message = errors.status_for(exc)
    return grpc_code(status), message


def failure_status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a request of ``method`` that raised ``exc`` gets; an exception classifyd does not know is logged
    with its traceback (call it in the ``except`` block) and answered INTERNAL. For a call, and for one request of
    a stream, which reports it in its own answer."""
    if not isinstance(exc, errors.ClassifydError):
        log.exception("unexpected error in %s", method)
    return status_for(exc)


async def abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """End the call of ``method`` with :func:`failure_status`; a handler's own abort is raised as it is. Always
    raises grpc's AbortError."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler already chose its status
        raise exc
    await context.abort(*failure_status(exc, method))


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` time (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def outcome_in(context: grpc.aio.ServicerContext) -> Outcome:
    """How a request of this call ended: a cancelled handler means the deadline passed or the client left."""

    def outcome(exc: BaseException) -> tuple[Status, str]:
        if isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                return Status.DEADLINE_EXCEEDED, "deadline exceeded"
            return Status.CANCELLED, "cancelled by the client"
        return errors.status_for(exc)

    return outcome


def stream_outcome(exc: BaseException) -> tuple[Status, str]:
    """How one request of a bidirectional stream ended (cancelled: the stream closed before its answer)."""
    if isinstance(exc, asyncio.CancelledError):
        return Status.CANCELLED, "stream ended before the answer"
    return errors.status_for(exc)


def mark_serving_process(context: grpc.aio.ServicerContext) -> None:
    """Name the process that served the call in the trailing metadata (which worker of ``--workers``)."""
    context.set_trailing_metadata(((PID_METADATA, str(os.getpid())),))


async def answer_concurrently(requests: AsyncIterator[Request], answer: Callable[[Request], Awaitable[Response]],
                              limit: int) -> AsyncIterator[Response]:
    """Answer each request of a stream in its own task; yield the answers as they complete (order not kept).

    At most ``limit`` requests are held at once, from being read until their answer has been taken by the caller
    (written to the client): with ``limit`` held, the stream is not read further. A client that writes without
    reading is pushed back by HTTP/2 flow control instead of growing the daemon's tasks and queued answers.
    ``answer`` must not raise. Ends once every request is answered; cancels the rest when the caller stops.
    """
    room = asyncio.Semaphore(limit)
    done: asyncio.Queue[Response | None] = asyncio.Queue()  # never more than `limit` answers: each holds a place
    pending: set[asyncio.Task[None]] = set()

    async def answer_one(request: Request) -> None:
        done.put_nowait(await answer(request))

    async def read_all() -> None:
        iterator = aiter(requests)
        try:
            while True:
                await room.acquire()  # a place first: a request is read only when it can be held
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(answer_one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
        finally:
            done.put_nowait(None)  # ends the answers even if reading failed; awaiting the reader raises its error

    reader = asyncio.create_task(read_all())
    try:
        while (response := await done.get()) is not None:
            yield response  # returns once the caller wants the next answer: this one is written
            room.release()
        await reader
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
