"""Small in-memory statistics for the status page: per-model throughput, latency and batch sizes, recent events.

Fed by :class:`server.service.ClassifierService`'s observer hook (so gRPC and HTTP requests alike) and by the model
manager's listeners. Everything here is called on the event loop only, so it needs no locks, and every structure is
bounded. It is deliberately independent of the Prometheus metrics: it keeps only what the page shows.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.lifecycle import ModelEvent

RATE_WINDOW_S = 10
LATENCY_SAMPLES = 1000
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(size: int) -> str:
    """The histogram bucket of a batch size: "1", "2", "3-4", "5-8", ..., "257+"."""
    lower = 1
    for upper in BATCH_BUCKETS:
        if size <= upper:
            return str(upper) if lower == upper else f"{lower}-{upper}"
        lower = upper + 1
    return f"{lower}+"


@dataclass
class ModelStats:
    """What one model has served since the daemon started."""

    requests: int = 0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    per_second: deque[list[int]] = field(default_factory=deque)  # [unix second, requests completed in it]
    batch_sizes: Counter[str] = field(default_factory=Counter)
    last_version: int = 0

    def add(self, version: int, batch_size: int, latency_s: float, now: float) -> None:
        self.requests += 1
        self.last_version = version
        self.latencies_s.append(latency_s)
        self.batch_sizes[batch_bucket(batch_size)] += 1
        second = int(now)
        if self.per_second and self.per_second[-1][0] == second:
            self.per_second[-1][1] += 1
        else:
            self.per_second.append([second, 1])
        while self.per_second and self.per_second[0][0] <= second - RATE_WINDOW_S:
            self.per_second.popleft()

    def snapshot(self, now: float, max_batch_size: int = 1) -> dict[str, Any]:
        """JSON-ready: totals, requests/s over the last seconds, latency percentiles, and the batch-size histogram
        (requests by the size of the batch that computed them; every bucket up to ``max_batch_size`` listed)."""
        recent = sum(count for second, count in self.per_second if second > int(now) - RATE_WINDOW_S)
        latencies = np.asarray(self.latencies_s, dtype=np.float64) * 1000.0
        percentiles = dict.fromkeys(("p50", "p90", "p99"), None)
        if latencies.size:
            values = np.percentile(latencies, [50, 90, 99])
            percentiles = {k: round(float(v), 3) for k, v in zip(percentiles, values, strict=True)}
        last = batch_bucket(max_batch_size)
        buckets = list(map(batch_bucket, (*BATCH_BUCKETS, BATCH_BUCKETS[-1] + 1)))
        shown = buckets[:buckets.index(last) + 1]
        ordered = {b: self.batch_sizes[b] for b in buckets if b in shown or self.batch_sizes[b]}
        return {"requests": self.requests, "requests_per_s": round(recent / RATE_WINDOW_S, 2),
                "latency_ms": percentiles, "latency_samples": int(latencies.size),
                "batch_sizes": ordered, "last_version": self.last_version}


class StatsCollector:
    """Per-model request statistics. :meth:`observe` is the service's observer callback."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._models: dict[str, ModelStats] = {}

    def observe(self, model: str, version: int, batch_size: int, latency_s: float) -> None:
        """Record one answered request: the version and batch that computed it, its end-to-end latency."""
        self._models.setdefault(model, ModelStats()).add(version, batch_size, latency_s, self._clock())

    def snapshot(self, model: str, max_batch_size: int = 1) -> dict[str, Any]:
        """The model's statistics, JSON-ready (zeros for a model that has served nothing)."""
        return self._models.get(model, ModelStats()).snapshot(self._clock(), max_batch_size)


class EventLog:
    """The last model events (loads, swaps, failures), newest last. ``record`` is a manager listener."""

    def __init__(self, size: int = 100) -> None:
        self._events: deque[ModelEvent] = deque(maxlen=size)

    def record(self, event: ModelEvent) -> None:
        self._events.append(event)

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events, newest first, JSON-ready."""
        events = list(self._events)[::-1][:limit]
        return [{"time_unix_ms": round(e.time * 1000), "model": e.model, "version": e.version,
                 "kind": e.kind.name, "reason": e.reason, "serving": e.serving} for e in events]
