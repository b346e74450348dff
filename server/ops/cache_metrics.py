"""The response cache's figures as Prometheus metrics, read from the cache when ``/metrics`` is scraped.

Documented in docs/metrics.md. Model labels are bounded: a model appears only once one of its requests was looked
up, and only models whose manifest enables ``[cache]`` are looked up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.ops.response_cache import CacheStats


class CacheCollector(Collector):
    """Lookups by result, hit ratio, bytes, entries, budget and evictions; ``source`` is ``ResponseCache.stats``
    (safe from the exporter's thread)."""

    def __init__(self, source: Callable[[], CacheStats]) -> None:
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._source()
        lookups = CounterMetricFamily("classifyd_cache_lookups", "Response-cache lookups of requests to models "
                                      "with [cache] enabled, by result (hit or miss)", labels=["model", "result"])
        ratio = GaugeMetricFamily("classifyd_cache_hit_ratio", "Hits / lookups of the model's requests since the "
                                  "daemon started", labels=["model"])
        for model, counts in sorted(stats.models.items()):
            lookups.add_metric([model, "hit"], counts.hits)
            lookups.add_metric([model, "miss"], counts.misses)
            ratio.add_metric([model], stats.hit_rate(model) or 0.0)
        yield lookups
        yield ratio
        yield GaugeMetricFamily("classifyd_cache_bytes", "Estimated bytes of the cached answers",
                                value=stats.bytes)
        yield GaugeMetricFamily("classifyd_cache_budget_bytes", "--cache-bytes: the most the cached answers may "
                                "take (0: the cache is off)", value=stats.budget_bytes)
        yield GaugeMetricFamily("classifyd_cache_entries", "Answers in the cache", value=stats.entries)
        yield CounterMetricFamily("classifyd_cache_evictions", "Answers dropped, least recently used first, to keep "
                                  "the cache within --cache-bytes", value=stats.evictions)
