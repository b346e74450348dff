"""``--workers N`` with ``--metrics-port``: one ``/metrics`` for the whole daemon, served by the parent.

Each worker keeps its own registry (its custom collectors, such as queue depths read at scrape time, do not fit
prometheus_client's multiprocess mode) and serves it on a private loopback port that it writes to a file in the
parent's ready directory. On every scrape the parent fetches each worker's page and merges the samples: counters,
histograms and summaries add up; gauges add up when they measure an amount the workers hold separately (queue
depths, bytes, open files), the earliest is kept for start times, and the largest for the rest (the serving
version, a batch cap): see :func:`gauge_merge`; the cache's hit ratio is derived again from the summed lookups.
Counters never go down: a worker that does not answer keeps its last page in the sums, and a restarted worker's
counts are added to what its predecessor had counted (:class:`WorkerPage`). ``classifyd_workers_up`` says which
workers this scrape heard. Everything here blocks; the exporter runs on its own thread.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from server.ops.metrics import Exporter

log = logging.getLogger("classifyd.workers")
SCRAPE_TIMEOUT_S = 2.0
SUMMED_GAUGE_SUFFIXES = ("_depth", "_limit", "_bytes", "_fds", "_in_flight", "_entries", "_loaded")
SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]
"""(family name, sample name, sorted labels)."""
START_TIME = ("process_start_time_seconds", "process_start_time_seconds", ())
HIT_RATIO = "classifyd_cache_hit_ratio"
LOOKUPS = "classifyd_cache_lookups"


@dataclass(frozen=True)
class FamilyInfo:
    """What a metric family says of itself besides its samples."""

    documentation: str
    kind: str
    unit: str


def gauge_merge(name: str) -> Callable[[Iterable[float]], float]:
    """How one gauge's values from several workers become the daemon's value."""
    if name.endswith("_start_time_seconds"):
        return min
    if name.endswith(SUMMED_GAUGE_SUFFIXES):
        return sum
    return max


@dataclass
class WorkerPage:
    """One worker's samples as the parent reports them: the latest page it served, plus what earlier processes in
    its slot had counted before they exited (a restarted worker counts from zero again, and the daemon's counters
    must not go down: Prometheus would read that as a reset)."""

    families: dict[str, FamilyInfo] = field(default_factory=dict)
    samples: dict[SeriesKey, float] = field(default_factory=dict)
    carried: dict[SeriesKey, float] = field(default_factory=dict)
    started: float | None = None

    def update(self, page: str) -> None:
        """Take a freshly scraped page. Raises ValueError for a page that is not Prometheus text."""
        families, samples = parse(page)
        started = samples.get(START_TIME)
        if self.started is not None and started is not None and started != self.started:
            for key, value in self.samples.items():  # the process in this slot was replaced: keep its counts
                if not _is_gauge(self.families[key[0]]) and not key[1].endswith("_created"):
                    self.carried[key] = self.carried.get(key, 0.0) + value
        self.families.update(families)
        self.samples, self.started = samples, started

    def reported(self) -> dict[SeriesKey, float]:
        """The samples with the carried counts added (series only an earlier process had included)."""
        merged = dict(self.samples)
        for key, value in self.carried.items():
            merged[key] = merged.get(key, 0.0) + value
        return merged


def parse(page: str) -> tuple[dict[str, FamilyInfo], dict[SeriesKey, float]]:
    """A page's families and its samples by series. Raises ValueError for a page that is not Prometheus text."""
    families: dict[str, FamilyInfo] = {}
    samples: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(page):
        families[family.name] = FamilyInfo(family.documentation, family.type, family.unit)
        for sample in family.samples:
            samples[family.name, sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return families, samples


def merge(pages: Iterable[WorkerPage]) -> list[Metric]:
    """The workers' pages merged into one daemon's families (rules in the module docstring)."""
    families: dict[str, FamilyInfo] = {}
    values: dict[SeriesKey, list[float]] = {}
    for page in pages:
        families.update(page.families)
        for key, value in page.reported().items():
            values.setdefault(key, []).append(value)
    merged = {name: Metric(name, info.documentation, info.kind, info.unit) for name, info in families.items()}
    combined = {key: _combine(families[key[0]].kind, key[1], seen) for key, seen in values.items()}
    _derive_hit_ratio(combined)
    for (name, sample_name, labels), value in combined.items():
        merged[name].add_sample(sample_name, dict(labels), value)
    return [family for family in merged.values() if family.samples]


def merge_pages(pages: Iterable[str]) -> list[Metric]:
    """:func:`merge` over freshly parsed pages (each worker's first). Raises ValueError for a bad page."""
    views = []
    for text in pages:
        view = WorkerPage()
        view.update(text)
        views.append(view)
    return merge(views)


def _derive_hit_ratio(combined: dict[SeriesKey, float]) -> None:
    """The cache's hit ratio of the whole daemon, from the summed lookups (no worker's own ratio is it)."""
    def lookups(model: str, result: str) -> float:
        return combined.get((LOOKUPS, f"{LOOKUPS}_total", (("model", model), ("result", result))), 0.0)

    for key in [k for k in combined if k[0] == HIT_RATIO]:
        model = dict(key[2]).get("model", "")
        hits, misses = lookups(model, "hit"), lookups(model, "miss")
        combined[key] = hits / (hits + misses) if hits + misses else 0.0


def _is_gauge(info: FamilyInfo) -> bool:
    return info.kind == "gauge"


def _combine(kind: str, sample_name: str, seen: list[float]) -> float:
    if sample_name.endswith("_created"):
        return min(seen)  # the series exists since the first worker created it
    if kind == "gauge":
        return gauge_merge(sample_name)(seen)
    return sum(seen)


class WorkerMetricsCollector(Collector):
    """Scrapes the workers whose metrics ports are written in ``ready_dir`` and yields the merged families. A
    worker that does not answer a scrape (starting, restarting, stuck) keeps its last page in the sums, so the
    daemon's counters never go down; ``classifyd_workers_up`` says it was not heard this time."""

    def __init__(self, ready_dir: Path, workers: int) -> None:
        self._ready_dir = ready_dir
        self._pages = [WorkerPage() for _ in range(workers)]
        self._fetcher = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="classifyd-metrics-scrape")
        # loopback only: an http_proxy in the environment must not see (or break) the workers' pages
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def port_file(self, index: int) -> Path:
        return self._ready_dir / f"worker-{index}.metrics"

    def collect(self) -> Iterator[Metric]:
        heard = list(self._fetcher.map(self._scrape, range(len(self._pages))))
        up = GaugeMetricFamily("classifyd_workers_up", "Worker processes whose metrics this scrape fetched "
                               "(a worker not heard keeps its last figures in the sums)", labels=["worker"])
        for index, fresh in enumerate(heard):
            up.add_metric([str(index)], 1.0 if fresh else 0.0)
        yield up
        yield from merge(self._pages)

    def _scrape(self, index: int) -> bool:
        """Fetch one worker's page into its :class:`WorkerPage`; False (logged) when it does not answer in time.
        Scrapes of different workers run on separate threads; each touches only its own page."""
        try:
            port = int(self.port_file(index).read_text(encoding="ascii"))
            with self._opener.open(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
                self._pages[index].update(reply.read().decode("utf-8"))
            return True
        except (OSError, ValueError) as exc:
            log.debug("metrics of worker %d not fetched: %s", index, exc)
            return False

    def close(self) -> None:
        self._fetcher.shutdown(wait=False)


class WorkerMetricsServer:
    """The parent's ``/metrics`` endpoint over its workers."""

    def __init__(self, ready_dir: Path, workers: int) -> None:
        self.collector = WorkerMetricsCollector(ready_dir, workers)
        registry = CollectorRegistry()
        registry.register(self.collector)
        self._exporter = Exporter(registry)

    def serve(self, host: str, port: int) -> int:
        """Serve on a background thread; returns the bound port. Raises OSError when it cannot bind."""
        return self._exporter.serve(host, port)

    def close(self) -> None:
        """Stop the exporter (blocks until its thread has stopped)."""
        self._exporter.close()
        self.collector.close()
