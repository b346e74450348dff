"""Per model version counts and durations, as Triton's statistics extension reports them (``ModelStatistics``).

Fed with every answered request (:class:`RequestReport`: success or failure, its queue, preprocessing and compute
times) and every forward pass (:class:`BatchReport`: executions, inferences, per batch size). Event loop only, so no
locks; bounded by the model versions the daemon has served (a few numbers each, one entry per batch size).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.core.errors import Status
from server.core.types import BatchReport, RequestReport

NS = 1_000_000_000


@dataclass
class Duration:
    """A count and the total time of what was counted."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * NS))


@dataclass
class VersionStats:
    """What one model version has done since the daemon started."""

    success: Duration = field(default_factory=Duration)
    """Requests answered, end to end at the edge."""
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    """Preprocessing (decode, resize, normalise)."""
    compute_infer: Duration = field(default_factory=Duration)
    """The forward pass of the batch each request rode in."""
    cache_hit: Duration = field(default_factory=Duration)
    """Requests answered from the response cache (neither queued nor computed)."""
    inference_count: int = 0
    """Images computed (the sum of the batch sizes)."""
    execution_count: int = 0
    """Forward passes."""
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    """Forward passes by batch size."""


class InferenceStats:
    """Statistics per (model, version). :meth:`request_done` is a request observer, :meth:`batch_done` a batch
    listener. ``clock`` (seconds since the epoch) is injected by tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._versions: dict[tuple[str, int], VersionStats] = {}
        self._last_version: dict[str, int] = {}

    def request_done(self, report: RequestReport) -> None:
        """Count one answered request; a failure that named no version counts against the model's latest version
        seen (an unknown model's failures are not kept: they would grow without bound)."""
        result = report.result
        if report.code is Status.OK and result is not None:
            stats = self._stats(result.model, result.version)
            stats.success.add(report.seconds)
            stats.last_inference_ms = round(self._clock() * 1000)
            if result.cache_hit:
                stats.cache_hit.add(report.seconds)
                return
            stats.queue.add(result.queue_s)
            stats.compute_input.add(result.preprocess_s)
            stats.compute_infer.add(result.compute_s)
            return
        version = report.version or self._last_version.get(report.model, 0)
        if (report.model, version) in self._versions:
            self._versions[(report.model, version)].fail.add(report.seconds)

    def batch_done(self, report: BatchReport) -> None:
        """Count one forward pass of ``report.size`` images."""
        stats = self._stats(report.model, report.version)
        stats.execution_count += 1
        stats.inference_count += report.size
        stats.batches.setdefault(report.size, Duration()).add(report.seconds)

    def _stats(self, model: str, version: int) -> VersionStats:
        self._last_version[model] = max(version, self._last_version.get(model, 0))
        return self._versions.setdefault((model, version), VersionStats())

    def of(self, model: str, version: int) -> VersionStats:
        """The statistics of one version (zeros when it has done nothing)."""
        return self._versions.get((model, version), VersionStats())

    def versions(self, model: str) -> list[int]:
        """The versions of ``model`` that have statistics, oldest first."""
        return sorted(v for m, v in self._versions if m == model)
