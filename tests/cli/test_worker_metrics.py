"""The parent's /metrics under ``--workers``: merging the workers' pages (the live daemon is in test_workers.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.cli.worker_metrics import WorkerPage, gauge_merge, merge, merge_pages


def worker_page(requests: int, depth: int, serving: int, latencies: list[float], started: float = 1.0,
                hits: int = 0, misses: int = 0) -> str:
    registry = CollectorRegistry()
    Gauge("process_start_time_seconds", "start", registry=registry).set(started)
    lookups = Counter("classifyd_cache_lookups", "lookups", ["model", "result"], registry=registry)
    lookups.labels("m", "hit").inc(hits)
    lookups.labels("m", "miss").inc(misses)
    Gauge("classifyd_cache_hit_ratio", "ratio", ["model"], registry=registry).labels("m").set(
        hits / (hits + misses) if hits + misses else 0.0)
    Counter("classifyd_requests", "answered", ["model"], registry=registry).labels("m").inc(requests)
    Gauge("classifyd_queue_depth", "waiting", ["model"], registry=registry).labels("m").set(depth)
    Gauge("classifyd_model_serving_version", "serving", ["model"], registry=registry).labels("m").set(serving)
    histogram = Histogram("classifyd_request_latency_seconds", "time", ["model"], buckets=(0.1, 1.0),
                          registry=registry)
    for seconds in latencies:
        histogram.labels("m").observe(seconds)
    return generate_latest(registry).decode()


def merged_values(*pages: str) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()

    class Merged:
        def collect(self):
            return merge_pages(pages)

    registry.register(Merged())
    exposed = generate_latest(registry).decode()  # what the parent serves must be valid exposition text again
    return {(s.name, s.labels.get("le", "")): s.value
            for family in text_string_to_metric_families(exposed) for s in family.samples}


def test_counters_and_histograms_add_up_and_gauges_follow_their_rule() -> None:
    values = merged_values(worker_page(3, 2, 4, [0.05, 0.5]), worker_page(5, 1, 4, [2.0]))
    assert values[("classifyd_requests_total", "")] == 8
    assert values[("classifyd_queue_depth", "")] == 3  # each worker's own queue: the daemon holds both
    assert values[("classifyd_model_serving_version", "")] == 4  # the same version, not 8
    assert values[("classifyd_request_latency_seconds_bucket", "0.1")] == 1
    assert values[("classifyd_request_latency_seconds_bucket", "1.0")] == 2
    assert values[("classifyd_request_latency_seconds_bucket", "+Inf")] == 3
    assert values[("classifyd_request_latency_seconds_count", "")] == 3
    assert values[("classifyd_request_latency_seconds_sum", "")] == 2.55


def test_gauge_rules() -> None:
    assert gauge_merge("process_start_time_seconds")([5.0, 3.0]) == 3.0
    assert gauge_merge("process_resident_memory_bytes")([5.0, 3.0]) == 8.0
    assert gauge_merge("classifyd_batch_cap")([8.0, 4.0]) == 8.0


def test_a_missing_worker_leaves_the_others() -> None:
    assert merged_values(worker_page(3, 2, 4, []))[("classifyd_requests_total", "")] == 3
    assert merge_pages([]) == []


def reported(*pages: WorkerPage) -> dict[str, float]:
    return {s.name: s.value for family in merge(pages) for s in family.samples if not s.labels.get("le")}


def test_a_restarted_worker_adds_to_what_its_predecessor_counted() -> None:
    first, second = WorkerPage(), WorkerPage()
    first.update(worker_page(10, 0, 1, [], started=100.0))
    second.update(worker_page(7, 0, 1, [], started=100.0))
    assert reported(first, second)["classifyd_requests_total"] == 17
    first.update(worker_page(2, 0, 1, [], started=200.0))  # worker 0 died and was restarted: it counts from 0
    assert reported(first, second)["classifyd_requests_total"] == 19  # 10 carried + 2 + 7: never down
    first.update(worker_page(5, 0, 1, [], started=200.0))
    assert reported(first, second)["classifyd_requests_total"] == 22


def test_the_hit_ratio_is_the_daemons_not_the_best_workers() -> None:
    values = merged_values(worker_page(1, 0, 1, [], hits=9, misses=1), worker_page(1, 0, 1, [], hits=1, misses=9))
    assert values[("classifyd_cache_hit_ratio", "")] == 0.5  # 10 hits of 20, not max(0.9, 0.1)
