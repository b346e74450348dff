"""Overload benchmark: offer several times a model's capacity and watch what the daemon does.

    PYTHONPATH=.:protos .venv/bin/python -m benchmarks.overload               # 30 s at 4x capacity
    PYTHONPATH=.:protos .venv/bin/python -m benchmarks.overload --duration 60 --multiplier 8

It starts the daemon in its own process (``python -m tests.support.serve``) with one test model whose forward pass takes
``--delay-ms`` per batch of up to ``--batch`` requests, so capacity is known and the CPU stays free for the load
generator. Requests are offered open-loop, at a fixed rate whatever the answers, as real clients do. It prints how
many requests were answered, shed (RESOURCE_EXHAUSTED) or failed otherwise, latency percentiles of each, the bound
that ``max_queue`` puts on the latency of accepted requests, and the daemon's resident memory over time.
``tests/daemon/test_overload.py`` runs the same code for a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request

REQUEST = tensor_request(np.zeros((8, 8), np.uint8), model="slow")
TICK_S = 0.005


@dataclass
class OverloadReport:
    """What happened to every request offered."""

    duration_s: float
    offered_rate: float
    codes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    shed_latencies: list[float] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)

    @property
    def offered(self) -> int:
        return sum(self.codes.values())

    @property
    def other_errors(self) -> int:
        return self.offered - self.codes["OK"] - self.codes["RESOURCE_EXHAUSTED"]

    def summary(self, latency_bound_s: float | None = None) -> str:
        others = {k: v for k, v in self.codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        lines = [f"offered {self.offered} requests in {self.duration_s:.1f} s ({self.offered_rate:.0f}/s)",
                 f"answered {self.codes['OK']} ({self.codes['OK'] / max(self.duration_s, 1e-9):.0f}/s), "
                 f"shed {self.codes['RESOURCE_EXHAUSTED']}, other errors {self.other_errors} "
                 f"{others}",
                 f"accepted latency ms: {_percentiles(self.ok_latencies)}",
                 f"shed latency ms:     {_percentiles(self.shed_latencies)}"]
        if latency_bound_s is not None:
            lines.append(f"queue-limit bound on accepted latency: {latency_bound_s * 1000:.0f} ms (plus overheads)")
        if self.rss_samples:
            mib = [s / 2**20 for s in self.rss_samples]
            lines.append(f"daemon RSS MiB: start {mib[0]:.1f}, max {max(mib):.1f}, end {mib[-1]:.1f} "
                         f"({len(mib)} samples)")
        return "\n".join(lines)


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    p50, p90, p99, top = np.percentile(np.asarray(values) * 1000, [50, 90, 99, 100])
    return f"p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {top:.1f}  (n={len(values)})"


async def _one(stub: pb_grpc.ClassifierStub, report: OverloadReport, timeout: float) -> None:
    started = time.perf_counter()
    try:
        await stub.Classify(REQUEST, timeout=timeout)
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    elapsed = time.perf_counter() - started
    report.codes[code] += 1
    if code == "OK":
        report.ok_latencies.append(elapsed)
    elif code == "RESOURCE_EXHAUSTED":
        report.shed_latencies.append(elapsed)


async def offer_load(target: str, rate: float, duration_s: float, *, rss: Callable[[], int] | None = None,
                     timeout: float = 30.0) -> OverloadReport:
    """Send ``rate`` requests per second for ``duration_s`` seconds, open-loop; wait for every answer."""
    report = OverloadReport(duration_s, rate)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await stub.Classify(REQUEST, timeout=timeout)  # connected and warm before the clock starts
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        sent, next_sample = 0, 0.0
        while (elapsed := time.perf_counter() - started) < duration_s:
            for _ in range(int(elapsed * rate) - sent):
                task = asyncio.create_task(_one(stub, report, timeout))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if rss is not None and elapsed >= next_sample:
                report.rss_samples.append(rss())
                next_sample += 0.5
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*list(tasks))
        if rss is not None:
            report.rss_samples.append(rss())
    return report


def slow_repository(root: Path, delay_ms: float, batch: int, max_queue: int) -> Path:
    """A repository with one model, ``slow``, of known capacity: ``batch`` requests per ``delay_ms``."""
    # tests/ helpers: the benchmark runs from the repository root
    from tests.support.architectures import register_test_architectures
    from tests.support.kit import write_model

    register_test_architectures()  # write_model builds classifyd:test_slow to write its weights
    write_model(root, "slow", architecture="classifyd:test_slow",
                manifest={"input": {"color": "L", "size": 8, "resize": 8},
                          "model_args": {"delay_s": delay_ms / 1000, "tag": "overload"},
                          "batching": {"max_batch_size": batch, "max_queue": max_queue}})
    return root


def latency_bound_s(delay_ms: float, batch: int, max_queue: int) -> float:
    """Longest an accepted request should take: the full queue ahead of it, then its own batch."""
    return (max_queue / batch + 1) * delay_ms / 1000


def run(duration_s: float, multiplier: float, delay_ms: float, batch: int, max_queue: int) -> OverloadReport:
    """Start a daemon, offer ``multiplier`` times its capacity for ``duration_s``, stop it; return the report."""
    from tests.support.daemon_process import DaemonProcess

    capacity = batch / (delay_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="classifyd-overload-") as tmp:
        models = slow_repository(Path(tmp) / "models", delay_ms, batch, max_queue)
        with DaemonProcess(models, Path(tmp), "--no-watch", "--log-level", "WARNING") as daemon:
            return asyncio.run(offer_load(daemon.target, capacity * multiplier, duration_s, rss=daemon.rss_bytes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of overload (default: 30)")
    parser.add_argument("--multiplier", type=float, default=4.0, help="offered load / capacity (default: 4)")
    parser.add_argument("--delay-ms", type=float, default=40.0, help="forward pass time per batch (default: 40)")
    parser.add_argument("--batch", type=int, default=2, help="max_batch_size (default: 2)")
    parser.add_argument("--max-queue", type=int, default=16, help="max_queue (default: 16)")
    args = parser.parse_args(argv)
    print(f"model: batches of {args.batch} in {args.delay_ms} ms = capacity {args.batch / args.delay_ms * 1000:.0f}"
          f"/s; max_queue {args.max_queue}; offering {args.multiplier}x for {args.duration} s")
    report = run(args.duration, args.multiplier, args.delay_ms, args.batch, args.max_queue)
    print(report.summary(latency_bound_s(args.delay_ms, args.batch, args.max_queue)))
    return 0 if report.other_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
