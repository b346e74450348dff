"""Hot swap under load: how long a published version takes to serve, and what swaps cost the requests in flight.

Starts the daemon (``python -m server`` in a subprocess, watching a temporary model repository), runs closed-loop
clients, measures a steady-state window, then publishes ``--versions`` new versions one after another, each the
safe way (written to ``models/<name>/.staging-N/``, then renamed to ``N``), alternating two weight sets. Reports:

- per swap: publish → LOADING event (the settle period and the watcher's debounce), LOADING → READY (load, warm-up
  and validation), publish → READY, publish → first response computed by the new version, and READY → the old
  version UNLOADED (its in-flight requests drained);
- latency p50/p99/max and throughput in the steady window against the swap windows (LOADING → old version
  UNLOADED);
- failed requests over the whole run, by status code (must be 0).

Models: ``mobilenet_v3_small`` (default) or ``resnet18`` (random-init, 640x480 JPEGs), or ``digits`` (the default
model, 8x8 tensors). About a minute with the defaults on 2 cores.

    python -m benchmarks.swap_bench
    python -m benchmarks.swap_bench --model digits --versions 10 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from benchmarks.support import (
    DaemonProcess,
    copy_digits,
    facts_block,
    fmt,
    markdown_table,
    run_facts,
    torchvision_weights,
    write_torchvision_model,
)
from client.bench import BenchOptions, RpcFailed, generated_payloads, tensor_payloads, unary_sender

KIND = pb.ModelEvent.Kind


@dataclass
class Requests:
    """Every request of the run: completion time, latency, version (successes) and failures by code."""

    ends: array = field(default_factory=lambda: array("d"))
    latencies: array = field(default_factory=lambda: array("d"))
    versions: array = field(default_factory=lambda: array("q"))
    failures: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def window(self, spans: list[tuple[float, float]]) -> dict[str, Any]:
        """Figures of the requests completing inside any of ``spans`` (perf_counter seconds)."""
        ends = np.asarray(self.ends)
        inside = np.zeros(len(ends), dtype=bool)
        for start, end in spans:
            inside |= (ends >= start) & (ends < end)
        latencies = np.asarray(self.latencies)[inside] * 1000
        seconds = sum(end - start for start, end in spans)
        if not len(latencies):
            return {"requests": 0, "seconds": seconds, "throughput": 0.0, "p50": None, "p99": None, "max": None}
        return {"requests": int(inside.sum()), "seconds": round(seconds, 3),
                "throughput": float(inside.sum() / seconds), "p50": float(np.percentile(latencies, 50)),
                "p99": float(np.percentile(latencies, 99)), "max": float(latencies.max())}

    def first_response(self, version: int) -> float | None:
        hits = np.flatnonzero(np.asarray(self.versions) == version)
        return float(np.asarray(self.ends)[hits].min()) if len(hits) else None


class Events:
    """WatchModels events with their receipt time (perf_counter), and a way to wait for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, pb.ModelEvent]] = []
        self._changed = asyncio.Event()

    async def follow(self, stub: pb_grpc.ClassifierStub, model: str) -> None:
        try:
            async for event in stub.WatchModels(pb.WatchModelsRequest(model=model)):
                self.seen.append((time.perf_counter(), event))
                self._changed.set()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                raise

    async def wait(self, version: int, kind: int, timeout_s: float, serving: bool | None = None) -> float:
        """The receipt time of the first event of ``version`` and ``kind``. Raises TimeoutError."""
        deadline = time.perf_counter() + timeout_s
        while True:
            for when, event in self.seen:
                if event.version == version and event.kind == kind and serving in (None, event.serving):
                    return when
            failed = [e for _, e in self.seen if e.version == version and e.kind == KIND.FAILED]
            if failed:
                raise RuntimeError(f"version {version} failed to load: {failed[0].reason}")
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.perf_counter()))


@dataclass
class Swap:
    version: int
    published: float
    loading: float
    ready: float
    unloaded: float
    first_response: float | None = None


async def load(send: Any, payloads: tuple[bytes, ...], concurrency: int, requests: Requests,
               stop: asyncio.Event) -> None:
    """Closed-loop clients until ``stop`` is set."""

    async def worker(index: int) -> None:
        for position in range(index, 1 << 62, concurrency):
            if stop.is_set():
                return
            sent = time.perf_counter()
            try:
                response = await send(payloads[position % len(payloads)])
            except RpcFailed as exc:
                requests.failures[exc.code] += 1
                requests.examples.setdefault(exc.code, exc.message)
                continue
            done = time.perf_counter()
            requests.ends.append(done)
            requests.latencies.append(done - sent)
            requests.versions.append(response.version)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def publish(model_dir: Path, version: int, weights: Path) -> float:
    """Write the version under a hidden name, then rename it into place; returns the rename's perf_counter time."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir()
    await asyncio.to_thread(shutil.copyfile, weights, staging / "model.safetensors")
    published = time.perf_counter()
    staging.rename(model_dir / str(version))
    return published


async def run(target: str, model_dir: Path, sources: list[Path], payloads: tuple[bytes, ...],
              args: argparse.Namespace) -> tuple[Requests, list[tuple[float, float]], list[Swap]]:
    """The steady window, then the swaps, under continuous load."""
    requests, events, stop = Requests(), Events(), asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        follower = asyncio.create_task(events.follow(pb_grpc.ClassifierStub(channel), model_dir.name))
        clients = asyncio.create_task(load(unary_sender(channel, 60.0), payloads, args.concurrency, requests, stop))
        await asyncio.sleep(args.warmup)
        steady = (time.perf_counter(), time.perf_counter() + args.steady)
        await asyncio.sleep(args.steady)
        swaps = []
        for index in range(args.versions):
            version = index + 2
            published = await publish(model_dir, version, sources[index % len(sources)])
            loading = await events.wait(version, KIND.LOADING, args.timeout)
            ready = await events.wait(version, KIND.READY, args.timeout, serving=True)
            unloaded = await events.wait(version - 1, KIND.UNLOADED, args.timeout)
            swaps.append(Swap(version, published, loading, ready, unloaded))
            print(f"  version {version}: serving {ready - published:.2f} s after publish", file=sys.stderr)
            await asyncio.sleep(args.interval)
        stop.set()
        await clients
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    for swap in swaps:
        swap.first_response = requests.first_response(swap.version)
    return requests, [steady], swaps


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path], tuple[bytes, ...], str]:
    """The repository with version 1, weight files for later versions (same filesystem), and the payloads."""
    models_dir = root / "models"
    sources_dir = root / "sources"
    options = BenchOptions(model=args.model, top_k=1)
    if args.model == "digits":
        version_dir = copy_digits(models_dir)
        sources = [version_dir / "model.safetensors"]
        payloads = tensor_payloads(options, 8, 8, 1)
    else:
        version_dir = write_torchvision_model(models_dir, args.model, seed=0,
                                              batching={"max_batch_size": args.max_batch_size})
        sources = [torchvision_weights(args.model, sources_dir / f"{seed}.safetensors", seed=seed)
                   for seed in (1, 2)]
        width, height = (int(v) for v in args.size.split("x"))
        payloads = generated_payloads(options, width, height, count=8)
    return version_dir.parent, sources, payloads.requests, payloads.description


def report(facts: dict[str, Any], description: str, requests: Requests, steady: list[tuple[float, float]],
           swaps: list[Swap], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The Markdown section and the JSON record."""
    swap_spans = [(s.loading, s.unloaded + 0.2) for s in swaps]
    windows = {"steady": requests.window(steady), "during swaps": requests.window(swap_spans)}
    rows = [[name, w["requests"], fmt(w["throughput"]), fmt(w["p50"], 2), fmt(w["p99"], 2), fmt(w["max"], 2)]
            for name, w in windows.items()]
    latency = markdown_table(["window", "requests", "req/s", "p50 ms", "p99 ms", "max ms"], rows)
    swap_rows = [[s.version, fmt(s.loading - s.published, 2), fmt(s.ready - s.loading, 2),
                  fmt(s.ready - s.published, 2),
                  fmt(None if s.first_response is None else s.first_response - s.published, 2),
                  fmt(s.unloaded - s.ready, 2)] for s in swaps]
    swap_table = markdown_table(["version", "publish → loading s", "loading → ready s", "publish → ready s",
                                 "publish → first response s", "ready → old unloaded s"], swap_rows)
    ready = [s.ready - s.published for s in swaps]
    failures = sum(requests.failures.values())
    failed = "0" if not failures else ", ".join(f"{n} × {code} ({requests.examples[code]})"
                                                for code, n in requests.failures.items())
    summary = (f"Swap time (publish → ready): median {np.median(ready):.2f} s, max {max(ready):.2f} s, with "
               f"--settle-seconds {args.settle_seconds}. Failed requests over the whole run: {failed}.")
    text = "\n\n".join([f"## Hot swap under load: {args.model}, {args.versions} versions, concurrency "
                        f"{args.concurrency}", facts_block(facts), f"Payload: {description}.", latency, swap_table,
                        summary]) + "\n"
    record = {"facts": facts, "model": args.model, "payload": description, "windows": windows,
              "swaps": [vars(s) | {"publish_to_ready_s": s.ready - s.published} for s in swaps],
              "failures": dict(requests.failures), "settle_seconds": args.settle_seconds}
    return text, record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.swap_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mobilenet_v3_small", "resnet18", "digits"), default="mobilenet_v3_small")
    parser.add_argument("--versions", type=int, default=5, help="versions to publish (default: 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the steady window (default: 2)")
    parser.add_argument("--steady", type=float, default=8.0, help="seconds of steady state measured (default: 8)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between a swap and the next publish")
    parser.add_argument("--settle-seconds", type=float, default=1.0, help="the daemon's --settle-seconds")
    parser.add_argument("--max-batch-size", type=int, default=16, help="manifest max_batch_size (torchvision)")
    parser.add_argument("--size", default="640x480", help="JPEG size WxH (torchvision models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each swap event")
    parser.add_argument("--markdown", type=Path, help="append the results section to this Markdown file")
    parser.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if args.versions < 1 or args.concurrency < 1:
        parser.error("--versions and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.swap_bench", args.device)
    with tempfile.TemporaryDirectory(prefix="classifyd-swap-") as tmp:
        model_dir, sources, payloads, description = prepare(Path(tmp), args)
        flags = ["--device", args.device, "--settle-seconds", str(args.settle_seconds)]
        with DaemonProcess(model_dir.parent, Path(tmp) / "daemon.log", *flags) as daemon:
            try:
                requests, steady, swaps = asyncio.run(run(daemon.target, model_dir, sources, payloads, args))
            except (TimeoutError, RuntimeError) as exc:
                print(f"error: {exc or 'timed out waiting for a swap event'}\n{daemon.log_tail()}", file=sys.stderr)
                return 1
    text, record = report(facts, description, requests, steady, swaps, args)
    print(text)
    if args.markdown:
        with args.markdown.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if not requests.failures else 1


if __name__ == "__main__":
    sys.exit(main())
