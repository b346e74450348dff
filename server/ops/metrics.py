"""Prometheus metrics: one registry per daemon, exported over HTTP on ``--metrics-port``.

Fed by three small hooks, all called on the event loop: the servicer's
request observer (:meth:`Metrics.request_done`), the service's batch listener
(:meth:`Metrics.batch_done`) and the model manager's event listener
(:meth:`Metrics.model_event`). Queue depths are read when scraped. Every
metric is documented in docs/metrics.md.

Label values are bounded: a request for a model the daemon does not know is
counted under ``model="(unknown)"``, and a version label is set only for a
version the model actually has, so clients cannot create series at will.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.core.lifecycle import EventKind, ModelEvent
from server.core.types import BatchReport, RequestReport

log = logging.getLogger("classifyd.metrics")
UNKNOWN_MODEL = "(unknown)"
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (.1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

ModelLookup = Callable[[str], tuple[str, frozenset[int]] | None]
"""Maps a requested model name ('' = default) to (its name, its versions), or None for an unknown model."""
QueueSource = Callable[[], dict[str, tuple[int, int]]]
"""Per model: (requests counted against the queue limit, the limit). Called from the exporter's thread."""


class _QueueCollector(Collector):
    """Queue depth and limit per model, read from the service at scrape time."""

    def __init__(self, source: QueueSource) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("classifyd_queue_depth", "Requests admitted for the model and not yet in a "
                                  "batch (preprocessing or waiting); compared with max_queue", labels=["model"])
        limit = GaugeMetricFamily("classifyd_queue_limit", "The model's max_queue", labels=["model"])
        for model, (waiting, max_queue) in sorted(self._source().items()):
            depth.add_metric([model], waiting)
            limit.add_metric([model], max_queue)
        yield depth
        yield limit


class Metrics:
    """Every classifyd metric, in a registry of its own (several daemons may share a process)."""

    def __init__(self, lookup: ModelLookup, queues: QueueSource) -> None:
        self._lookup = lookup
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("classifyd_requests", "Classification requests answered, by status code",
                                ["model", "version", "code"], registry=registry)
        self.latency = Histogram("classifyd_request_latency_seconds", "Server-side time of successful requests, "
                                 "from receipt to answer", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("classifyd_queue_seconds", "Time successful requests waited in the model's queue",
                               ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.preprocess = Histogram("classifyd_preprocess_seconds", "Decode and resize time of successful "
                                    "requests", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.compute = Histogram("classifyd_batch_compute_seconds", "Time of one forward pass over a batch",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("classifyd_batch_size", "Requests per forward pass", ["model"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_failures = Counter("classifyd_batch_failures", "Forward passes in which the model raised",
                                      ["model", "version"], registry=registry)
        self.oom_splits = Counter("classifyd_oom_splits", "Batches split in halves after running out of memory",
                                  ["model"], registry=registry)
        self.loads = Counter("classifyd_model_loads", "Version loads finished, by result (ready or failed)",
                             ["model", "result"], registry=registry)
        self.load_seconds = Histogram("classifyd_model_load_seconds", "Time to load, warm up and validate a "
                                      "version", ["model", "result"], buckets=LOAD_BUCKETS, registry=registry)
        self.swaps = Counter("classifyd_model_swaps", "Times a new version (or new files of the same version) "
                             "took over serving", ["model"], registry=registry)
        self.serving = Gauge("classifyd_model_serving_version", "The version serving requests that pin none",
                             ["model"], registry=registry)
        self.rollouts = Counter("classifyd_rollout_transitions", "Rollout steps (docs/rollout.md): a version became a "
                                "candidate, was promoted or was rejected", ["model", "kind"], registry=registry)
        registry.register(_QueueCollector(queues))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
        self._loading: dict[tuple[str, int], float] = {}
        self._serving: dict[str, int] = {}
        self._exporter = Exporter(registry)

    # ----- hooks

    def request_done(self, report: RequestReport) -> None:
        """Count one answered request; time it if it succeeded."""
        result = report.result
        if result is not None:
            model, version = result.model, str(result.version)
            self.latency.labels(model).observe(report.seconds)
            if not result.cache_hit:  # a cache hit waited in no queue and was not preprocessed
                self.queue.labels(model).observe(result.queue_s)
                self.preprocess.labels(model).observe(result.preprocess_s)
        else:
            model, version = self._labels_for(report.model, report.version)
        self.requests.labels(model, version, report.code.name).inc()

    def _labels_for(self, requested: str, version: int) -> tuple[str, str]:
        found = self._lookup(requested)
        if found is None:
            return UNKNOWN_MODEL, ""
        name, versions = found
        return name, str(version) if version in versions else ""

    def batch_done(self, report: BatchReport) -> None:
        """Record one forward pass."""
        self.compute.labels(report.model).observe(report.seconds)
        self.batch_size.labels(report.model).observe(report.size)
        if report.error:
            self.batch_failures.labels(report.model, str(report.version)).inc()
        if report.oom_splits:
            self.oom_splits.labels(report.model).inc(report.oom_splits)

    def model_event(self, event: ModelEvent) -> None:
        """Manager listener: loads, failed loads, swaps and the serving version."""
        key = (event.model, event.version)
        if event.kind is EventKind.LOADING:
            self._loading[key] = event.time
            return
        if event.kind in (EventKind.READY, EventKind.FAILED, EventKind.CANDIDATE):  # a candidate loaded too
            result = "failed" if event.kind is EventKind.FAILED else "ready"
            self.loads.labels(event.model, result).inc()
            started = self._loading.pop(key, None)
            if started is not None:
                self.load_seconds.labels(event.model, result).observe(max(event.time - started, 0.0))
        if event.kind in (EventKind.CANDIDATE, EventKind.PROMOTED, EventKind.REJECTED):
            self.rollouts.labels(event.model, event.kind.name.lower()).inc()
        if event.kind in (EventKind.READY, EventKind.PROMOTED) and event.serving and event.model in self._serving:
            self.swaps.labels(event.model).inc()
        self._set_serving(event.model, event.serving_version)

    def _set_serving(self, model: str, version: int | None) -> None:
        """The serving-version gauge follows every event's ``serving_version``: a generation of the serving
        version unloaded after its replacement took over leaves it as it is; a model left with no serving
        version (removed) loses its series rather than report a stale version."""
        if version is not None:
            self._serving[model] = version
            self.serving.labels(model).set(version)
        elif self._serving.pop(model, None) is not None:
            self.serving.remove(model)

    # ----- exporter

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a background thread; returns the bound port (``port`` 0 picks one).

        Raises OSError when it cannot bind.
        """
        return self._exporter.serve(host, port)

    def close(self) -> None:
        """Stop the exporter. Blocks until its thread has stopped (at most about half a second)."""
        self._exporter.close()


class Exporter:
    """A registry served on ``/metrics`` over HTTP by a background thread (the daemon's, and the ``--workers``
    parent's merged one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._http: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (``port`` 0 picks one). Raises OSError when it cannot bind."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stop serving. Blocks until the thread has stopped (at most about half a second)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

