"""The bookkeeping every edge does for a classification request: its id, its deadline, its report.

gRPC ``Classify``/``ClassifyStream``, HTTP ``/v1`` and both Open Inference Protocol bindings open a
:class:`Ticket` when a request arrives and close it once with the outcome; the ticket builds the
:class:`RequestReport` and hands it to the daemon's request observer (the request log and the request metrics),
so every edge is logged and counted the same way. With tracing on, the ticket is also the request's span
(:mod:`server.ops.tracing`), current while its work runs. Nothing here blocks; no wire protocol is imported.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from server.core import errors
from server.core.errors import Status
from server.core.types import ClassifyCall, ClassifyResult, RequestObserver, RequestReport
from server.ops import tracing
from server.ops.tracing import Carrier, Span
from server.service import ClassifierService

log = logging.getLogger("classifyd.edges")

T = TypeVar("T")
Outcome = Callable[[BaseException], tuple[Status, str]]
"""How an edge names the status of a request that raised (its transport knows why a handler was cancelled)."""


def outcome_of(exc: BaseException) -> tuple[Status, str]:
    """The status of a request that raised ``exc``: a cancellation is the client's, the rest as the domain says."""
    if isinstance(exc, asyncio.CancelledError):
        return Status.CANCELLED, "cancelled by the client"
    return errors.status_for(exc)


def new_request_id() -> str:
    """An id for a request that brought none: 16 hex digits."""
    return f"{random.getrandbits(64):016x}"  # uuid4 costs a system call per request


async def off_loop_if(large: bool, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: in a worker thread when ``large`` (it would hold the event loop for milliseconds or more),
    else right here (a thread hop costs more than small work). Raises what ``work`` raises."""
    return await asyncio.to_thread(work, *args) if large else work(*args)


def deadline_after(timeout_s: float | None) -> float | None:
    """The ``time.monotonic()`` deadline ``timeout_s`` seconds from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def earliest(*deadlines: float | None) -> float | None:
    """The first of the deadlines that are set (None when none is)."""
    return min((d for d in deadlines if d is not None), default=None)


async def classify_within(service: ClassifierService, call: ClassifyCall, timeout_s: float | None) -> ClassifyResult:
    """``service.classify`` with the request's own timeout: DeadlineExpired once it passes, wherever the request is.

    A timeout given in the request (HTTP ``timeout_ms``, the OIP ``timeout`` parameter) is not a transport
    deadline that cancels the handler: without this a request behind a long batch would only fail once its batch
    was formed. Cancelling withdraws it from the batcher.
    """
    if timeout_s is None:
        return await service.classify(call)
    try:
        return await asyncio.wait_for(service.classify(call), timeout_s)
    except TimeoutError:
        raise errors.DeadlineExpired(f"the request's timeout of {timeout_s * 1000:g} ms passed before it was "
                                     "answered") from None


@dataclass
class Ticket:
    """One request being answered: its id (the caller's, or a generated one) and when it arrived.

    The edge sets ``model`` and ``version`` as requested (once it has read them) and calls :meth:`done` or
    :meth:`failed` exactly once; later calls are ignored.
    """

    observer: RequestObserver | None
    request_id: str
    model: str = ""
    version: int = 0
    started: float = field(default_factory=time.perf_counter)
    reported: bool = False
    span: Span | None = None  # the request's span while tracing is on

    def done(self, result: ClassifyResult | None) -> None:
        """The request succeeded (``result``: the one its metrics are timed from)."""
        self._report(Status.OK, "", result)

    def failed(self, status: Status, message: str) -> None:
        """The request ended with ``status``."""
        self._report(status, message, None)

    async def track(self, work: Awaitable[T], result_of: Callable[[T], ClassifyResult | None],
                    outcome: Outcome = outcome_of) -> T:
        """Await ``work`` and report how it ended (``result_of`` its answer, or ``outcome`` of what it raised).
        Raises what ``work`` raises."""
        token = tracing.activate(self.span) if self.span is not None else None  # the parent of the stages' spans
        try:
            answer = await work
        except BaseException as exc:
            self.failed(*outcome(exc))
            raise
        finally:
            if token is not None:
                tracing.deactivate(token)
        self.done(result_of(answer))
        return answer

    async def track_result(self, work: Awaitable[ClassifyResult], outcome: Outcome = outcome_of) -> ClassifyResult:
        """:meth:`track` for work whose answer is the request's one result."""
        return await self.track(work, _itself, outcome)

    def _report(self, status: Status, message: str, result: ClassifyResult | None) -> None:
        if self.reported:
            return
        self.reported = True
        if self.span is not None:
            tracing.end_request(self.span, self.request_id, self.model, self.version, status, message, result)
        if self.observer is None:
            return
        report = RequestReport(self.request_id, self.model, self.version, status, message,
                               time.perf_counter() - self.started, result)
        try:
            self.observer(report)
        except Exception:
            log.exception("request observer failed")


def _itself(result: ClassifyResult) -> ClassifyResult:
    return result


@dataclass(frozen=True)
class RequestBook:
    """Opens the tickets of one edge; ``observer`` is the daemon's (None: nobody listens)."""

    observer: RequestObserver | None = None

    def open(self, request_id: str = "", model: str = "", version: int = 0, *, name: str = "classify",
             carrier: Carrier | None = None) -> Ticket:
        """A ticket for a request that arrived now, with the caller's id or a new one. With tracing on it is a span
        named ``name`` continuing the trace context in ``carrier`` (the request's headers or metadata)."""
        return Ticket(self.observer, request_id or new_request_id(), model, version,
                      span=tracing.start_request(name, carrier))
