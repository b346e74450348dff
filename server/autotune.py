"""Auto-tuned batch cap: measure a version's batch-time curve at load time and cap its batches at the knee.

Bigger batches are not always faster (on a 2-core CPU resnet18 peaks at batch 4; on an H100 it keeps gaining up
to 256), so the cap is measured per model and device instead of guessed. The pure parts (:func:`choose_knee`,
:func:`best_rates`, :class:`BatchCurve`, :func:`plan_for`) are unit-tested on synthetic curves; :func:`measure`
times a ladder of batch sizes; :func:`tune` runs it, one forward pass at a time on the inference thread, after
warm-up and validation and before the version goes live, so the version already serving keeps answering.

No torch here: forward passes go through ``LoadedVersion.predict``.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from server.manifest import BatchingSpec

if TYPE_CHECKING:
    from server.runtime import InferenceThread, LoadedVersion

log = logging.getLogger("classifyd.autotune")

TOLERANCE = 0.05
"""The knee is the smallest batch size within this fraction of the best measured throughput."""
REPEATS = 3
"""Timed runs per batch size at least (after one untimed run); the fastest is the size's batch time."""
MIN_TIME_PER_SIZE_S = 0.05
"""Cheap sizes repeat until their timed runs add up to this (at most MAX_REPEATS): more chances of a clean run."""
MAX_REPEATS = 15
DEFAULT_BUDGET_S = 3.0
CPU_CEILING = 64
GPU_CEILING = 256


@dataclass(frozen=True)
class AutotuneDefaults:
    """The server's autotune settings, for manifests that leave them out."""

    enabled: bool = True
    budget_s: float = DEFAULT_BUDGET_S
    max_batch_size: int | None = None
    """Largest size of the ladder; None: 256 on a GPU, 64 on a CPU."""


@dataclass(frozen=True)
class TunePlan:
    """What to do with one version at load time."""

    cap: int
    """The batch cap to warm up with, and to keep unless ``choose_cap``."""
    measure: bool
    choose_cap: bool
    ceiling: int
    budget_s: float


@dataclass(frozen=True)
class BatchPoint:
    """The time of one forward pass at one batch size (the fastest of the repeated runs)."""

    batch_size: int
    batch_s: float

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.batch_s


@dataclass(frozen=True)
class BatchCurve:
    """A version's measured batch-time curve and the cap chosen from it."""

    points: tuple[BatchPoint, ...]
    chosen: int
    autotuned: bool
    """True when ``chosen`` is the knee; False when the cap was pinned and the curve only feeds a latency target."""
    stopped: str = ""
    """Why the ladder ended before its ceiling ('' when it reached it)."""

    def estimate(self, batch_size: int) -> float:
        """Seconds one forward pass of ``batch_size`` items is expected to take. Never blocks.

        Linear between measured sizes; below the smallest, the smallest's time; beyond the largest, the last
        segment's slope extended (at least that size's time per item).
        """
        sizes = [p.batch_size for p in self.points]
        times = [p.batch_s for p in self.points]
        i = bisect.bisect_left(sizes, batch_size)
        if i < len(sizes) and sizes[i] == batch_size:
            return times[i]
        if i == 0:
            return times[0]
        if i == len(sizes):
            per_item = times[-1] / sizes[-1]
            if len(sizes) > 1:
                per_item = max(per_item, (times[-1] - times[-2]) / (sizes[-1] - sizes[-2]))
            return times[-1] + (batch_size - sizes[-1]) * per_item
        share = (batch_size - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return times[i - 1] + share * (times[i] - times[i - 1])

    def describe(self) -> str:
        """One line for the log: ``1:61 2:72 4:82* 8:71`` (images/s, the chosen size starred)."""
        return " ".join(f"{p.batch_size}:{p.images_per_second:.0f}{'*' if p.batch_size == self.chosen else ''}"
                        for p in self.points)


def ladder(ceiling: int) -> list[int]:
    """Batch sizes 1, 2, 4, … up to ``ceiling``, ending with ``ceiling`` itself."""
    sizes, size = [], 1
    while size < ceiling:
        sizes.append(size)
        size *= 2
    return [*sizes, ceiling]


def best_rates(samples: Mapping[int, Sequence[float]]) -> dict[int, float]:
    """Throughput (items/s) per batch size from repeated batch times, each size by its fastest run.

    Noise on a shared machine only ever adds time (another process took the core, the GIL was busy): the
    fastest run is the one closest to what the model and device cost, and slowed runs, however many, drop out.
    """
    return {size: size / min(times) for size, times in sorted(samples.items()) if times}


def choose_knee(throughput: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose throughput is within ``tolerance`` of the best. Raises ValueError if empty."""
    if not throughput:
        raise ValueError("no measured batch sizes")
    best = max(throughput.values())
    return min(size for size, rate in throughput.items() if rate >= (1.0 - tolerance) * best)


def plan_for(batching: BatchingSpec, defaults: AutotuneDefaults, fallback_cap: int, device_type: str) -> TunePlan:
    """Decide from the manifest and the server's settings whether to measure and whether to choose the cap.

    A pinned ``max_batch_size`` or ``autotune = false`` keeps the cap (``fallback_cap`` when none is pinned);
    the curve is still measured, up to that cap, when a ``latency_target_ms`` needs it. Never blocks.
    """
    budget = batching.autotune_budget_s or defaults.budget_s
    enabled = defaults.enabled if batching.autotune is None else batching.autotune
    if batching.max_batch_size is not None or not enabled:
        cap = batching.max_batch_size or fallback_cap
        return TunePlan(cap, batching.latency_target_ms is not None, False, cap, budget)
    ceiling = (batching.autotune_max_batch_size or defaults.max_batch_size
               or (GPU_CEILING if device_type == "cuda" else CPU_CEILING))
    return TunePlan(min(fallback_cap, ceiling), True, True, ceiling, budget)


TimeBatch = Callable[[int], Awaitable[float]]
"""Runs one forward pass of the given batch size and returns how many seconds it took."""


async def measure(time_batch: TimeBatch, sizes: Sequence[int], budget_s: float, *, repeats: int = REPEATS,
                  min_time_s: float = MIN_TIME_PER_SIZE_S, tolerance: float = TOLERANCE,
                  stop_when_falling: bool = True,
                  clock: Callable[[], float] = time.monotonic) -> tuple[dict[int, list[float]], str]:
    """Time ``time_batch(size)`` for each size in ascending ``sizes``, within about ``budget_s`` of ``clock``.

    Each size gets one untimed run (the first call at a new shape pays for allocations) and ``repeats`` timed
    ones, more (up to MAX_REPEATS) while they add up to less than ``min_time_s``. Each run is its own await, so a
    caller that runs them on a shared thread lets other work in between. The ladder stops early when the next
    size would not fit in the remaining budget (its cost extrapolated linearly from the last size), when
    throughput stayed clearly below the best at two sizes in a row (unless ``stop_when_falling`` is False:
    benchmarks want the whole curve), or when a run raises RuntimeError (out of memory) at a size above the
    first. Returns the batch times per size and why the ladder stopped ('' when it reached the end). Raises
    whatever the runs raise at the first size.
    """
    started = clock()
    samples: dict[int, list[float]] = {}
    for size in sizes:
        if samples:
            last = max(samples)
            one = min(samples[last]) * size / last
            if clock() - started + max(one * (repeats + 1), one + min_time_s) > budget_s:
                return samples, f"time budget of {budget_s:g} s reached before batch {size}"
        try:
            await time_batch(size)
            times: list[float] = []
            while len(times) < repeats or (sum(times) < min_time_s and len(times) < MAX_REPEATS):
                times.append(await time_batch(size))
        except RuntimeError as exc:
            if not samples:
                raise
            return samples, f"batch {size} failed: {exc}"
        samples[size] = times
        if stop_when_falling and _falling(best_rates(samples), tolerance):
            return samples, f"throughput fell at the last two sizes (up to {size})"
    return samples, ""


def timed_predict(version: LoadedVersion, size: int) -> float:
    """Seconds one ``predict`` of ``size`` blank images takes. Blocks: call it on the inference thread."""
    spec = version.manifest.input
    blanks = [np.zeros((spec.height, spec.width, spec.channels), dtype=np.uint8)] * size
    begin = time.perf_counter()
    version.predict(blanks)
    return time.perf_counter() - begin


def _falling(throughput: Mapping[int, float], tolerance: float) -> bool:
    """Whether the last two sizes are both clearly past the knee (further sizes would only cost time)."""
    rates = list(throughput.values())
    floor = (1.0 - 2 * tolerance) * max(rates)
    return len(rates) >= 3 and rates[-1] < floor and rates[-2] < floor


def curve_from(samples: Mapping[int, Sequence[float]], plan: TunePlan, stopped: str,
               tolerance: float = TOLERANCE) -> BatchCurve:
    """The curve of fastest runs, with the knee as the cap when the plan chooses it."""
    points = tuple(BatchPoint(size, min(times)) for size, times in sorted(samples.items()))
    chosen = choose_knee(best_rates(samples), tolerance) if plan.choose_cap else plan.cap
    return BatchCurve(points, chosen, plan.choose_cap, stopped)


async def tune(version: LoadedVersion, inference: InferenceThread, plan: TunePlan) -> BatchCurve | None:
    """Measure ``version`` and set its ``max_batch_size`` and ``batch_curve``; takes about ``plan.budget_s``.

    Every run is a separate task on the inference thread, so the batches of versions already serving go in
    between them instead of waiting for the whole ladder. Returns None (and changes nothing) when the plan
    measures nothing. Raises what ``predict`` raises at batch size 1.
    """
    if not plan.measure:
        return None
    started = time.monotonic()
    samples, stopped = await measure(lambda size: inference.run(timed_predict, version, size),
                                     ladder(plan.ceiling), plan.budget_s)
    curve = curve_from(samples, plan, stopped)
    version.batch_curve = curve
    version.max_batch_size = curve.chosen
    how = "knee of the curve" if curve.autotuned else "pinned"
    note = f"; ladder stopped: {stopped}" if stopped else ""
    log.info("model %s version %d: batch curve (size:images/s) %s; max_batch_size %d (%s), measured in %.2f s%s",
             version.name, version.version, curve.describe(), curve.chosen, how, time.monotonic() - started, note)
    return curve
