"""What a :class:`server.batching.batcher.Batcher` shares with its callers, its handler and its policy.

The errors ``submit`` raises, the injectable :class:`Clock`, the :class:`BatchPolicy` protocol with the
:class:`QueueState` it sees and the :class:`Rejection` it returns, the :class:`CapTuner` protocol, the
:class:`Batched` result and the :data:`Handler` type. Standard library only, like the batcher; callers import these
names from here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Clock(Protocol):
    """Time source of a :class:`Batcher` (injectable so tests need no real sleeps)."""

    def now(self) -> float:
        """Return monotonic seconds; never blocks."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Block the calling task for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic` and :func:`asyncio.sleep`."""

    def now(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Block the calling task for ``seconds`` of wall time."""
        await asyncio.sleep(seconds)


class BatcherError(Exception):
    """Base class of the errors a :class:`Batcher` raises itself."""


class QueueFull(BatcherError):
    """``submit`` found ``max_queue`` items already waiting."""


class DeadlineExpired(BatcherError):
    """The item's deadline passed before its batch was formed; it was never computed."""


class BatcherClosed(BatcherError):
    """The batcher is closing: no new items, and undrained items are dropped."""


class DeadlineUnreachable(DeadlineExpired):
    """The policy predicted at ``submit`` that the item's deadline cannot be met; it was never queued."""


class TargetUnreachable(QueueFull):
    """The policy predicted at ``submit`` that the item would miss the latency target; it was never queued."""


@dataclass(frozen=True)
class QueueState:
    """What a :class:`BatchPolicy` sees of the batcher at one moment."""

    now: float
    queue_depth: int
    """Items waiting (not counting the batches being computed)."""
    oldest_wait_s: float
    """How long the first waiting item has waited; 0.0 when none waits."""
    busy_size: int
    """Items in the oldest batch being computed (with ``max_concurrent_batches > 1`` the next one may already
    be with the handler); 0 when the handler is idle."""
    busy_elapsed_s: float
    """How long that batch has been computing; 0.0 when idle."""
    max_batch_size: int


@dataclass(frozen=True)
class Rejection:
    """Why a policy refuses an item at ``submit``."""

    deadline: bool
    """True: the item's own deadline cannot be met (DeadlineUnreachable); False: the policy's target
    cannot (TargetUnreachable)."""
    message: str


class BatchPolicy(Protocol):
    """Decides admission, waiting and batch size from the queue's state. Every method is called on the event
    loop and must not block; an exception is logged and the batcher falls back to its plain rules."""

    def admit(self, state: QueueState, deadline: float | None) -> Rejection | None:
        """Called once per arriving item (``deadline`` absolute, clock time): None admits it."""
        ...

    def collect(self, state: QueueState) -> tuple[float, int]:
        """When the handler is free and items wait: ``(seconds, depth)`` to keep collecting for up to
        ``seconds`` or until ``depth`` items wait; ``(0.0, _)`` dispatches now."""
        ...

    def batch_size(self, state: QueueState) -> int:
        """How many items the batch about to be dispatched takes (clamped to 1..max_batch_size)."""
        ...

    def observe(self, batch_size: int, compute_s: float) -> None:
        """The handler took ``compute_s`` for a batch of ``batch_size``."""
        ...


class CapTuner(Protocol):
    """Moves the batch cap while serving (:class:`server.batching.online.OnlineTuner`). Called on the event loop;
    must not block. Consulted only when no :class:`BatchPolicy` is set; an exception is logged and the batcher
    falls back to its ``max_batch_size``."""

    def limit(self) -> int:
        """How many items the next batch may take (replaces ``max_batch_size``)."""
        ...

    def observe(self, batch_size: int, limit: int, compute_s: float, backlog: int = 0) -> None:
        """A batch of ``batch_size``, taken under ``limit`` with ``backlog`` items left queued, took ``compute_s``."""
        ...


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result, with the batching metadata callers report as metrics."""

    value: R
    batch_size: int
    """Number of items in the batch that computed this value."""
    queue_s: float
    """Clock time from ``submit`` to the dispatch of its batch."""
    compute_s: float
    """Clock time the handler call took."""


Handler = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]
"""Computes a batch: one result per item, in order; an exception instance fails that item alone."""
