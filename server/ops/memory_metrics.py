"""The memory budget's figures as Prometheus metrics (server/models/memory_budget.py), read when ``/metrics`` is
scraped. Documented in docs/metrics.md. Model labels are bounded by the models loaded and evicted."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class MemoryFigures:
    """What the exporter shows: the measured versions held, the evictions per model and the budget."""

    held: list[tuple[str, int, int]] = field(default_factory=list)
    """(model, version, bytes) of every measured version not yet released."""
    evictions: dict[str, int] = field(default_factory=dict)
    budget_bytes: int = 0
    """--max-loaded-bytes; 0: no budget."""


class MemoryCollector(Collector):
    """Loaded bytes per version, evictions per model and the budget; ``source`` must be safe to call from the
    exporter's thread."""

    def __init__(self, source: Callable[[], MemoryFigures]) -> None:
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        figures = self._source()
        loaded = GaugeMetricFamily("classifyd_model_loaded_bytes", "Memory of a loaded version, measured after its "
                                   "warm-up (host memory on CPU, device memory on GPU)", labels=["model", "version"])
        for model, version, size in figures.held:
            loaded.add_metric([model, str(version)], size)
        yield loaded
        evictions = CounterMetricFamily("classifyd_model_evictions", "Models unloaded to keep within "
                                        "--max-loaded-bytes", labels=["model"])
        for model, count in sorted(figures.evictions.items()):
            evictions.add_metric([model], count)
        yield evictions
        yield GaugeMetricFamily("classifyd_max_loaded_bytes", "--max-loaded-bytes: the memory budget of the loaded "
                                "versions (0: none)", value=figures.budget_bytes)
