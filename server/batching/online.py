"""Online batch-cap tuning: the load-time ladder only seeds the cap; the batches served keep measuring it.

:class:`OnlineTuner` records the compute time per image of every batch *under load* by the cap it was taken
under (a batch at low load ran after an idle gap that makes it slower than the size costs), keeps the recent
ones per cap and estimates each cap's throughput from the last :attr:`TunerSettings.window` of them by their
:data:`ESTIMATE_QUANTILE` (a low quantile: see docs/batching.md for why not the fastest run nor the median).
A batch is under load when it is full, or when it began right after the one before (within ``busy_gap_s``: the
worker did not wait for requests), smaller than the cap because the load cannot fill it: a closed loop of 32
clients under a cap of 32 splits into batches of about 16 that never fill it, and the cap is then measured by
what its batches deliver.

Under load it now and then *explores* one step up or down the ladder (1, 2, 4, …
ceiling): the next ``window`` batches take the neighbouring size, then the next ``window`` at the cap measure it
again (A/B/A), and the cap moves there when its measured throughput is better than the better of the cap's two
estimates (up: by more than ``up_margin``; down: when it loses less than ``down_tolerance``, a smaller batch being
quicker to answer). The second look at the cap is what keeps a change of conditions during the trial (a load
ending, a client pausing: the preprocessing beside the trial batches stops, and they run as if alone) from
passing for a better setting. Rules that keep it safe:

* **Only under load.** At least ``full_needed`` of the last ``saturation`` batches were under load; a trial
  meeting a batch that is not (the load dropped), during its own batches or the cap's second look, is abandoned.
* **Bounded cost.** After each trial the next one waits ``max(min_gap_s, loss / explore_share)``, where ``loss``
  is the trial's duration times the share of throughput it lost; so the throughput given up to exploring stays
  under ``explore_share`` (5 %) of the time since, over any minute with trials in it.
* **No oscillation.** A side is explored again only once its estimate is older than ``keep_s``; a move needs
  fresh evidence, and the up/down margins leave no pair of steady estimates that justify moving both ways.

**Widths.** Given ``widths`` (the torch intra-op thread counts a CPU version may run its batches on: 1 and the
process's count), the tuner also explores the other width at the current cap, turn about with the sizes, by the same
rule: more threads must be faster by ``up_margin``, fewer are taken unless slower by more than ``down_tolerance``.
The load-time choice (:mod:`server.inference.threads`) measures a batch back to back in isolation, where two
threads win; while serving, the preprocessing pool and the event loop need the same cores, and an OpenMP team
whose second thread is descheduled waits for it at every operator. On the 2-core VM, mobilenet_v3_small at
concurrency 32 served 245-264 images/s on one thread against 196-216 on two, while the load-time trial had
measured two threads 1.3-1.5x faster (docs/batching.md). The width applies under load only: after a batch that
was not under load, :meth:`OnlineTuner.width_now` says 0 and the next batch runs on the version's own count (the
load-time choice, measured for single images on idle cores: what light load gives). Estimates are kept per
(size, width).

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
    """Recent batches looked at to decide that the version is under load ..."""
    full_needed: int = 7
    """... and how many of them must have been under load (full, or back to back: see ``busy_gap_s``)."""
    busy_gap_s: float = 0.001
    """A batch that began within this of the previous one's end counts as under load even when not full."""
    quantile: float = ESTIMATE_QUANTILE


@dataclass(frozen=True)
class Setting:
    """What a batch runs with: its size limit, and its width (intra-op threads; 0 when widths are not tuned)."""

    size: int
    width: int = 0


@dataclass(frozen=True)
class SizeEstimate:
    """What the served batches say about one batch size (at one width)."""

    batch_size: int
    batch_s: float
    samples: int
    age_s: float
    """Seconds since the newest sample."""
    width: int = 0
    """The intra-op threads the batches ran on; 0 when widths are not tuned."""

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.batch_s


@dataclass(frozen=True)
class CapChange:
    """One move of the cap or of the width, for the log."""

    old: int
    new: int
    old_rate: float
    new_rate: float
    old_width: int = 0
    new_width: int = 0
    """The width before and after (equal, 0 included, when only the cap moved)."""

    def describe(self) -> str:
        if self.old_width != self.new_width:
            return (f"torch threads {self.old_width} -> {self.new_width} at max_batch_size {self.new} (measured "
                    f"while serving: {self.old_width} thread(s) {self.old_rate:.0f}, {self.new_width} thread(s) "
                    f"{self.new_rate:.0f} images/s)")
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
    width: int = 0
    """The intra-op threads batches run on outside trials; 0 when widths are not tuned."""
    exploring_width: int = 0
    """The width being tried now; 0 when none (or not tuned)."""
    cap_online: bool = True
    """Whether the cap moves; False for a pinned cap whose width alone is tuned."""


def quantile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (lower of the two middle elements; no interpolation)."""
    ordered = sorted(values)
    return ordered[int(share * (len(ordered) - 1))]


class OnlineTuner:
    """Keeps one version's batch cap at the best size measured while serving (module docstring)."""

    def __init__(self, cap: int, ceiling: int, *, clock: Callable[[], float] = time.monotonic,
                 settings: TunerSettings | None = None, on_change: Callable[[CapChange], None] | None = None,
                 widths: Sequence[int] = (), width: int | None = None, explore_sizes: bool = True) -> None:
        """Start at ``cap``; sizes stay within the ladder 1, 2, 4, … ``ceiling`` (plus ``cap`` itself), or at
        ``cap`` alone without ``explore_sizes`` (a pinned cap). ``widths`` (two or more) are also explored,
        starting at ``width`` (default: the largest).
        ``on_change`` is called on every move. Raises ValueError for a cap, ceiling or width below 1, or a
        ``width`` not among ``widths``."""
        if cap < 1 or ceiling < 1 or any(w < 1 for w in widths):
            raise ValueError(f"cap, ceiling and widths must be >= 1, got {cap}, {ceiling} and {tuple(widths)}")
        self.widths = tuple(sorted(set(widths))) if len(set(widths)) > 1 else ()
        self.width = (width if width is not None else max(self.widths)) if self.widths else 0
        if self.widths and self.width not in self.widths:
            raise ValueError(f"width {self.width} is not one of {self.widths}")
        self.settings = settings or TunerSettings()
        self._clock = clock
        self._on_change = on_change
        self.sizes = sorted({*ladder(max(ceiling, cap)), cap}) if explore_sizes else [cap]
        self.cap = cap
        self.changes = 0
        self.trials = 0
        self.last_change = ""
        self._samples: dict[Setting, deque[tuple[float, float]]] = {}
        self._recent_loaded: deque[bool] = deque(maxlen=self.settings.saturation)
        self._load_seen: deque[bool] = deque(maxlen=self.settings.saturation)
        """The same, but kept across trials (a trial's end clears ``_recent_loaded``): what :meth:`under_load` reads."""
        self._trial: Setting | None = None
        self._confirming: Setting | None = None
        """A trial whose batches are done, waiting for the cap's second estimate (after ``_trial_ended``)."""
        self._trial_ended = 0.0
        self._last_tried_width = False
        self._last_loaded = False
        self._last_end = -math.inf
        self._last_seen = clock()
        """When the last batch ended, or the tuner was made: what :meth:`idle_s` counts from."""
        self._trial_started = 0.0
        self._skip_next = False
        self._next_trial_at = -math.inf
        self._last_direction = 1

    # ----- the batcher's side

    def limit(self) -> int:
        """How many items the next batch may take: the cap, or the size on trial."""
        return self._trial.size if self._trial is not None else self.cap

    def width_now(self) -> int:
        """The intra-op threads the next batch runs on: the one on trial, else the width after a batch under load; 0
        (the version's own count) after one that was not, and when widths are not tuned. Read by the
        forward pass (on the inference thread) of the batch that :meth:`limit` sized."""
        trial = self._trial  # read once: the event loop may end the trial meanwhile
        if trial is not None:
            return trial.width
        return self.width if self._last_loaded else 0

    @property
    def setting(self) -> Setting:
        """The cap and width that batches run with outside trials."""
        return Setting(self.cap, self.width)

    def observe(self, batch_size: int, limit: int, compute_s: float, backlog: int = 0) -> None:
        """A batch of ``batch_size`` taken under ``limit`` (``backlog`` items left queued behind it) computed in
        ``compute_s``; may start, end or decide a trial. Never blocks, never raises for odd values (ignored)."""
        now = self._clock()
        loaded = self._under_load(batch_size, limit, compute_s, backlog, now)
        self._last_seen = now
        ran_at_width = self._last_loaded or not self.widths  # width_now() chose this batch's width from the last one
        self._last_loaded = loaded
        self._recent_loaded.append(loaded)
        self._load_seen.append(loaded)
        usable = math.isfinite(compute_s) and compute_s > 0 and batch_size > 0 and not self._skip_next
        self._skip_next = False  # the first batch at a new size pays for its allocations
        per_image = compute_s / batch_size if usable else 0.0
        if (self._trial or self._confirming) and now - self._trial_started > self.settings.keep_s:
            self._end_trial(now, 0.0)  # load stopped mid-trial and came back later: its first figures are stale
        trial = self._trial
        if trial is not None:
            if limit == trial.size and not loaded:
                self._end_trial(now, 0.0)  # the load dropped: this size cannot be measured now
            elif usable and limit == trial.size:
                self._record(trial, per_image, now)
                if len(self._between(trial, self._trial_started)) >= self.settings.window:  # this trial's own
                    self._confirming, self._trial, self._trial_ended = trial, None, now
                    self._skip_next = True  # back at the cap: the first batch pays for the change again
            return
        if self._confirming is not None:
            if not loaded:
                self._end_trial(now, 0.0)  # the load changed: the trial's figures cannot be trusted
            elif usable and limit == self.cap and ran_at_width:
                self._record(self.setting, per_image, now)
                if len(self._between(self.setting, self._trial_ended)) >= self.settings.window:
                    self._decide(now)
            return
        if loaded and usable and limit == self.cap and ran_at_width:
            self._record(self.setting, per_image, now)
        if self._may_explore(now):
            self._start_trial(now)

    # ----- what it knows

    def under_load(self, recent_s: float) -> bool:
        """Whether the version serves under load now: most of its last batches were (as many as allow a trial),
        and the last one ended within ``recent_s``."""
        seen = self._load_seen
        return len(seen) == seen.maxlen and sum(seen) >= self.settings.full_needed and self.idle_s() < recent_s

    def idle_s(self) -> float:
        """Seconds since the last batch ended (since the tuner was made, before its first batch)."""
        return self._clock() - self._last_seen

    def estimate(self, size: int, now: float | None = None, width: int | None = None) -> float | None:
        """The estimated batch time under a cap of ``size`` (at ``width``, default the current one): ``size`` times
        the estimated time per image of its fresh samples; None with fewer than ``window``."""
        per_image = self._estimate(Setting(size, self.width if width is None else width),
                                   self._clock() if now is None else now)
        return None if per_image is None else per_image * size

    def snapshot(self) -> TuningSnapshot:
        """The cap, the width, the trial under way and the estimate of every setting with fresh samples."""
        now = self._clock()
        estimates = []
        for setting in sorted(self._samples.copy(), key=lambda s: (s.size, s.width)):  # a copy: see _fresh
            fresh = self._fresh(setting, now)
            if fresh:
                newest = tuple(self._samples[setting])[-1][0]
                per_image = quantile(fresh[-self.settings.window:], self.settings.quantile)
                estimates.append(SizeEstimate(setting.size, per_image * setting.size, len(fresh), now - newest,
                                              setting.width))
        trial = self._trial
        return TuningSnapshot(self.cap, trial.size if trial else 0, tuple(estimates), self.changes, self.trials,
                              self.last_change, self.width, trial.width if trial else 0, len(self.sizes) > 1)

    # ----- internals

    def _under_load(self, batch_size: int, limit: int, compute_s: float, backlog: int, now: float) -> bool:
        """Full, or begun right after the previous batch (the module docstring). Notes this batch's end."""
        began = now - compute_s if math.isfinite(compute_s) and compute_s > 0 else now
        busy = began - self._last_end <= self.settings.busy_gap_s
        self._last_end = now
        # under a cap of 1 every batch fills it, even one request at a time: full only with more waiting
        full = batch_size >= limit and (limit > 1 or backlog > 0)
        return full or (busy and batch_size > 1)

    def _estimate(self, setting: Setting, now: float, end: float = math.inf) -> float | None:
        """The estimate from the last ``window`` fresh samples taken before ``end``; None with fewer."""
        fresh = self._between(setting, now - self.settings.keep_s, end)
        if len(fresh) < self.settings.window:
            return None
        return quantile(fresh[-self.settings.window:], self.settings.quantile)

    def _record(self, setting: Setting, seconds: float, now: float) -> None:
        self._samples.setdefault(setting, deque(maxlen=4 * self.settings.window)).append((now, seconds))

    def _between(self, setting: Setting, start: float, end: float = math.inf) -> list[float]:
        """The samples of ``setting`` taken in ``[start, end)``, oldest first."""
        # A tuple first: the metrics exporter reads this from its own thread while the loop appends.
        return [seconds for at, seconds in tuple(self._samples.get(setting, ())) if start <= at < end]

    def _fresh(self, setting: Setting, now: float) -> list[float]:
        return self._between(setting, now - self.settings.keep_s)

    def _saturated(self) -> bool:
        return len(self._recent_loaded) == self._recent_loaded.maxlen and sum(self._recent_loaded) >= \
            self.settings.full_needed

    def _may_explore(self, now: float) -> bool:
        return now >= self._next_trial_at and self._saturated() and self._estimate(self.setting, now) is not None \
            and self._neighbour(now) is not None

    def _neighbour(self, now: float) -> tuple[int, Setting] | None:
        """(direction, setting) to try: a neighbouring size at the current width, or the current size at another
        width (direction 0), one without a fresh estimate; the direction not tried last time first, and sizes
        and widths by turns."""
        index = self.sizes.index(self.cap)
        sides = [(d, Setting(self.sizes[index + d], self.width)) for d in (-self._last_direction, self._last_direction)
                 if 0 <= index + d < len(self.sizes)]
        widths = [(0, Setting(self.cap, w)) for w in self.widths if w != self.width]
        ordered = sides + widths if self._last_tried_width else widths + sides
        return next(((d, setting) for d, setting in ordered if self._estimate(setting, now) is None), None)

    def _start_trial(self, now: float) -> None:
        side = self._neighbour(now)
        if side is None:
            return
        direction, self._trial = side
        self._last_tried_width = direction == 0
        if direction:
            self._last_direction = direction
        self._trial_started = now
        self._skip_next = True
        self.trials += 1

    def _decide(self, now: float) -> None:
        """The trial against the better of the cap's looks before and after it."""
        trial, window = self._confirming, self.settings.window
        if trial is None:
            self._end_trial(now, 0.0)
            return
        tried = quantile(self._between(trial, self._trial_started)[:window], self.settings.quantile)
        after = quantile(self._between(self.setting, self._trial_ended)[:window], self.settings.quantile)
        before = self._estimate(self.setting, now, end=self._trial_started)  # the cap's first look
        current = after if before is None else min(before, after)
        old_rate, new_rate = 1.0 / current, 1.0 / tried  # images per second: the samples are per image
        gain = new_rate / old_rate - 1.0
        # a larger batch or more threads must earn its latency or its cores; a smaller or fewer is taken unless slower
        up = trial.size > self.cap or trial.width > self.width
        move = gain > self.settings.up_margin if up else gain >= -self.settings.down_tolerance
        self._end_trial(now, max(0.0, -gain))
        if move:
            change = CapChange(self.cap, trial.size, old_rate, new_rate, self.width, trial.width)
            self.cap, self.width = trial.size, trial.width
            self.changes += 1
            self.last_change = change.describe()
            if self._on_change is not None:
                self._on_change(change)

    def _end_trial(self, now: float, loss: float) -> None:
        """Back to the cap; the next trial waits long enough that trials cost at most ``explore_share``."""
        ended = self._trial_ended if self._confirming is not None else now  # the second look runs at the cap
        cost = (ended - self._trial_started) * min(1.0, loss)
        self._next_trial_at = now + max(self.settings.min_gap_s, cost / self.settings.explore_share)
        self._trial = self._confirming = None
        self._skip_next = True
        self._recent_loaded.clear()
