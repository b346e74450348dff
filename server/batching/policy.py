"""A batch policy that keeps a model's latency under a target: :class:`LatencyTargetPolicy`.

The batcher (:mod:`server.batching.batcher`) consults it on every arrival, before every batch and after it. It predicts
from a batch-time estimator (batch size → seconds; the curve :mod:`server.models.loader.autotune` measures at load
time), corrected online by the batch times it observes (the 95th percentile of observed/estimated over the last 32
batches), so a machine that got slower since the curve was measured tightens admission instead of breaking the
target. Standard library only, like the batcher.

The rules, with ``e(b)`` the corrected estimate and ``budget = headroom × target``:

* **Batch cap under the target** ``B``: the largest ``b ≤ max_batch_size`` with ``2·e(b) ≤ budget``. Under
  saturation an item waits for the batch being computed, then computes in its own: two batch times.
* **Admission**: an item arriving behind ``q`` waiting items, with ``r`` left of the batch being computed, is
  expected to finish after ``r + (q // B + 1)·e(B)``; above the budget it is rejected at once
  (``TargetUnreachable``). Its own deadline is checked against the optimistic ``r + (q // B)·e(B) + e(q % B + 1)``
  (``DeadlineUnreachable``), so a request that might still make it is not refused.
* **Batch size**: ``B`` (or what waits, if fewer): the batch admission counted on.
* **A short wait** (instead of dispatching at once when the model is free) only when, at the recent arrival
  rate, waiting for ``k`` more items lowers the summed latency of the waiting and the arriving items, the wait is
  shorter than the batch itself and the oldest item still fits the budget. On a CPU, where batch time grows
  almost linearly, this never happens; on a GPU, where a batch of 8 costs about what a batch of 1 does, it does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from server.batching.interface import QueueState, Rejection

HEADROOM = 0.8
"""Share of the target the policy plans with: the rest absorbs variance and the path outside the batcher."""
OBSERVED_WINDOW = 32
"""Recent batches whose observed/estimated time ratios make the correction of the estimator."""
OBSERVED_QUANTILE = 0.95
"""The correction is this quantile of those ratios, not their mean: the target is a p99, so plan for slow batches
(the slowest one or two of the window are left out, so that a single stall does not shut admission for a while)."""
ARRIVAL_WINDOW = 16


class LatencyTargetPolicy:
    """Admits, sizes and times batches so that queue wait plus compute stays under ``target_s`` (p99 intent)."""

    def __init__(self, estimate: Callable[[int], float], *, target_s: float, headroom: float = HEADROOM) -> None:
        """``estimate(b)``: expected seconds of one batch of ``b``. Raises ValueError for a target <= 0."""
        if not target_s > 0:
            raise ValueError(f"target_s must be > 0, got {target_s!r}")
        self._estimate = estimate
        self.target_s = target_s
        self.budget_s = headroom * target_s
        self.scale = 1.0
        """How much slower (or faster) batches run than estimated: a high quantile of recent observed/estimated."""
        self._ratios: deque[float] = deque(maxlen=OBSERVED_WINDOW)
        self._arrivals: deque[float] = deque(maxlen=ARRIVAL_WINDOW)

    def estimate(self, batch_size: int) -> float:
        """Expected seconds of one batch, corrected by what was observed."""
        return self._estimate(max(1, batch_size)) * self.scale

    def target_batch(self, max_batch_size: int) -> int:
        """The largest batch two of which fit the budget (at least 1)."""
        low, high = 1, max_batch_size
        while low < high:  # batch time grows with size, so bisect
            middle = (low + high + 1) // 2
            if 2 * self.estimate(middle) <= self.budget_s:
                low = middle
            else:
                high = middle - 1
        return low

    # ----- the BatchPolicy protocol

    def admit(self, state: QueueState, deadline: float | None) -> Rejection | None:
        """Reject an arrival that cannot meet its deadline or the target; records the arrival either way."""
        self._arrivals.append(state.now)
        size = self.target_batch(state.max_batch_size)
        ahead, position = divmod(state.queue_depth, size)
        busy = max(0.0, self.estimate(state.busy_size) - state.busy_elapsed_s) if state.busy_size else 0.0
        if deadline is not None:
            soonest = busy + ahead * self.estimate(size) + self.estimate(position + 1)
            left = deadline - state.now
            if soonest > left:
                return Rejection(True, f"cannot meet the request's deadline: {_ms(max(0.0, left))} ms left, and "
                                       f"computing it behind the queue takes about {_ms(soonest)} ms")
        expected = busy + (ahead + 1) * self.estimate(size)
        if expected > self.budget_s:
            return Rejection(False, f"cannot meet latency target {_ms(self.target_s)} ms: the queue would take "
                                    f"about {_ms(expected)} ms ({state.queue_depth} requests waiting, batches of "
                                    f"{size} take about {_ms(self.estimate(size))} ms)")
        return None

    def batch_size(self, state: QueueState) -> int:
        """The target batch. Never fewer while items wait: admission promised each item a place in the batch
        after the running one, and a smaller batch (to rush a late oldest item) would break that promise."""
        return self.target_batch(state.max_batch_size)

    def collect(self, state: QueueState) -> tuple[float, int]:
        """Wait for ``k`` more items when that lowers the summed latency (see the module's docstring)."""
        waiting = state.queue_depth
        size = self.target_batch(state.max_batch_size)
        rate = self._rate(state.now)
        if waiting == 0 or waiting >= size or rate <= 0:
            return 0.0, waiting
        now_cost = self.estimate(waiting)
        best, plan = 0.0, (0.0, waiting)
        for more in [*(1 << i for i in range((size - waiting - 1).bit_length())), size - waiting]:
            wait = more / rate
            together = self.estimate(waiting + more)
            if wait > now_cost or state.oldest_wait_s + wait + together > self.budget_s:
                break
            change = waiting * (wait + together - now_cost) + more * (wait + together - now_cost -
                                                                      self.estimate(more))
            if change < best:
                best, plan = change, (wait, waiting + more)
        return plan

    def observe(self, batch_size: int, compute_s: float) -> None:
        """Fold one observed batch time into the correction of the estimator."""
        expected = self._estimate(max(1, batch_size))
        if expected > 0 and compute_s > 0 and math.isfinite(compute_s):
            self._ratios.append(min(20.0, max(0.05, compute_s / expected)))
            ordered = sorted(self._ratios)
            self.scale = ordered[int(OBSERVED_QUANTILE * (len(ordered) - 1))]

    def _rate(self, now: float) -> float:
        """Recent arrivals per second; 0.0 when too few, or when traffic paused for several gaps."""
        if len(self._arrivals) < 4:
            return 0.0
        span = self._arrivals[-1] - self._arrivals[0]
        if span <= 0:
            return math.inf
        gap = span / (len(self._arrivals) - 1)
        return 0.0 if now - self._arrivals[-1] > 4 * gap else 1.0 / gap


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"
