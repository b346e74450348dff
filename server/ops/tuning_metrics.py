"""The online batch-cap tuner's figures as Prometheus metrics, read when ``/metrics`` is scraped.

Documented in docs/metrics.md. One series set per model whose serving version tunes its cap while serving
(server/batching/online.py); batch-size labels are bounded by the model's ladder (1, 2, 4, … its ceiling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class TuningFigures:
    """One model's tuner, in plain numbers."""

    cap: int
    exploring: int
    changes: int
    trials: int
    batch_seconds: Mapping[int, float]
    """The estimated batch time of every size with recent samples (at the current thread count)."""
    threads: int = 0
    """The torch threads its batches run on, when the tuner chooses them (CPU, torch runtime); else 0."""
    cap_online: bool = True
    """False for a pinned cap (only its threads are tuned): no cap, trial or estimate series then."""


TuningSource = Callable[[], Mapping[str, TuningFigures]]
"""Per model: its tuner's figures. Called from the exporter's thread."""


class TuningCollector(Collector):
    """Cap, trial, changes and the estimates per batch size, from ``source`` at scrape time."""

    def __init__(self, source: TuningSource) -> None:
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cap = GaugeMetricFamily("classifyd_batch_cap", "The batch cap the online tuner keeps (max_batch_size)",
                                labels=["model"])
        exploring = GaugeMetricFamily("classifyd_batch_cap_exploring", "The batch size on trial now (0: none; the cap "
                                      "itself during a trial of the other thread count)",
                                      labels=["model"])
        changes = CounterMetricFamily("classifyd_batch_cap_changes", "Times the online tuner moved the cap or the "
                                      "torch threads",
                                      labels=["model"])
        trials = CounterMetricFamily("classifyd_batch_cap_trials", "Neighbouring batch sizes (or the other thread "
                                     "count) the online tuner tried", labels=["model"])
        estimate = GaugeMetricFamily("classifyd_batch_estimate_seconds", "Estimated compute time of one batch "
                                     "under that cap, from its recent batches under load",
                                     labels=["model", "batch_size"])
        threads = GaugeMetricFamily("classifyd_batch_threads", "The torch threads per batch the online tuner "
                                    "keeps (0: not tuned: GPU, ONNX Runtime, one core)", labels=["model"])
        for model, figures in sorted(self._source().items()):
            threads.add_metric([model], figures.threads)
            changes.add_metric([model], figures.changes)
            trials.add_metric([model], figures.trials)
            if not figures.cap_online:
                continue
            cap.add_metric([model], figures.cap)
            exploring.add_metric([model], figures.exploring)
            for size, seconds in sorted(figures.batch_seconds.items()):
                estimate.add_metric([model, str(size)], seconds)
        yield from (cap, exploring, changes, trials, estimate, threads)
