"""What tracing costs a request: its hooks with tracing off, and its spans with tracing on (server/ops/tracing.py).

In process, without a daemon or a model, so only tracing is measured: per request a ticket is opened with the
caller's headers (a ``traceparent`` among them), its work is tracked (the request span current) and does what the
service does (the preprocessing stage, the batch item's trace), and every ``--batch-size`` requests one batch is
traced (queue and compute spans per request, the batch span with its links). Off, each hook is one global read.
On, spans go to the SDK's BatchSpanProcessor with an exporter that drops them, as an OTLP exporter would be fed
(its export thread is off the request path). Prints microseconds per request and the on/off ratio.

    python -m benchmarks.tracing_bench
    python -m benchmarks.tracing_bench --requests 2000 --batch-size 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from server.edges.common.requests import RequestBook
from server.ops import tracing
from server.ops.tracing import ItemTrace

HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "content-type": "image/png"}


class DroppingExporter(SpanExporter):
    """Takes every batch of spans and keeps none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@dataclass
class Item:
    trace: ItemTrace | None


async def _request(book: RequestBook, items: list[Item]) -> None:
    ticket = book.open("", "digits", name="POST /v1/classify", carrier=HEADERS)

    async def work() -> None:
        with tracing.stage("classifyd.preprocess"):
            pass
        items.append(Item(tracing.item_trace()))

    await ticket.track(work(), lambda _: None)


async def _run(requests: int, batch_size: int) -> float:
    """Seconds per request of ``requests`` traced the way the daemon traces them."""
    book = RequestBook()
    started = time.perf_counter()
    for _ in range(requests // batch_size):
        items: list[Item] = []
        for _ in range(batch_size):
            await _request(book, items)
        batch = tracing.open_batch("digits", items)
        if batch is not None:
            batch.computed(1, [item.trace for item in items], [None] * len(items), tracing.now_ns())
            batch.end()
    return (time.perf_counter() - started) / (requests // batch_size * batch_size)


def _hooks_off(requests: int, batch_size: int) -> float:
    """Seconds per request of the tracing calls alone, tracing off: what the request path pays for tracing."""
    items = [Item(None)] * batch_size
    started = time.perf_counter()
    for n in range(requests):
        tracing.start_request("POST /v1/classify", HEADERS)
        with tracing.stage("classifyd.preprocess"):
            tracing.item_trace()
        if n % batch_size == 0:
            tracing.open_batch("digits", items)
    return (time.perf_counter() - started) / requests


def measure(requests: int, batch_size: int) -> dict[str, float]:
    """Microseconds per request: the tracing calls alone with tracing off, and the whole traced path (ticket,
    stages, batch) off and on; best of three runs each."""
    tracing.install(None)
    hooks = min(_hooks_off(requests, batch_size) for _ in range(3))
    off = min(asyncio.run(_run(requests, batch_size)) for _ in range(3))
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    tracing.install(provider)
    try:
        on = min(asyncio.run(_run(requests, batch_size)) for _ in range(3))
    finally:
        tracing.install(None)
        provider.shutdown()
    return {"hooks_off_us": hooks * 1e6, "off_us": off * 1e6, "on_us": on * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per run (default: 20000)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per traced batch (default: 8)")
    args = parser.parse_args(argv)
    if args.requests < args.batch_size or args.batch_size < 1:
        parser.error("--requests must be at least --batch-size, which must be >= 1")
    result = measure(args.requests, args.batch_size)
    print(f"per request, batches of {args.batch_size}:")
    print(f"  tracing off, the tracing calls alone: {result['hooks_off_us']:8.3f} us "
          f"({result['hooks_off_us'] / result['off_us']:.1%} of the ticket path below)")
    print(f"  tracing off, ticket path:             {result['off_us']:8.2f} us")
    print(f"  tracing on,  ticket path:             {result['on_us']:8.2f} us  "
          f"({result['on_us'] / result['off_us']:.1f}x off: {result['on_us'] - result['off_us']:.1f} us of spans)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
