"""Admission control: whether a request may join its model's queue at all.

A request is admitted before it is preprocessed, so a request that will be
shed costs no decoding. Two rules, both checked in :meth:`Admission.admit`:

* **Load shedding**: requests being preprocessed plus requests waiting in the
  model's batcher may not exceed the model's ``max_queue``; one more is
  :class:`~server.core.errors.Overloaded` (RESOURCE_EXHAUSTED) at once. Memory and
  the latency of accepted requests are therefore bounded by ``max_queue``.
* **Hopeless deadlines**: the time the requests already ahead need is
  estimated as ``(ahead // max_batch_size) × EMA(batch compute time)``; a
  request whose deadline is no later than that is
  :class:`~server.core.errors.DeadlineExpired` (DEADLINE_EXCEEDED) at once. The
  estimate leaves out the batches being computed and the request's own batch,
  so it errs toward accepting (docs/production.md).

Plain bookkeeping on the event loop: nothing here blocks; torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.core.errors import DeadlineExpired, Overloaded

EMA_ALPHA = 0.2
"""Weight of the newest batch in the moving average of batch compute time."""
MIN_BATCHES = 3
"""Batches a model must have computed before its deadline estimate is trusted."""


@dataclass
class BatchTimes:
    """Exponential moving average of one model's batch compute time."""

    alpha: float = EMA_ALPHA
    seconds: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Fold in one batch's compute time."""
        self.seconds = seconds if self.count == 0 else self.alpha * seconds + (1 - self.alpha) * self.seconds
        self.count += 1


@dataclass(eq=False)
class Ticket:
    """One admitted request's place among the model's preprocessing requests; release it once queued."""

    _owner: Admission
    model: str
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Stop counting the request as preprocessing (it is now in the batcher's queue, or gone). Idempotent."""
        if not self._released:
            self._released = True
            self._owner._preparing[self.model] -= 1


class Admission:
    """Admits requests per model; observes batch times for the deadline estimate."""

    def __init__(self, *, alpha: float = EMA_ALPHA, min_batches: int = MIN_BATCHES) -> None:
        self._alpha = alpha
        self._min_batches = min_batches
        self._preparing: dict[str, int] = {}
        self._times: dict[str, BatchTimes] = {}

    def preparing(self, model: str) -> int:
        """Admitted requests of ``model`` that are not in its batcher's queue yet (being preprocessed)."""
        return self._preparing.get(model, 0)

    def observe_batch(self, model: str, seconds: float) -> None:
        """Record how long one of ``model``'s batches took to compute."""
        self._times.setdefault(model, BatchTimes(self._alpha)).observe(seconds)

    def batch_seconds(self, model: str) -> float | None:
        """The moving average of the model's batch compute time; None until ``min_batches`` were seen."""
        times = self._times.get(model)
        return times.seconds if times and times.count >= self._min_batches else None

    def estimated_wait(self, model: str, ahead: int, max_batch_size: int) -> float | None:
        """Seconds the ``ahead`` requests need before a newcomer's batch can start; None when unknown."""
        per_batch = self.batch_seconds(model)
        return None if per_batch is None else (ahead // max_batch_size) * per_batch

    def admit(self, model: str, *, queued: int, max_queue: int, max_batch_size: int,
              deadline: float | None, now: float | None = None) -> Ticket:
        """Admit one request of ``model`` whose batcher has ``queued`` requests waiting.

        Never blocks. Raises Overloaded when ``max_queue`` requests are already
        preprocessing or waiting, DeadlineExpired when ``deadline`` (absolute
        ``time.monotonic()`` seconds) cannot be met by the estimate above.
        """
        ahead = queued + self.preparing(model)
        if ahead >= max_queue:
            raise Overloaded(f"model {model}: queue is full ({ahead} waiting, max_queue={max_queue}); "
                             "the request was rejected without being computed, retry later")
        if deadline is not None:
            self._check_deadline(model, ahead, max_batch_size, deadline, time.monotonic() if now is None else now)
        self._preparing[model] = self.preparing(model) + 1
        return Ticket(self, model)

    def _check_deadline(self, model: str, ahead: int, max_batch_size: int, deadline: float, now: float) -> None:
        wait = self.estimated_wait(model, ahead, max_batch_size)
        remaining = deadline - now
        if wait is None or remaining > wait:
            return
        per_batch = self.batch_seconds(model) or 0.0
        raise DeadlineExpired(
            f"model {model}: deadline cannot be met: {ahead} requests are ahead, about {ahead // max_batch_size} "
            f"batches of up to {max_batch_size} at ~{per_batch * 1000:.0f} ms each (estimated {wait:.3f} s), "
            f"but only {max(remaining, 0.0):.3f} s remain; rejected without being computed")
