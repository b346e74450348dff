"""Default settings across fresh starts: the caps the daemon chooses, and how close they serve to the limit.

Issue 17's benchmark. For each model, ``--starts`` times: start a fresh daemon with default settings (nothing
pinned: ``--device cpu --no-watch --default-runtime torch`` only), measure the in-process limit while it idles (the
daemon's own preprocessing and forward pass, preprocessing overlapped on ``--inproc-workers`` threads, the best
batch size of ``--limit-batches``, the torch thread count that daemon chose), drive it closed loop at concurrency 32 for
``--load-s`` while polling the cap it serves with, then at concurrency 1, then measure the in-process limit again
and the in-process single-image pipeline with calls spaced like the daemon's requests. The machine drifts by
10-20 % within minutes, so the concurrency-32 throughput is given as a ratio of the mean of the two limits.

With ``--shape-s``, the first start also runs a load that changes shape (concurrency 1 → 32 → 4 → 64, each
``--shape-s``) against the default daemon and against a daemon per fixed cap of ``--shape-caps``, and compares
each phase with the best fixed cap.

    python -m benchmarks.defaults                                          # the full run (about 40 min)
    python -m benchmarks.defaults --short                                  # a smoke run (about 3 min)
    python -m benchmarks.defaults --models resnet18 --starts 5 --markdown /tmp/defaults.md
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from benchmarks.cpu_bench import Workload, load_version, make_workload, overlapped_pipeline, sequential_pipeline
from benchmarks.support import (
    DaemonProcess,
    copy_digits,
    facts_block,
    fmt,
    markdown_table,
    run_facts,
    write_torchvision_model,
)
from client.bench import BenchOptions, run_benchmark
from server.inference.preprocess import preprocess
from server.inference.runtime import LoadedVersion
from server.inference.threads import process_threads

DAEMON_FLAGS = ("--device", "cpu", "--no-watch", "--default-runtime", "torch")
"""Default settings, except that the runtime is torch (the issue's targets are for it; "auto" has its own)."""
SHAPE = (1, 32, 4, 64)
"""Concurrency of each phase of the shape-changing load."""


@dataclass
class Start:
    """One fresh start of the daemon."""

    limits_before: dict[int, float]
    """The in-process limit before the window, by torch thread count (1 and the daemon's process count)."""
    limit_after: float = 0.0
    """... and after it, on the thread count the daemon served with at the end of the window."""
    threads: int = 0
    caps: list[tuple[float, str]] = field(default_factory=list)  # (seconds since load began, "cap" or "cap×threads")
    halves: list[float] = field(default_factory=list)  # img/s at c=32, first and second half of the window
    batch_sizes: dict[str, int] = field(default_factory=dict)
    c1_ms: float = 0.0
    spaced_ms: float = 0.0
    shape: dict[str, list[float]] = field(default_factory=dict)  # "default" / "cap N" -> img/s per phase

    @property
    def limit_before(self) -> float:
        return self.limits_before.get(self.threads) or max(self.limits_before.values())

    @property
    def limit(self) -> float:
        return (self.limit_before + self.limit_after) / 2


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def in_process_limit(version: LoadedVersion, workload: Workload, args: argparse.Namespace) -> float:
    """The best img/s over ``--limit-batches`` of the overlapped in-process pipeline."""
    return max(overlapped_pipeline(version, workload.inputs, batch, args.limit_s, args.inproc_workers)
               for batch in args.limit_batches)


def spaced_single(version: LoadedVersion, workload: Workload, gap_s: float, seconds: float) -> float:
    """Median ms of the single-image pipeline on this thread with ``gap_s`` of idle before each call (the daemon's
    forward passes at concurrency 1 follow such gaps: a pass after an idle gap costs more than one back to back)."""
    spec = version.manifest.input
    sequential_pipeline(version, workload.inputs, 1, 0.5)  # warm
    times: list[float] = []
    end = time.perf_counter() + seconds
    index = 0
    while time.perf_counter() < end or len(times) < 5:
        time.sleep(gap_s)
        started = time.perf_counter()
        version.predict([preprocess(workload.inputs[index % len(workload.inputs)], spec)]).argmax(axis=1)
        times.append(time.perf_counter() - started)
        index += 1
    return statistics.median(times) * 1000


def cap_of(stub: pb_grpc.ClassifierStub, model: str) -> tuple[int, bool, int]:
    """The model's cap, whether it is tuned, and the torch threads the online tuner keeps (0: it does not)."""
    info = stub.GetModel(pb.GetModelRequest(model=model), timeout=10)
    return info.max_batch_size, info.autotuned or info.batch_cap_online, info.batch_threads


def setting(cap: int, threads: int) -> str:
    return f"{cap}×{threads}t" if threads else str(cap)


def wait_for_curve(daemon: DaemonProcess, model: str, timeout_s: float = 120.0) -> None:
    """Block until the load-time ladder has chosen the model's cap (it runs after READY); at once for a model whose
    manifest pins its cap (the daemon's log queues no curve for it)."""
    queued, done = f"model {model} version 1: serving with provisional", f"model {model} version 1: batch curve"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = daemon.log_path.read_text(encoding="utf-8", errors="replace")
        if queued not in text or done in text:
            return
        time.sleep(0.2)


def poll_caps(target: str, model: str, every_s: float, stop: threading.Event, into: list[tuple[float, str]]) -> None:
    """Record the cap (and threads) whenever they differ from the last seen, until ``stop``."""
    began = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while not stop.is_set():
            cap, _, threads = cap_of(stub, model)
            if not into or into[-1][1] != setting(cap, threads):
                into.append((round(time.monotonic() - began, 1), setting(cap, threads)))
            stop.wait(every_s)


def bench(target: str, model: str, workload: Workload, levels: tuple[int, ...], seconds: float,
          args: argparse.Namespace, warmup_s: float = 0.0) -> list[dict[str, Any]]:
    options = BenchOptions(target=target, model=model, top_k=1, concurrency=levels, warmup_s=warmup_s,
                           duration_s=seconds, processes=args.client_processes, progress=False)
    return run_benchmark(options, workload.payloads(model))["levels"]


def shape_load(models_dir: Path, model: str, workload: Workload, args: argparse.Namespace, log: Path,
               cap: int | None) -> list[float]:
    """img/s of each phase of :data:`SHAPE` against a fresh daemon (``cap`` None: default settings)."""
    flags = [*DAEMON_FLAGS, *(["--max-batch-size", str(cap)] if cap else [])]
    with DaemonProcess(models_dir, log, *flags) as daemon:
        if cap is None:
            wait_for_curve(daemon, model)
        return [level["throughput"] for level in bench(daemon.target, model, workload, SHAPE, args.shape_s, args)]


def limits_before(version: LoadedVersion, workload: Workload, args: argparse.Namespace) -> dict[int, float]:
    """The in-process limit on one torch thread and on the process's count."""
    limits = {}
    for count in sorted({1, process_threads()}):  # torch.get_num_threads() is what the last pass ran on
        version.torch_threads = count
        limits[count] = in_process_limit(version, workload, args)
    return limits


def daemon_threads(daemon: DaemonProcess, model: str) -> int | None:
    """The torch thread count the daemon's warm-up chose for the model (its log says), None if it says nothing."""
    found = re.search(rf"model {re.escape(model)} version 1: (\d+) torch thread",
                      daemon.log_path.read_text(encoding="utf-8", errors="replace"))
    return int(found.group(1)) if found else None


def one_start(model: str, models_dir: Path, version: LoadedVersion, workload: Workload, args: argparse.Namespace,
              index: int, log_dir: Path) -> Start:
    log = log_dir / f"{model}-{index}.log"
    with DaemonProcess(models_dir, log, *DAEMON_FLAGS) as daemon:
        wait_for_curve(daemon, model)
        # the in-process reference runs with the thread count the daemon serves with: its warm-up chooses one, and
        # the online tuner may change it under load, so the limit is measured on both counts (the daemon is idle)
        chosen = daemon_threads(daemon, model) or version.torch_threads or process_threads()
        start = Start(limits_before(version, workload, args), threads=chosen)
        stop = threading.Event()
        poller = threading.Thread(target=poll_caps, args=(daemon.target, model, args.poll_s, stop, start.caps))
        poller.start()
        try:
            halves = bench(daemon.target, model, workload, (32, 32), args.load_s / 2, args)
        finally:
            stop.set()
            poller.join()
        start.halves = [level["throughput"] for level in halves]
        with grpc.insecure_channel(daemon.target) as channel:
            start.threads = cap_of(pb_grpc.ClassifierStub(channel), model)[2] or chosen
        version.torch_threads = chosen  # light load (c=1) runs on the warm-up's choice, as the daemon's does
        start.batch_sizes = halves[-1]["batch_sizes"]
        start.c1_ms = bench(daemon.target, model, workload, (1,), args.c1_s, args, warmup_s=1.0)[0]["latency_ms"]["p50"]
        # spaced like the daemon's requests: each call waits the daemon's median latency (its idle gap is at least
        # the part of the round trip outside the forward pass)
        start.spaced_ms = spaced_single(version, workload, start.c1_ms / 1000, args.c1_s)
    version.torch_threads = start.threads
    start.limit_after = in_process_limit(version, workload, args)
    if index == 0 and args.shape_s > 0:
        start.shape["default"] = shape_load(models_dir, model, workload, args, log_dir / f"{model}-shape.log", None)
        for cap in args.shape_caps:
            start.shape[f"cap {cap}"] = shape_load(models_dir, model, workload, args,
                                                   log_dir / f"{model}-shape-{cap}.log", cap)
    return start


def describe(start: Start) -> str:
    caps = " ".join(f"{t:g}s:{c}" for t, c in start.caps)
    best = max(start.limits_before.values())
    return (f"caps {caps}; c=32 {start.halves[0]:.1f} then {start.halves[-1]:.1f} img/s = "
            f"{start.halves[-1] / start.limit:.2f}x the limit on {start.threads} thread(s) "
            f"({start.limit_before:.1f}/{start.limit_after:.1f}), {start.halves[-1] / best:.2f}x the best before "
            f"({' '.join(f'{k}t:{v:.1f}' for k, v in sorted(start.limits_before.items()))}); "
            f"c=1 {start.c1_ms:.2f} ms vs {start.spaced_ms:.2f} ms in process ({start.c1_ms - start.spaced_ms:+.2f})")


def section(model: str, starts: list[Start]) -> str:
    rows = [[i + 1, " ".join(f"{t:g}s:{c}" for t, c in s.caps), s.threads,
             " ".join(f"{k}t:{fmt(v)}" for k, v in sorted(s.limits_before.items())), fmt(s.limit_after),
             fmt(s.halves[0]), fmt(s.halves[-1]), f"{s.halves[-1] / s.limit:.2f}",
             ", ".join(f"{k}:{v}" for k, v in s.batch_sizes.items()), f"{s.c1_ms:.2f}", f"{s.spaced_ms:.2f}",
             f"{s.c1_ms - s.spaced_ms:+.2f}"] for i, s in enumerate(starts)]
    lines = [f"##### {model}", "", markdown_table(
        ["start", "cap over time (s since load: cap×threads)", "threads at the end", "limit before (by threads)",
         "limit after (end threads)", "c=32 first half",
         "c=32 second half", "ratio (second half ÷ mean limit)", "batches (second half)", "c=1 p50 ms",
         "in-process spaced ms", "overhead ms"], rows)]
    shaped = next((s.shape for s in starts if s.shape), None)
    if shaped:
        best = [max(values[i] for key, values in shaped.items() if key != "default") for i in range(len(SHAPE))]
        rows = [[key, *(fmt(v) for v in values)] for key, values in shaped.items()]
        rows.append(["default ÷ best fixed", *(f"{d / b:.2f}" for d, b in zip(shaped["default"], best, strict=True))])
        lines += ["", "Shape-changing load, img/s per phase:", "",
                  markdown_table(["daemon", *(f"c={c}" for c in SHAPE)], rows)]
    return "\n".join(lines)


def prepare(model: str, models_dir: Path) -> Path:
    if model == "digits":
        return copy_digits(models_dir)
    return write_torchvision_model(models_dir, model, seed=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.defaults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,digits")
    parser.add_argument("--starts", type=int, default=5, help="fresh daemon starts per model (default: 5)")
    parser.add_argument("--load-s", type=float, default=60.0, help="seconds at concurrency 32 per start")
    parser.add_argument("--c1-s", type=float, default=15.0, help="seconds at concurrency 1 (daemon, then in process)")
    parser.add_argument("--limit-s", type=float, default=4.0, help="seconds per batch size of the in-process limit")
    parser.add_argument("--limit-batches", default="1,2,4,8,16")
    parser.add_argument("--shape-s", type=float, default=30.0, help="seconds per phase of the shape load (0: skip)")
    parser.add_argument("--shape-caps", default="1,4,16,64", help="fixed caps the shape load is compared with")
    parser.add_argument("--poll-s", type=float, default=2.0, help="how often the cap is read (GetModel)")
    parser.add_argument("--size", default="640x480", help="generated JPEG size")
    parser.add_argument("--inproc-workers", type=int, default=2, help="in-process preprocessing threads")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--short", action="store_true",
                        help="a smoke run: 1 start, 8 s of load, 3 s at c=1, 1 s per limit size, no shape load")
    parser.add_argument("--markdown", type=Path, help="also write the results as Markdown to this file")
    args = parser.parse_args(argv)
    if args.short:
        args.starts, args.load_s, args.c1_s, args.limit_s, args.shape_s = 1, 8.0, 3.0, 1.0, 0.0
        args.limit_batches = "1,4"
    args.models = [m for m in args.models.split(",") if m]
    args.limit_batches = [int(b) for b in args.limit_batches.split(",")]
    args.shape_caps = [int(c) for c in args.shape_caps.split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.defaults")
    workload = make_workload("jpeg", args.size, 16)
    sections = []
    with tempfile.TemporaryDirectory(prefix="classifyd-defaults-") as tmp:
        for model in args.models:
            models_dir = Path(tmp) / model
            version_dir = prepare(model, models_dir)
            version = load_version(version_dir, "cpu", 64)
            version.warm_up()
            version.choose_threads_now()  # as the loader does after the warm-up
            starts = []
            for index in range(args.starts):
                starts.append(one_start(model, models_dir, version, workload, args, index, Path(tmp)))
                _progress(f"{model} start {index + 1}: {describe(starts[-1])}")
            version.release()
            sections.append(section(model, starts))
    text = "\n\n".join([facts_block(facts), *sections])
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
