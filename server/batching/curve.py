"""Batch-time curves: the pure maths of choosing a batch cap from measured batch times.

Standard library only; measured by :mod:`server.models.loader.autotune`, read by the runtime and by
latency-target policies. Nothing here blocks.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TOLERANCE = 0.05
"""The knee is the smallest batch size within this fraction of the best measured throughput."""


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
    ceiling: int = 0
    """The largest size the ladder could try (0: unknown, the largest measured); bounds online tuning."""

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


def falling(throughput: Mapping[int, float], tolerance: float) -> bool:
    """Whether the last two sizes are both clearly past the knee (further sizes would only cost time)."""
    rates = list(throughput.values())
    floor = (1.0 - 2 * tolerance) * max(rates)
    return len(rates) >= 3 and rates[-1] < floor and rates[-2] < floor
