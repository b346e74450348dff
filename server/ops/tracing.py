"""OpenTelemetry traces of classification requests (docs/operations.md, "Tracing").

Off unless configured (:func:`configure`: ``--otlp-endpoint`` or the standard ``OTEL_*`` variables); then every
request gets a span at the edge (:class:`server.edges.common.requests.Ticket`), continuing the caller's W3C trace
context (``traceparent`` in gRPC metadata or an HTTP header), with child spans for its preprocessing, its wait in
the queue and the forward pass that computed it. A batch serves many requests, so it is a span of its own (a new
trace) with a link to every request span it computed, and each request's compute span links back to it.

Off, every entry point returns None or a shared null context after one global read: no span, no context switch,
no clock read (docs/benchmarks.md measures it). Spans are exported in the SDK's background thread; nothing here
blocks except :func:`shutdown`, which flushes. The batcher never sees any of it: items carry an opaque
:class:`ItemTrace`, and :class:`BatchTrace` is driven by the batch pipeline.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.core.errors import Status
from server.core.types import ClassifyResult

INSTRUMENTATION = "classifyd"
DEFAULT_SERVICE_NAME = "classifyd"
EXPORTERS = ("otlp", "console")
"""Values of ``OTEL_TRACES_EXPORTER`` (comma-separated) classifyd knows; ``none`` turns tracing off."""
HTTP_EXPORTER = "opentelemetry-exporter-otlp-proto-http"
Carrier = Mapping[str, str] | Callable[[], Iterable[tuple[str, Any]]]
"""Where the caller's trace context is read from: HTTP headers, or a call returning gRPC metadata pairs."""

_PROPAGATOR = TraceContextTextMapPropagator()
_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_EMPTY = otel_context.Context()  # the parent of batch spans: a new trace, whatever the batcher task's context holds
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def install(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` from now on; None turns tracing off. :func:`configure` calls it; tests install an
    SDK provider with an in-memory exporter. Not thread-safe: call before serving."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def wanted(otlp_endpoint: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is asked for: ``--otlp-endpoint``, ``OTEL_TRACES_EXPORTER`` (but ``none``) or an OTLP endpoint
    variable, unless ``OTEL_SDK_DISABLED=true``."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(otlp_endpoint or exporters or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(otlp_endpoint: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on when :func:`wanted`, exporting in batches (``OTEL_BSP_*``) to the exporters of
    ``OTEL_TRACES_EXPORTER`` (default ``otlp``; ``console`` writes spans to stdout) with the ``OTEL_*`` settings of
    the SDK (sampler, resource, service name: ``classifyd`` unless ``OTEL_SERVICE_NAME`` says otherwise).
    ``otlp_endpoint`` overrides ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``. Returns whether tracing is on.

    Raises ValueError for an unknown exporter or protocol (a start-up error, exit status 2).
    """
    if not wanted(otlp_endpoint, environ):
        install(None)
        return False
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {', '.join(unknown)}; classifyd knows "
                         f"{', '.join(EXPORTERS)} and none")
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for name in names:
        exporter = _otlp_exporter(otlp_endpoint, environ) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return True


def _otlp_exporter(endpoint: str | None, environ: Mapping[str, str]) -> SpanExporter:
    """The OTLP exporter of ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``grpc`` (installed with classifyd) or
    ``http/protobuf`` (when its package is installed). Raises ValueError otherwise."""
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # only when used

        return OTLPSpanExporter(endpoint=endpoint)
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        except ImportError:
            raise ValueError(f"OTLP protocol http/protobuf needs the {HTTP_EXPORTER} package (pip install "
                             f"{HTTP_EXPORTER}); classifyd ships the grpc one") from None
        return HttpExporter(endpoint=endpoint)
    raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")


def shutdown() -> None:
    """Export what is buffered and stop tracing. Blocks (up to the exporter's timeout): call off the event loop."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


# ----- a request: its span at the edge and the stages under it


def start_request(name: str, carrier: Carrier | None) -> Span | None:
    """A server span for a request that arrived now, continuing the trace context in ``carrier`` (if any); None
    while tracing is off. End it with :func:`end_request`."""
    tracer = _tracer
    if tracer is None:
        return None
    parent = _PROPAGATOR.extract(_headers(carrier)) if carrier is not None else None
    return tracer.start_span(name, context=parent, kind=SpanKind.SERVER)


def _headers(carrier: Carrier) -> Mapping[str, str]:
    if callable(carrier):  # gRPC metadata: (key, value) pairs, keys lower case; binary values are not trace context
        return {key: value for key, value in carrier() if isinstance(value, str)}
    return carrier


def activate(span: Span) -> object:
    """Make ``span`` the current one (the parent of the stages' spans) in this task; returns the token for
    :func:`deactivate`."""
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


def end_request(span: Span, request_id: str, model: str, version: int, status: Status, message: str,
                result: ClassifyResult | None) -> None:
    """End a request span with what became of the request."""
    span.set_attributes({"classifyd.request_id": request_id, "classifyd.model": result.model if result else model,
                         "classifyd.version": result.version if result else version, "classifyd.code": status.name})
    if result is not None:
        span.set_attribute("classifyd.batch_size", result.batch_size)
    if status is not Status.OK:
        span.set_status(StatusCode.ERROR, f"{status.name}: {message}")
    span.end()


def stage(name: str) -> AbstractContextManager[Any]:
    """A child span of the current request over a ``with`` block (preprocessing); a shared null context while
    tracing is off or outside a traced request."""
    tracer = _tracer
    if tracer is None or not trace.get_current_span().is_recording():
        return _NULL
    return tracer.start_as_current_span(name)


@dataclass(frozen=True, slots=True)
class ItemTrace:
    """What a batch item carries for tracing: its request's span and when it was queued."""

    span: Span
    queued_ns: int


def item_trace() -> ItemTrace | None:
    """For an item about to be queued: the current request span and the time; None while tracing is off or outside
    a traced request."""
    if _tracer is None:
        return None
    span = trace.get_current_span()
    return ItemTrace(span, time.time_ns()) if span.is_recording() else None


class Traced(Protocol):
    """A batch item: it may carry an :class:`ItemTrace`."""

    trace: ItemTrace | None


class BatchTrace:
    """The spans of one batch: the batch span (a new trace, linked to every request span it computes), each item's
    queue-wait span (queued until the batch began) and compute span (its group's forward pass, linked to the batch)."""

    def __init__(self, tracer: Tracer, model: str, traces: list[ItemTrace]) -> None:
        self._tracer = tracer
        self.started_ns = time.time_ns()
        requests = list({id(t.span): t.span for t in traces}.values())  # the tiles of an image share one request
        self.span = tracer.start_span("classifyd.batch", context=_EMPTY, start_time=self.started_ns,
                                      links=[Link(s.get_span_context()) for s in requests],
                                      attributes={"classifyd.model": model, "classifyd.batch_size": len(traces),
                                                  "classifyd.requests": len(requests)})
        self._batch_link = [Link(self.span.get_span_context())]
        for item in traces:
            self._tracer.start_span("classifyd.queue", context=trace.set_span_in_context(item.span),
                                    start_time=min(item.queued_ns, self.started_ns)).end(end_time=self.started_ns)

    def computed(self, version: int, traces: Sequence[ItemTrace | None], outcomes: Sequence[object],
                 started_ns: int) -> None:
        """Record the compute span of each traced item of a group that ran from ``started_ns`` until now;
        an item whose outcome is an exception gets an error status."""
        ended = time.time_ns()
        for item, outcome in zip(traces, outcomes, strict=True):
            if item is None:
                continue
            span = self._tracer.start_span("classifyd.compute", context=trace.set_span_in_context(item.span),
                                           start_time=started_ns, links=self._batch_link,
                                           attributes={"classifyd.version": version,
                                                       "classifyd.batch_size": len(traces)})
            if isinstance(outcome, BaseException):
                span.set_status(StatusCode.ERROR, str(outcome))
            span.end(end_time=ended)

    def end(self) -> None:
        self.span.end()


def open_batch(model: str, items: Sequence[Traced]) -> BatchTrace | None:
    """The trace of a batch about to run; None while tracing is off or when no item of it is traced."""
    tracer = _tracer
    if tracer is None:
        return None
    traces = [item.trace for item in items if item.trace is not None]
    return BatchTrace(tracer, model, traces) if traces else None


def now_ns() -> int:
    """The wall clock spans are timed with."""
    return time.time_ns()
