"""``--workers N`` with ``--metrics-port``: one ``/metrics`` for the whole daemon, served by the parent.

Each worker keeps its own registry (its custom collectors, such as queue depths read at scrape time, do not fit
prometheus_client's multiprocess mode) and serves it on a private loopback port that it writes to a file in the
parent's ready directory. On every scrape the parent fetches each worker's page and merges the samples: counters,
histograms and summaries add up; gauges add up when they measure an amount the workers hold separately (queue
depths, bytes, open files), the earliest is kept for start times, and the largest for the rest (the serving
version, a batch cap): see :func:`gauge_merge`. ``classifyd_workers_up`` says how many workers answered, so a
dashboard can tell a sum over fewer workers. Everything here blocks; the exporter runs on its own thread.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("classifyd.workers")
SCRAPE_TIMEOUT_S = 2.0
SUMMED_GAUGE_SUFFIXES = ("_depth", "_limit", "_bytes", "_fds", "_in_flight", "_entries", "_loaded")
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def gauge_merge(name: str) -> Callable[[Iterable[float]], float]:
    """How one gauge's values from several workers become the daemon's value."""
    if name.endswith("_start_time_seconds"):
        return min
    if name.endswith(SUMMED_GAUGE_SUFFIXES):
        return sum
    return max


def merge(pages: Iterable[str]) -> list[Metric]:
    """The metric families of several workers' exposition pages, merged into one daemon's. Raises ValueError
    for a page that is not Prometheus text."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[SampleKey, list[float]]] = {}
    for page in pages:
        for family in text_string_to_metric_families(page):
            kept = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                            family.unit))
            per_sample = values.setdefault(kept.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                per_sample.setdefault(key, []).append(sample.value)
    merged = []
    for name, family in families.items():
        for (sample_name, labels), seen in values[name].items():
            family.add_sample(sample_name, dict(labels), _combine(family.type, sample_name, seen))
        merged.append(family)
    return merged


def _combine(kind: str, sample_name: str, seen: list[float]) -> float:
    if sample_name.endswith("_created"):
        return min(seen)  # the series exists since the first worker created it
    if kind == "gauge":
        return gauge_merge(sample_name)(seen)
    return sum(seen)


class WorkerMetricsCollector(Collector):
    """Scrapes the workers whose metrics ports are written in ``ready_dir`` and yields the merged families."""

    def __init__(self, ready_dir: Path, workers: int) -> None:
        self._ready_dir = ready_dir
        self._workers = workers
        self._fetcher = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="classifyd-metrics-scrape")

    def port_file(self, index: int) -> Path:
        return self._ready_dir / f"worker-{index}.metrics"

    def collect(self) -> Iterator[Metric]:
        pages = list(self._fetcher.map(self._scrape, range(self._workers)))
        up = GaugeMetricFamily("classifyd_workers_up", "Worker processes whose metrics this scrape includes",
                               labels=["worker"])
        for index, page in enumerate(pages):
            up.add_metric([str(index)], 0.0 if page is None else 1.0)
        yield up
        yield from merge(page for page in pages if page is not None)

    def _scrape(self, index: int) -> str | None:
        """One worker's page; None (logged) while it starts, restarts or does not answer in time."""
        try:
            port = int(self.port_file(index).read_text(encoding="ascii"))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
                return reply.read().decode("utf-8")
        except (OSError, ValueError) as exc:
            log.debug("metrics of worker %d not included: %s", index, exc)
            return None

    def close(self) -> None:
        self._fetcher.shutdown(wait=False)


class WorkerMetricsServer:
    """The parent's ``/metrics`` endpoint over its workers."""

    def __init__(self, ready_dir: Path, workers: int) -> None:
        self.collector = WorkerMetricsCollector(ready_dir, workers)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self._http: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve on a background thread; returns the bound port. Raises OSError when it cannot bind."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop the exporter (blocks until its thread has stopped)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.collector.close()
