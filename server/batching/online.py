"""Online batch-cap tuning: the load-time ladder only seeds the cap; the batches served keep measuring it.

:class:`OnlineTuner` records the compute time of every *full* batch by its size (a batch that is not full ran
at low load, often after an idle gap that makes it slower than the size costs), keeps the recent ones per size
and estimates each size's batch time from the last :attr:`TunerSettings.window` of them by their
:data:`ESTIMATE_QUANTILE` (a low quantile: see docs/batching.md for why not the fastest run nor the median).

While load keeps batches full it now and then *explores* one step up or down the ladder (1, 2, 4, … ceiling):
the next ``window`` batches take the neighbouring size, and the cap moves there when its measured throughput is
better (up: by more than ``up_margin``; down: when it loses less than ``down_tolerance``, a smaller batch being
quicker to answer). Rules that keep it safe:

* **Only under full batches.** At least ``full_needed`` of the last ``saturation`` batches were full; a trial
  whose batch comes back smaller than the trial size (the load dropped) is abandoned.
* **Bounded cost.** After each trial the next one waits ``max(min_gap_s, loss / explore_share)``, where ``loss``
  is the trial's duration times the share of throughput it lost; so the throughput given up to exploring stays
  under ``explore_share`` (5 %) of the time since, over any minute with trials in it.
* **No oscillation.** A side is explored again only once its estimate is older than ``keep_s``; a move needs
  fresh evidence, and the up/down margins leave no pair of steady estimates that justify moving both ways.

Pure Python, standard library only, with an injected clock: the batcher (:mod:`server.batching.batcher`) asks
:meth:`OnlineTuner.limit` before every batch and reports it with :meth:`OnlineTuner.observe`; nothing blocks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.batching.curve import ladder

ESTIMATE_QUANTILE = 0.25
"""Which quantile of a size's recent batch times is its estimate (0 would be the fastest run, 0.5 the median)."""


@dataclass(frozen=True)
class TunerSettings:
    """The knobs of :class:`OnlineTuner` (defaults are what docs/batching.md describes)."""

    window: int = 6
    """Full batches per size that make an estimate (and the length of one trial)."""
    keep_s: float = 60.0
    """Samples older than this no longer count: the machine drifts."""
    up_margin: float = 0.04
    """A larger cap must be this much faster (images/s) to be taken."""
    down_tolerance: float = 0.02
    """A smaller cap is taken unless it is more than this much slower."""
    explore_share: float = 0.05
    """Most throughput the trials may cost, as a share of the time."""
    min_gap_s: float = 5.0
    """Shortest time between the end of one trial and the start of the next."""
    saturation: int = 8
    """Recent batches looked at to decide that load keeps batches full ..."""
    full_needed: int = 7
    """... and how many of them must have been full."""
    quantile: float = ESTIMATE_QUANTILE


@dataclass(frozen=True)
class SizeEstimate:
    """What the served batches say about one batch size."""

    batch_size: int
    batch_s: float
    samples: int
    age_s: float
    """Seconds since the newest sample."""

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.batch_s


@dataclass(frozen=True)
class CapChange:
    """One move of the cap, for the log."""

    old: int
    new: int
    old_rate: float
    new_rate: float

    def describe(self) -> str:
        return (f"max_batch_size {self.old} -> {self.new} (measured while serving: {self.old}:{self.old_rate:.0f} "
                f"{self.new}:{self.new_rate:.0f} images/s)")


@dataclass(frozen=True)
class TuningSnapshot:
    """The tuner's state for the status page, ModelInfo and /metrics."""

    cap: int
    exploring: int
    """The size being tried now; 0 when none."""
    estimates: tuple[SizeEstimate, ...]
    changes: int
    trials: int
    last_change: str


def quantile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (lower of the two middle elements; no interpolation)."""
    ordered = sorted(values)
    return ordered[int(share * (len(ordered) - 1))]


class OnlineTuner:
    """Keeps one version's batch cap at the best size measured while serving (module docstring)."""

    def __init__(self, cap: int, ceiling: int, *, clock: Callable[[], float] = time.monotonic,
                 settings: TunerSettings | None = None, on_change: Callable[[CapChange], None] | None = None) -> None:
        """Start at ``cap``; sizes stay within the ladder 1, 2, 4, … ``ceiling`` (plus ``cap`` itself).
        ``on_change`` is called on every move. Raises ValueError for a cap or ceiling below 1."""
        if cap < 1 or ceiling < 1:
            raise ValueError(f"cap and ceiling must be >= 1, got {cap} and {ceiling}")
        self.settings = settings or TunerSettings()
        self._clock = clock
        self._on_change = on_change
        self.sizes = sorted({*ladder(max(ceiling, cap)), cap})
        self.cap = cap
        self.changes = 0
        self.trials = 0
        self.last_change = ""
        self._samples: dict[int, deque[tuple[float, float]]] = {}
        self._recent_full: deque[bool] = deque(maxlen=self.settings.saturation)
        self._trial: int | None = None
        self._trial_started = 0.0
        self._skip_next = False
        self._next_trial_at = -math.inf
        self._last_direction = 1

    # ----- the batcher's side

    def limit(self) -> int:
        """How many items the next batch may take: the cap, or the size on trial."""
        return self._trial or self.cap

    def observe(self, batch_size: int, limit: int, compute_s: float, backlog: int = 0) -> None:
        """A batch of ``batch_size`` taken under ``limit`` (``backlog`` items left queued behind it) computed in
        ``compute_s``; may start, end or decide a trial. Never blocks, never raises for odd values (ignored)."""
        now = self._clock()
        # under a cap of 1 every batch fills it, even one request at a time: full only with more waiting
        full = batch_size >= limit and (limit > 1 or backlog > 0)
        self._recent_full.append(full)
        usable = math.isfinite(compute_s) and compute_s > 0 and not self._skip_next
        self._skip_next = False  # the first batch at a new size pays for its allocations
        if self._trial is not None:
            if batch_size < self._trial and limit == self._trial:
                self._end_trial(now, 0.0)  # the load dropped: this size cannot be measured now
            elif usable and batch_size == self._trial:
                self._record(batch_size, compute_s, now)
                if len(self._fresh(batch_size, now)) >= self.settings.window:
                    self._decide(now)
            return
        if full and usable and batch_size == self.cap:
            self._record(batch_size, compute_s, now)
        if self._may_explore(now):
            self._start_trial(now)

    # ----- what it knows

    def estimate(self, size: int, now: float | None = None) -> float | None:
        """The estimated batch time of ``size`` from its fresh samples; None with fewer than ``window``."""
        fresh = self._fresh(size, self._clock() if now is None else now)
        if len(fresh) < self.settings.window:
            return None
        return quantile(fresh[-self.settings.window:], self.settings.quantile)

    def snapshot(self) -> TuningSnapshot:
        """The cap, the trial under way and the estimate of every size with fresh samples."""
        now = self._clock()
        estimates = []
        for size in sorted(self._samples):
            fresh = self._fresh(size, now)
            if fresh:
                newest = tuple(self._samples[size])[-1][0]
                estimates.append(SizeEstimate(size, quantile(fresh[-self.settings.window:], self.settings.quantile),
                                              len(fresh), now - newest))
        return TuningSnapshot(self.cap, self._trial or 0, tuple(estimates), self.changes, self.trials,
                              self.last_change)

    # ----- internals

    def _record(self, size: int, seconds: float, now: float) -> None:
        self._samples.setdefault(size, deque(maxlen=4 * self.settings.window)).append((now, seconds))

    def _fresh(self, size: int, now: float) -> list[float]:
        horizon = now - self.settings.keep_s
        # A tuple first: the metrics exporter reads this from its own thread while the loop appends.
        return [seconds for at, seconds in tuple(self._samples.get(size, ())) if at >= horizon]

    def _saturated(self) -> bool:
        return len(self._recent_full) == self._recent_full.maxlen and sum(self._recent_full) >= \
            self.settings.full_needed

    def _may_explore(self, now: float) -> bool:
        return now >= self._next_trial_at and self._saturated() and self.estimate(self.cap, now) is not None \
            and self._neighbour(now) is not None

    def _neighbour(self, now: float) -> tuple[int, int] | None:
        """(direction, size) of the neighbouring size to try: one without a fresh estimate, the direction not
        tried last time first."""
        index = self.sizes.index(self.cap)
        sides = [(d, self.sizes[index + d]) for d in (-self._last_direction, self._last_direction)
                 if 0 <= index + d < len(self.sizes)]
        return next(((d, size) for d, size in sides if self.estimate(size, now) is None), None)

    def _start_trial(self, now: float) -> None:
        side = self._neighbour(now)
        if side is None:
            return
        self._last_direction, self._trial = side
        self._trial_started = now
        self._skip_next = True
        self.trials += 1

    def _decide(self, now: float) -> None:
        trial = self._trial
        current, tried = self.estimate(self.cap, now), self.estimate(trial, now) if trial else None
        if trial is None or current is None or tried is None:
            self._end_trial(now, 0.0)
            return
        old_rate, new_rate = self.cap / current, trial / tried
        gain = new_rate / old_rate - 1.0
        move = gain > self.settings.up_margin if trial > self.cap else gain >= -self.settings.down_tolerance
        self._end_trial(now, max(0.0, -gain))
        if move:
            change = CapChange(self.cap, trial, old_rate, new_rate)
            self.cap = trial
            self.changes += 1
            self.last_change = change.describe()
            if self._on_change is not None:
                self._on_change(change)

    def _end_trial(self, now: float, loss: float) -> None:
        """Back to the cap; the next trial waits long enough that trials cost at most ``explore_share``."""
        cost = (now - self._trial_started) * min(1.0, loss)
        self._next_trial_at = now + max(self.settings.min_gap_s, cost / self.settings.explore_share)
        self._trial = None
        self._skip_next = True
        self._recent_full.clear()
