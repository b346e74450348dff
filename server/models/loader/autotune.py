"""Auto-tuned batch cap: measure a version's batch-time curve at load time and cap its batches at the knee.

Bigger batches are not always faster (on a 2-core CPU resnet18 peaks at batch 4; on an H100 it keeps gaining up
to 256), so the cap is measured per model and device instead of guessed. The pure parts (:func:`choose_knee`,
:func:`best_rates`, :class:`BatchCurve`, :func:`plan_for`) are unit-tested on synthetic curves; :func:`measure`
times a ladder of batch sizes; :func:`tune` runs it, one forward pass at a time on the inference thread, after
warm-up and validation and before the version goes live, so the version already serving keeps answering. At
start-up nothing serves yet, so readiness comes first: :class:`TuneQueue` measures the curves afterwards, one
version at a time, while the versions serve with their provisional caps.

No torch here: forward passes go through ``LoadedVersion.predict``; the curve maths is :mod:`server.batching.curve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.batching.curve import TOLERANCE, BatchCurve, BatchPoint, best_rates, choose_knee, falling, ladder
from server.core.config import CPU_CEILING, GPU_CEILING, AutotuneDefaults
from server.core.manifest import BatchingSpec
from server.inference.devices import InferenceThreads
from server.inference.runtime import InferenceThread, LoadedVersion

log = logging.getLogger("classifyd.autotune")

REPEATS = 3
"""Timed runs per batch size at least (after one untimed run); the fastest is the size's batch time."""
MIN_TIME_PER_SIZE_S = 0.05
"""Cheap sizes repeat until their timed runs add up to this (at most MAX_REPEATS): more chances of a clean run."""
MAX_REPEATS = 15
FAILED = "failed: "
"""In the ladder's stop reason after the batch size that raised (out of memory)."""


@dataclass(frozen=True)
class TunePlan:
    """What to do with one version at load time."""

    cap: int
    """The batch cap to warm up with, and to keep unless ``choose_cap``."""
    measure: bool
    choose_cap: bool
    ceiling: int
    budget_s: float


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
            return samples, f"batch {size} {FAILED}{exc}"
        samples[size] = times
        if stop_when_falling and falling(best_rates(samples), tolerance):
            return samples, f"throughput fell at the last two sizes (up to {size})"
    return samples, ""


def timed_predict(version: LoadedVersion, size: int) -> float:
    """Seconds one ``predict`` of ``size`` blank images takes. Blocks: call it on the inference thread."""
    spec = version.manifest.input
    blanks = [np.zeros((spec.height, spec.width, spec.channels), dtype=np.uint8)] * size
    begin = time.perf_counter()
    version.predict(blanks)
    return time.perf_counter() - begin


def curve_from(samples: Mapping[int, Sequence[float]], plan: TunePlan, stopped: str,
               tolerance: float = TOLERANCE) -> BatchCurve:
    """The curve of fastest runs, with the knee as the cap when the plan chooses it."""
    points = tuple(BatchPoint(size, min(times)) for size, times in sorted(samples.items()))
    chosen = choose_knee(best_rates(samples), tolerance) if plan.choose_cap else plan.cap
    # a size that failed (out of memory) bounds the online tuner too: it may explore only sizes that ran
    ceiling = max(samples) if f" {FAILED}" in stopped else plan.ceiling
    return BatchCurve(points, chosen, plan.choose_cap, stopped, ceiling)


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
    version.tuner = None  # a new curve (a runtime switch re-measures) seeds a new online tuner with its knee
    how = "knee of the curve" if curve.autotuned else "pinned"
    note = f"; ladder stopped: {stopped}" if stopped else ""
    log.info("model %s version %d: batch curve (size:images/s) %s; max_batch_size %d (%s), measured in %.2f s%s",
             version.name, version.version, curve.describe(), curve.chosen, how, time.monotonic() - started, note)
    return curve


class TuneQueue:
    """Measurements deferred past readiness (start-up) or past a runtime switch: run one at a time, in the order
    scheduled, so that two models' curves never disturb each other. Each runs :func:`tune` on the inference thread;
    until it ends the version serves with its provisional cap (the manifest's, else the server's default)."""

    def __init__(self, inference: InferenceThreads, *, poll_s: float = 0.25) -> None:
        """``poll_s``: how often a measurement waiting for a pause in its version's batches looks again."""
        self._inference = inference  # each measurement on its version's device's thread
        self._turn = asyncio.Lock()  # FIFO: waiters acquire in the order they asked
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll_s = poll_s

    def schedule(self, version: LoadedVersion, plan: TunePlan, *, after_pause_s: float = 0.0) -> None:
        """Queue ``version``'s measurement; with ``after_pause_s``, it waits until the version's batches (as its
        online tuner saw them) have paused that long. Call on the event loop; never blocks, never raises."""
        when = f", once its batches pause for {after_pause_s:g} s" if after_pause_s else ""
        log.info("model %s version %d: serving with provisional max_batch_size %d; batch curve queued (budget %g s)%s",
                 version.name, version.version, version.max_batch_size, plan.budget_s, when)
        task = asyncio.get_running_loop().create_task(self._run(version, plan, after_pause_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pause(self, version: LoadedVersion, seconds: float) -> None:
        """Return once ``version`` has run no batch for ``seconds`` (at once without a tuner: nothing to go by)."""
        while not version.released and (tuner := version.tuner) is not None and tuner.idle_s() < seconds:
            await asyncio.sleep(self._poll_s)

    async def _run(self, version: LoadedVersion, plan: TunePlan, after_pause_s: float) -> None:
        if after_pause_s:
            await self._pause(version, after_pause_s)  # outside the turn: other versions' measurements go first
        async with self._turn:
            if version.released:  # retired before its turn: nothing to measure
                return
            try:
                await tune(version, self._inference.for_version(version), plan)
            except Exception as exc:  # noqa: BLE001 - a failed measurement keeps the provisional cap; it serves on
                if not version.released:
                    log.warning("model %s version %d: batch curve not measured (%s); keeping max_batch_size %d",
                                version.name, version.version, exc, version.max_batch_size)

    async def wait(self) -> None:
        """Block until every queued measurement has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def cancel(self) -> None:
        """Drop the queued and running measurements (the daemon is stopping)."""
        for task in list(self._tasks):
            task.cancel()
