"""The status page's in-memory statistics, on a controlled clock."""

from __future__ import annotations

from server.core.lifecycle import EventKind, ModelEvent
from server.ops.stats import LATENCY_SAMPLES, EventLog, StatsCollector, batch_bucket


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_batch_buckets_are_powers_of_two() -> None:
    sizes = [1, 2, 3, 4, 5, 8, 9, 16, 64, 65, 256, 257, 10_000]
    assert [batch_bucket(s) for s in sizes] == ["1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "9-16", "33-64",
                                                "65-128", "129-256", "257+", "257+"]


def test_rate_covers_the_last_ten_seconds_and_latency_the_last_samples() -> None:
    clock = Clock()
    stats = StatsCollector(clock)
    for n in range(30):  # 30 requests over the first 3 s, at 1 ms each
        clock.now = 1_000_000.0 + n * 0.1
        stats.observe("m", 2, 3, 0.001)
    snapshot = stats.snapshot("m", max_batch_size=8)
    assert snapshot["requests"] == 30 and snapshot["requests_per_s"] == 3.0
    assert snapshot["batch_sizes"] == {"1": 0, "2": 0, "3-4": 30, "5-8": 0}
    assert snapshot["latency_ms"] == {"p50": 1.0, "p90": 1.0, "p99": 1.0} and snapshot["last_version"] == 2
    clock.now += 20
    assert stats.snapshot("m")["requests_per_s"] == 0.0  # nothing in the last 10 s
    for _ in range(LATENCY_SAMPLES):
        stats.observe("m", 2, 1, 0.005)
    assert stats.snapshot("m")["latency_ms"]["p99"] == 5.0  # the old 1 ms samples have left the window
    assert stats.snapshot("unknown")["requests"] == 0


def test_event_log_keeps_the_newest_first_and_is_bounded() -> None:
    log = EventLog(size=3)
    for version in range(1, 6):
        log.record(ModelEvent("m", version, EventKind.READY, "", True, time=float(version)))
    recent = log.recent()
    assert [e["version"] for e in recent] == [5, 4, 3]
    assert recent[0] == {"time_unix_ms": 5000, "model": "m", "version": 5, "kind": "READY", "reason": "",
                         "serving": True}
    assert len(log.recent(2)) == 2
