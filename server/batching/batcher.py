"""A generic asyncio dynamic batcher.

Callers ``await batcher.submit(item)`` one item at a time; a single worker
task groups the waiting items into batches and hands each batch to an async
handler (up to ``max_concurrent_batches`` batches at once, so a GPU handler
stages the next batch while the current one computes), then resolves every
caller's future with its own entry of the result.

Modelled on Ray Serve's ``python/ray/serve/batching.py`` (one future per
request, the batching delay counted from the first item of a batch, cancelled
requests skipped, a handler error fanned out to every caller of its batch), but
as a plain object with explicit ``start()`` / ``aclose()``: no global state, no
``__del__``, and an injectable :class:`Clock` so tests control time.

An optional :class:`BatchPolicy` (e.g. :class:`server.batching.policy.LatencyTargetPolicy`)
is consulted on every arrival (admit or reject early), before every batch (wait
or dispatch now, and how many items to take) and after it (its compute time).

Stdlib only on purpose: the gRPC layer and the torch model live elsewhere. The
errors, the clock, the policy protocol and the result type live in
:mod:`server.batching.interface`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from server.batching.interface import (
    Batched,
    BatcherClosed,
    BatchPolicy,
    CapTuner,
    Clock,
    DeadlineExpired,
    DeadlineUnreachable,
    Handler,
    QueueFull,
    QueueState,
    SystemClock,
    TargetUnreachable,
)

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("classifyd.batcher")


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    value: T
    future: asyncio.Future[Batched[R]]
    submitted: float
    deadline: float | None


def _check_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {value!r}")
    return value


def _check_queue(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_queue must be None or an int >= 1, got {value!r}")
    return value


def _check_delay(value: float) -> float:
    # `not value >= 0` also rejects NaN, which would make every window endless.
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"max_delay_s must be a number >= 0, got {value!r}")
    return float(value)


_UNSET: object = object()


def _wait_plan(plan: tuple[float, int]) -> tuple[float, int]:
    seconds, depth = plan
    # `not seconds > 0` also turns NaN into "dispatch now".
    return (float(seconds) if seconds > 0 else 0.0), int(depth)


def _settable(exc: BaseException) -> BaseException:
    """Wrap what a Future cannot carry faithfully, so the caller still sees a failure."""
    # A Future refuses StopIteration, and a CancelledError would look like the
    # caller's own cancellation.
    if isinstance(exc, StopIteration | asyncio.CancelledError):
        wrapped = RuntimeError(f"handler returned {type(exc).__name__} as a result")
        wrapped.__cause__ = exc
        return wrapped
    return exc


class Batcher(Generic[T, R]):
    """Groups concurrently submitted items into batches for one async handler.

    A single worker task (created by :meth:`start`) waits for the first item,
    takes every item already waiting up to ``max_batch_size`` and, when
    ``max_delay_s > 0`` and the batch is not full, keeps collecting until the
    first item's submit time plus ``max_delay_s``. At most ``max_concurrent_batches``
    batches are with the handler at once (1 by default: one at a time), so items
    arriving meanwhile make up the next batch. With a ``policy``, the policy decides
    admission, the wait and the batch size instead (``max_delay_s`` is then unused;
    ``max_batch_size`` stays the upper bound).
    """

    def __init__(
        self,
        handler: Handler[T, R],
        *,
        max_batch_size: int,
        max_delay_s: float = 0.0,
        max_queue: int | None = None,
        clock: Clock | None = None,
        name: str = "batcher",
        policy: BatchPolicy | None = None,
        max_concurrent_batches: int = 1,
        tuner: CapTuner | None = None,
    ) -> None:
        """Configure the batcher; nothing runs until :meth:`start`.

        ``max_concurrent_batches > 1`` lets the next batch be formed and handed to the handler while earlier ones
        are still being computed (a GPU handler prepares and copies it meanwhile). A ``tuner`` (used only
        without a policy) sets each batch's limit instead of ``max_batch_size`` and sees every batch's compute
        time (:mod:`server.batching.online`). Raises ValueError for
        ``max_batch_size < 1``, ``max_delay_s < 0``, ``max_queue < 1`` or ``max_concurrent_batches < 1``.
        """
        self._handler = handler
        self._max_batch_size = _check_batch_size(max_batch_size)
        self._max_delay_s = _check_delay(max_delay_s)
        self._max_queue = _check_queue(max_queue)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._name = name
        self._policy = policy
        self._tuner = tuner
        if isinstance(max_concurrent_batches, bool) or not isinstance(max_concurrent_batches, int) \
                or max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be an int >= 1, got {max_concurrent_batches!r}")
        self._max_concurrent = max_concurrent_batches
        # (size, dispatch time) of every batch being computed, oldest first
        self._busy: deque[tuple[int, float]] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._queue: deque[_Entry[T, R]] = deque()
        # Set on every change the worker may be waiting for: an arrival, a
        # configure() or aclose().
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def name(self) -> str:
        """The name used in error messages and logs."""
        return self._name

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (the batches being computed are not counted)."""
        return len(self._queue)

    @property
    def max_batch_size(self) -> int:
        """Largest number of items passed to one handler call."""
        return self._max_batch_size

    @property
    def max_delay_s(self) -> float:
        """How long a batch that is not full may wait, from its first item's submit."""
        return self._max_delay_s

    @property
    def policy(self) -> BatchPolicy | None:
        """The policy consulted for admission, waiting and batch size; None for the plain rules."""
        return self._policy

    @property
    def tuner(self) -> CapTuner | None:
        """The online cap tuner setting each batch's limit (without a policy); None for ``max_batch_size``."""
        return self._tuner

    def start(self) -> None:
        """Start the worker task on the running loop; returns at once.

        Idempotent while running. Raises RuntimeError outside a running loop
        and BatcherClosed after :meth:`aclose` started.
        """
        if self._closing:
            raise BatcherClosed(f"{self._name}: cannot start a closed batcher")
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"{self._name}-worker")

    @property
    def max_queue(self) -> int | None:
        """Most items that may wait; None for no limit."""
        return self._max_queue

    def configure(self, *, max_batch_size: int | None = None, max_delay_s: float | None = None,
                  max_queue: int | None = None, policy: BatchPolicy | object | None = _UNSET,
                  tuner: CapTuner | object | None = _UNSET) -> None:
        """Change the batching limits; they apply from the next batch formed.

        ``policy=None`` removes the policy and ``tuner=None`` the tuner; leaving them out keeps the current ones.
        Never blocks; raises ValueError for invalid values (then nothing changes).
        """
        size = self._max_batch_size if max_batch_size is None else _check_batch_size(max_batch_size)
        delay = self._max_delay_s if max_delay_s is None else _check_delay(max_delay_s)
        queue = self._max_queue if max_queue is None else _check_queue(max_queue)
        self._max_batch_size, self._max_delay_s, self._max_queue = size, delay, queue
        if policy is not _UNSET:
            self._policy = policy  # type: ignore[assignment]
        if tuner is not _UNSET:
            self._tuner = tuner  # type: ignore[assignment]
        # A batch that is still collecting may now be full.
        self._wakeup.set()

    async def submit(self, item: T, *, deadline: float | None = None) -> Batched[R]:
        """Queue ``item`` and block until its batch has been computed.

        ``deadline`` is absolute, in the clock's time: if it has passed when the
        batch is formed the item is dropped with DeadlineExpired. Raises
        QueueFull (at once) when ``max_queue`` items are already waiting,
        BatcherClosed after :meth:`aclose` started, or whatever exception the
        handler raised for this item's batch or returned for this item.
        Cancelling the caller withdraws the item, or discards its result if it
        is already being computed. Items submitted before :meth:`start` wait
        for it. With a policy, raises DeadlineUnreachable or TargetUnreachable
        (at once, the item never queued) when the policy rejects it.
        """
        if self._closing:
            raise BatcherClosed(f"{self._name}: batcher is closed")
        if self._max_queue is not None and len(self._queue) >= self._max_queue:
            raise QueueFull(f"{self._name}: queue is full ({len(self._queue)} waiting, max_queue={self._max_queue})")
        self._admit(deadline)
        future: asyncio.Future[Batched[R]] = asyncio.get_running_loop().create_future()
        entry = _Entry(item, future, self._clock.now(), deadline)
        self._queue.append(entry)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # Free the slot now so queue_depth and max_queue stay truthful.
            self._discard(entry)
            raise

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop the batcher; blocks until the worker has finished. Idempotent.

        New submits raise BatcherClosed from the moment this is called. With
        ``drain=True`` the waiting items are still computed; with
        ``drain=False`` they fail with BatcherClosed and only the batches already
        with the handler complete. Cancelling the caller of aclose does not
        cancel the worker.
        """
        self._closing = True
        if not drain or self._worker is None:
            # Without a worker nothing would ever resolve them.
            self._fail_queued(BatcherClosed(f"{self._name}: batcher closed before the item was computed"))
        self._wakeup.set()
        if self._worker is not None:
            await asyncio.shield(self._worker)

    def _admit(self, deadline: float | None) -> None:
        if self._policy is None:
            return
        rejection = self._consult("admit", None, self._state(), deadline)
        if rejection is not None:
            kind = DeadlineUnreachable if rejection.deadline else TargetUnreachable
            raise kind(f"{self._name}: {rejection.message}")

    def _state(self) -> QueueState:
        now = self._clock.now()
        oldest = now - self._queue[0].submitted if self._queue else 0.0
        size, since = self._busy[0] if self._busy else (0, now)
        return QueueState(now, len(self._queue), oldest, size, now - since, self._max_batch_size)

    def _consult(self, method: str, fallback: object, *args: object,
                 convert: Callable[[Any], Any] = lambda value: value, on: object = None) -> Any:
        """``convert(target.method(*args))`` with ``on`` (the tuner) or the policy as the target; a faulty policy
        or tuner must not strand callers: an error means ``fallback``."""
        target = self._policy if on is None else on
        try:
            return convert(getattr(target, method)(*args))
        except Exception:
            logger.exception("%s: batch %s %s failed; using the plain rules", self._name,
                             "policy" if on is None else "tuner", method)
            return fallback

    def _discard(self, entry: _Entry[T, R]) -> None:
        # ValueError: it was already taken into a batch.
        with contextlib.suppress(ValueError):
            self._queue.remove(entry)

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            future = self._queue.popleft().future
            if not future.done():
                future.set_exception(exc)

    async def _run(self) -> None:
        try:
            while await self._wait_for_batch():
                now = self._clock.now()
                limit = self._take_limit()
                batch = self._take(now, limit)
                taken = (now, limit, len(self._queue))  # the backlog: items still queued behind this batch
                if self._max_concurrent == 1:  # awaited here: no task per batch on the common (CPU) path
                    await self._dispatch_tracked(batch, *taken)
                    continue
                task = asyncio.ensure_future(self._dispatch_tracked(batch, *taken))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                if len(self._in_flight) >= self._max_concurrent:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._in_flight:  # closing: the batches already handed over still complete
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _dispatch_tracked(self, batch: list[_Entry[T, R]], now: float, limit: int, backlog: int) -> None:
        busy = (len(batch), now)
        self._busy.append(busy)
        try:
            await self._dispatch(batch, now, limit, backlog)
        except Exception as exc:
            # Only a batcher bug gets here; its callers must not hang on it.
            logger.exception("%s: delivering a batch failed", self._name)
            self._fail_all(batch, exc)
        finally:
            self._busy.remove(busy)

    def _take_limit(self) -> int:
        if self._closing:
            return self._max_batch_size
        if self._policy is None:
            if self._tuner is None:
                return self._max_batch_size
            return max(1, self._consult("limit", self._max_batch_size, convert=int, on=self._tuner))
        size = self._consult("batch_size", self._max_batch_size, self._state(), convert=int)
        return max(1, min(self._max_batch_size, size))

    async def _wait_for_batch(self) -> bool:
        """Block until a batch may be taken; False once closing with nothing left."""
        while not self._queue:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._closing:
            return True
        if self._policy is not None:
            seconds, depth = self._consult("collect", (0.0, 0), self._state(), convert=_wait_plan)
            until = self._clock.now() + seconds if seconds > 0 else None
        else:
            until = self._queue[0].submitted + self._max_delay_s if self._max_delay_s > 0 else None
            depth = self._max_batch_size
        if until is not None:
            try:
                await self._collect_until(until, depth)
            except Exception:
                # A faulty clock must not strand the waiting callers: dispatch now.
                logger.exception("%s: waiting for the batch delay failed", self._name)
        return True

    def _batch_ready(self, depth: int) -> bool:
        # max_batch_size is read again: configure() may have lowered it while collecting.
        return self._closing or len(self._queue) >= min(depth, self._max_batch_size) or not self._queue

    async def _collect_until(self, until: float, depth: int) -> None:
        remaining = until - self._clock.now()
        if remaining <= 0 or self._batch_ready(depth):
            return
        # One timer for the whole window; arrivals only re-check fullness.
        timer = asyncio.ensure_future(self._clock.sleep(remaining))
        try:
            while not timer.done() and not self._batch_ready(depth):
                self._wakeup.clear()
                arrival = asyncio.ensure_future(self._wakeup.wait())
                try:
                    await asyncio.wait({timer, arrival}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrival.cancel()
        finally:
            if not timer.done():
                timer.cancel()
        if timer.done() and not timer.cancelled() and (error := timer.exception()) is not None:
            raise error

    def _take(self, now: float, limit: int) -> list[_Entry[T, R]]:
        """Pop up to ``limit`` live items; expired ones fail without taking a slot."""
        batch: list[_Entry[T, R]] = []
        while self._queue and len(batch) < limit:
            entry = self._queue.popleft()
            if entry.future.done():
                continue  # its caller went away
            if entry.deadline is not None and entry.deadline <= now:
                entry.future.set_exception(DeadlineExpired(f"{self._name}: deadline passed while queued"))
                continue
            batch.append(entry)
        return batch

    async def _dispatch(self, batch: list[_Entry[T, R]], dispatched: float, limit: int, backlog: int) -> None:
        """Compute one batch and resolve its futures; raises only if the worker is cancelled."""
        if not batch:
            return
        try:
            results = await self._handler([entry.value for entry in batch])
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                for entry in batch:
                    entry.future.cancel()
                raise
            # The handler's own cancellation (e.g. of an inner task) is just a
            # failure; re-raising it would kill the worker.
            self._fail_all(batch, RuntimeError(f"{self._name}: handler was cancelled"), cause=exc)
            return
        except Exception as exc:
            # Not an error of the batcher: every caller gets it and reports it.
            logger.debug("%s: handler failed a batch of %d", self._name, len(batch), exc_info=True)
            self._fail_all(batch, exc)
            return
        compute_s = self._clock.now() - dispatched
        if self._policy is not None:
            self._consult("observe", None, len(batch), compute_s)
        elif self._tuner is not None:
            self._consult("observe", None, len(batch), limit, compute_s, backlog, on=self._tuner)
        self._deliver(batch, results, dispatched, compute_s)

    def _deliver(
        self, batch: list[_Entry[T, R]], results: Sequence[R | BaseException], dispatched: float, compute_s: float
    ) -> None:
        try:
            count = len(results)
        except TypeError:
            count = -1
        if count != len(batch):
            got = f"{count} results" if count >= 0 else f"a {type(results).__name__} without len()"
            self._fail_all(batch, RuntimeError(f"{self._name}: handler returned {got} for a batch of {len(batch)}"))
            return
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():
                continue  # caller cancelled during compute: drop the result silently
            if isinstance(result, BaseException):
                entry.future.set_exception(_settable(result))
            else:
                meta = Batched(result, len(batch), dispatched - entry.submitted, compute_s)
                entry.future.set_result(meta)

    @staticmethod
    def _fail_all(batch: list[_Entry[T, R]], exc: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)
