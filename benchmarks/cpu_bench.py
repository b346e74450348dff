"""The daemon against the in-process limit, side by side in one run (issue 5's CPU targets).

For each model (random-init torchvision weights saved to a temporary model directory):

1. **In-process limit**, no server: decode + preprocess (``server.inference.preprocess``) + forward
   (``LoadedVersion.predict``,
   the daemon's own code) at each batch size; the best batch size gives the limit. Also the forward pass alone,
   and the single-image pipeline's latency. It runs on the runtime the daemon serves (the manifest's ``runtime``,
   else ``--runtime``, the daemon's ``--default-runtime``; ``auto`` runs the daemon's own runtime job in process
   and follows its choice), and, when that is not eager PyTorch, on eager PyTorch too (issue 16's reference).
2. **Daemon with batching** (``python -m server`` in a subprocess, ``--max-batch-size`` = the best batch size
   unless given), loaded by ``client.bench`` at each concurrency level.
3. **Daemon with max_batch_size = 1**, the same load.

Default: resnet18 and mobilenet_v3_small, 640x480 JPEGs (q90), concurrency 1 and 32, runtime auto (the daemon is
measured after its runtime choice); about 5-7 minutes on 2 cores. A smoke run:

    python -m benchmarks.cpu_bench --models mobilenet_v3_small --batch-sizes 1,4 --inproc-seconds 0.5 \
        --inproc-warmup 0.5 --setups default --warmup 0.5 --duration 1

    python -m benchmarks.cpu_bench
    python -m benchmarks.cpu_bench --models resnet18 --markdown docs/benchmarks.md

``--switch-under-load SECONDS`` keeps the daemon at the top concurrency from its start, through its runtime switch
(``auto``) and SECONDS more, into the measured levels, as a production daemon usually switches; by default the daemon
is measured after a switch made idle.
    python -m benchmarks.cpu_bench --device cuda --payload tensor ...      (see benchmarks/gpu_bench.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from benchmarks.support import DaemonProcess, emit, facts_block, fmt, markdown_table, run_facts, write_torchvision_model
from client.api import image_request, tensor_request
from client.bench import UNARY_METHOD, BenchOptions, Payloads, parse_size, run_benchmark, synthetic_jpeg
from server.core.manifest import load_manifest
from server.core.types import RawTensor
from server.inference.preprocess import preprocess
from server.inference.runtime import LoadedVersion
from server.models.loader.build import build_for_serving
from server.models.loader.onnx import cached_export, open_export
from server.models.loader.runtime_job import JobRequest, run_job

Input = bytes | RawTensor


@dataclass
class Workload:
    """The same inputs two ways: for the in-process pipeline, and as serialised requests for the daemon."""

    inputs: list[Input]
    description: str

    def payloads(self, model: str) -> Payloads:
        requests = []
        for item in self.inputs:
            if isinstance(item, bytes):
                request = image_request(item, model=model, top_k=1)
            else:
                array = np.frombuffer(item.data, dtype=np.uint8).reshape(item.shape)
                request = tensor_request(array, model=model, top_k=1)
            requests.append(request.SerializeToString())
        return Payloads(tuple(requests), self.description)


def make_workload(kind: str, size: str, count: int) -> Workload:
    if kind == "tensor":
        height, width = parse_size(size, 2)
        rng = np.random.default_rng(0)
        inputs: list[Input] = [RawTensor("uint8", (height, width, 3),
                                         rng.integers(0, 256, height * width * 3, dtype=np.uint8).tobytes())
                               for _ in range(count)]
        return Workload(inputs, f"{count} raw uint8 tensors {height}x{width}x3")
    width, height = parse_size(size, 2)
    images = [synthetic_jpeg(width, height, seed=i) for i in range(count)]
    kib = np.mean([len(i) for i in images]) / 1024
    return Workload(list(images), f"{count} generated {width}x{height} JPEGs q90 (mean {kib:.0f} KiB)")


# ----- in-process

@dataclass
class InProcess:
    """The no-server figures of one model."""

    pipeline: dict[int, float]  # batch size → img/s, decode + preprocess + forward
    forward: dict[int, float]  # batch size → img/s, forward pass alone
    single_ms: list[float]  # per-image latency of the batch-1 pipeline
    runtime: str = "torch"  # what ran the forward pass

    @property
    def best_batch(self) -> int:
        return max(self.pipeline, key=lambda b: self.pipeline[b])

    @property
    def limit(self) -> float:
        return self.pipeline[self.best_batch]


def load_version(version_dir: Path, device: str, max_batch_size: int, export: Path | None = None) -> LoadedVersion:
    """The daemon's own loading path: manifest, strict weights, module on the device in the manifest's layout;
    served through ONNX Runtime from ``export`` when given (as the daemon serves a verified export)."""
    manifest = load_manifest(version_dir)
    module, manifest = build_for_serving(version_dir, manifest, torch.device(device))
    return LoadedVersion(name=version_dir.parent.name, version=1, manifest=manifest, module=module,
                         device=torch.device(device), max_batch_size=max_batch_size, max_delay_ms=0.0,
                         runtime=open_export(export) if export else None)


def served_runtime(version_dir: Path, args: argparse.Namespace, cache_dir: Path) -> tuple[str, Path | None]:
    """The runtime the daemon will serve the version on and its ONNX export (None for torch): the manifest's
    runtime, else ``--runtime``; ``auto`` runs the daemon's runtime job here and follows its choice."""
    manifest = load_manifest(version_dir)
    runtime = manifest.runtime or args.runtime
    if runtime == "auto" and torch.device(args.device).type == "cpu":
        result = run_job(JobRequest(version_dir, cache_dir, threads=torch.get_num_threads()))
        _progress(f"  runtime auto, in process: {result.runtime} ({result.reason})")
        return result.runtime, Path(result.onnx_path) if result.onnx_path else None
    if runtime == "onnxruntime":
        module, manifest = build_for_serving(version_dir, manifest, torch.device("cpu"))
        return runtime, cached_export(module, version_dir, manifest, cache_dir)[0]
    return "torch", None


def _batches(inputs: Sequence[Input], batch: int) -> Iterator[list[Input]]:
    position = 0
    while True:
        yield [inputs[(position + i) % len(inputs)] for i in range(batch)]
        position += batch


def _warm(step: Any, seconds: float, limit_s: float = 60.0) -> None:
    """Run ``step`` for at least ``seconds`` and until it stops getting faster.

    The first calls of a model are slow (allocator, kernel selection; seconds each on a loaded machine), so a
    fixed number of warm-up calls is not enough: warm-up ends when the last three calls are no slower than the
    three before them (or after ``limit_s``).
    """
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
        settled = len(times) >= 6 and np.median(times[-3:]) <= 1.2 * np.median(times[-6:-3])
        if settled and time.perf_counter() - started >= seconds:
            return


def sequential_pipeline(version: LoadedVersion, inputs: Sequence[Input], batch: int,
                        seconds: float) -> tuple[float, list[float]]:
    """img/s and per-batch seconds of preprocess-then-forward on this one thread."""
    spec = version.manifest.input
    source = _batches(inputs, batch)
    _warm(lambda: version.predict([preprocess(p, spec) for p in next(source)]), max(0.5, seconds / 4))
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        started = time.perf_counter()
        version.predict([preprocess(p, spec) for p in next(source)]).argmax(axis=1)
        times.append(time.perf_counter() - started)
    return batch * len(times) / sum(times), times


def overlapped_pipeline(version: LoadedVersion, inputs: Sequence[Input], batch: int, seconds: float,
                        workers: int) -> float:
    """img/s with ``workers`` threads preprocessing the next batch while the current one runs forward."""
    spec = version.manifest.input
    source = _batches(inputs, batch)
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(preprocess, p, spec) for p in next(source)]
        _warm(lambda: version.predict([f.result() for f in pending]), max(0.5, seconds / 4))
        pending = [pool.submit(preprocess, p, spec) for p in next(source)]
        started, done = time.perf_counter(), 0
        while time.perf_counter() < started + seconds or done < 3 * batch:
            arrays = [f.result() for f in pending]
            pending = [pool.submit(preprocess, p, spec) for p in next(source)]
            version.predict(arrays).argmax(axis=1)
            done += batch
        elapsed = time.perf_counter() - started
        for future in pending:
            future.result()
    return done / elapsed


def forward_only(version: LoadedVersion, inputs: Sequence[Input], batch: int, seconds: float) -> float:
    spec = version.manifest.input
    arrays = [preprocess(p, spec) for p in next(_batches(inputs, batch))]
    _warm(lambda: version.predict(arrays), max(0.5, seconds / 4))
    started, done = time.perf_counter(), 0
    while time.perf_counter() < started + seconds or done < 3 * batch:
        version.predict(arrays)
        done += batch
    return done / (time.perf_counter() - started)


def measure_in_process(version_dir: Path, workload: Workload, args: argparse.Namespace,
                       export: Path | None = None) -> InProcess:
    """Every batch size of ``--batch-sizes``: pipeline and forward-only throughput; batch 1 latencies. On ONNX
    Runtime from ``export`` when given, else eager PyTorch."""
    result = InProcess({}, {}, [], "onnxruntime" if export else "torch")
    version = load_version(version_dir, args.device, max(args.batch_sizes), export)
    blank = [preprocess(workload.inputs[0], version.manifest.input)]
    _warm(lambda: version.predict(blank), args.inproc_warmup)  # first calls are slow (allocator, kernel choice)
    for batch in args.batch_sizes:
        if args.inproc_workers > 1:
            result.pipeline[batch] = overlapped_pipeline(version, workload.inputs, batch, args.inproc_seconds,
                                                         args.inproc_workers)
        else:
            result.pipeline[batch], times = sequential_pipeline(version, workload.inputs, batch, args.inproc_seconds)
            if batch == 1:
                result.single_ms = [t * 1000 for t in times]
        result.forward[batch] = forward_only(version, workload.inputs, batch, args.inproc_seconds)
        _progress(f"  in-process batch {batch}: pipeline {result.pipeline[batch]:.1f} img/s, "
                  f"forward {result.forward[batch]:.1f} img/s")
    if not result.single_ms:  # overlapped workers, or --batch-sizes without 1: the one-image figure on its own
        result.single_ms = [t * 1000 for t in sequential_pipeline(version, workload.inputs, 1,
                                                                   args.inproc_seconds)[1]]
    version.release()
    gc.collect()
    return result


# ----- daemon

# The --max-batch-size of each daemon setup; "batching" uses the best in-process size (or --max-batch-size).
SETUP_BATCH: dict[str, int | None] = {"default": None, "mbs1": 1}

def measure_daemon(models_dir: Path, model: str, max_batch_size: int | None, workload: Workload,
                   args: argparse.Namespace, log_path: Path) -> list[dict[str, Any]]:
    """Start the daemon with ``--max-batch-size`` (None: default settings, the cap autotuned at load), run every
    concurrency level, stop it. Returns bench levels."""
    flags = ["--device", args.device, "--no-watch", "--default-runtime", args.runtime, "--cache-dir",
             str(models_dir.parent / "onnx-cache"), *shlex.split(args.daemon_flags)]
    if max_batch_size is not None:
        flags += ["--max-batch-size", str(max_batch_size)]
    payloads = workload.payloads(model)
    with DaemonProcess(models_dir, log_path, *flags) as daemon:
        load = SteadyLoad(daemon.target, model, payloads.requests, max(args.concurrency)) \
            if args.switch_under_load is not None else None
        runtime = wait_for_runtime(daemon.target, model)
        _progress(f"  the daemon serves on {runtime}" + ("" if load is None else
                  f" (switched under load at concurrency {load.concurrency}; {args.switch_under_load:g} s more)"))
        if load is not None:
            time.sleep(args.switch_under_load)  # the online tuner moves the cap meanwhile
        options = BenchOptions(target=daemon.target, model=model, top_k=1, concurrency=tuple(args.concurrency),
                               warmup_s=args.warmup, duration_s=args.duration, processes=args.client_processes,
                               progress=sys.stderr.isatty())
        if load is not None:
            load.stop()  # its calls in flight overlap the warm-up: the batches never pause
        report = run_benchmark(options, payloads)
    for level in report["levels"]:
        level["runtime"] = runtime
        if level["errors"]:
            _progress(f"  WARNING: errors at concurrency {level['concurrency']}: {level['error_examples']}")
    return report["levels"]


class SteadyLoad:
    """Closed-loop Classify calls from ``concurrency`` threads, from construction until :meth:`stop`: the daemon is
    under load when its runtime switches (``--switch-under-load``), as a production daemon usually is."""

    def __init__(self, target: str, model: str, requests: Sequence[bytes], concurrency: int) -> None:
        self.concurrency = concurrency
        self._stopping = threading.Event()
        self._channel = grpc.insecure_channel(target)
        call = self._channel.unary_unary(UNARY_METHOD)
        self._threads = [threading.Thread(target=self._loop, args=(call, requests, i), daemon=True)
                         for i in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _loop(self, call: Any, requests: Sequence[bytes], start: int) -> None:
        index = start
        while not self._stopping.is_set():
            try:
                call(requests[index % len(requests)], timeout=60)
            except grpc.RpcError:
                time.sleep(0.1)  # refused (still loading, overloaded): keep the pressure, not a busy loop
            index += 1

    def stop(self) -> None:
        """Ask every thread to stop after its call in flight; returns at once (the channel closes when they end)."""
        self._stopping.set()
        threading.Thread(target=self._close, daemon=True).start()

    def _close(self) -> None:
        for thread in self._threads:
            thread.join()
        self._channel.close()


def wait_for_runtime(target: str, model: str, timeout_s: float = 900.0) -> str:
    """The runtime the daemon serves ``model`` on once its runtime choice (``auto``) is made: measured after the
    switch, as issue 16's targets ask. Polls GetModel."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while True:
            info = stub.GetModel(pb.GetModelRequest(model=model), timeout=30)
            if not info.runtime_reason.startswith("auto: serving on PyTorch while") or time.monotonic() > deadline:
                return info.runtime
            time.sleep(1.0)


# ----- report

def model_section(model: str, inproc: InProcess, daemon: dict[str, list[dict[str, Any]]],
                  batch_used: int, eager: InProcess | None = None) -> tuple[str, dict[str, Any]]:
    """The Markdown section of one model and its JSON record (``eager``: the eager PyTorch reference when the
    daemon serves another runtime)."""
    limit = inproc.limit
    single = np.asarray(inproc.single_ms)
    rows = [[f"in-process pipeline ({inproc.runtime}), best batch {inproc.best_batch}", inproc.best_batch, "–",
             fmt(limit), "–", "–", "–", "–", "100%"],
            ["in-process pipeline, one image at a time", 1, 1, fmt(1000 / single.mean()),
             fmt(float(np.median(single)), 2), fmt(float(np.percentile(single, 99)), 2), 1, "–",
             f"{1000 / single.mean() / limit:.0%}"]]
    if eager is not None:
        rows.append([f"in-process pipeline (eager torch), best batch {eager.best_batch}", eager.best_batch, "–",
                     fmt(eager.limit), "–", "–", "–", "–", f"{eager.limit / limit:.0%}"])
    for setup, levels in daemon.items():
        size = SETUP_BATCH.get(setup, batch_used)
        label = "daemon, default settings (cap autotuned)" if size is None else f"daemon, max_batch_size {size}"
        label += f", on {levels[0]['runtime']}" if levels else ""
        for level in levels:
            lat = level["latency_ms"]
            rows.append([label, "auto" if size is None else size, level["concurrency"], fmt(level["throughput"]),
                         fmt(lat["p50"], 2), fmt(lat["p99"], 2), fmt(level["mean_batch_size"]),
                         _server_ms(level["server_mean_us"]), f"{level['throughput'] / limit:.0%}"])
    table = markdown_table(["setup", "max batch", "concurrency", "img/s", "p50 ms", "p99 ms", "mean batch",
                            "server preprocess / queue / compute ms", "of in-process limit"], rows)
    sizes = markdown_table(["batch size", *map(str, inproc.pipeline)],
                           [["pipeline img/s", *(fmt(v) for v in inproc.pipeline.values())],
                            ["forward only img/s", *(fmt(v) for v in inproc.forward.values())]])
    checks = target_lines(inproc, daemon, eager)
    text = "\n\n".join([f"### {model}", table, "In-process by batch size:", sizes, "\n".join(checks)])
    record = {"model": model, "in_process": {"pipeline": inproc.pipeline, "forward": inproc.forward,
                                             "best_batch": inproc.best_batch, "limit": limit,
                                             "single_image_ms": {"p50": float(np.median(single)),
                                                                 "p99": float(np.percentile(single, 99))}},
              "runtime": inproc.runtime, "eager_limit": eager.limit if eager else None,
              "daemon_max_batch_size": batch_used, "daemon": daemon, "checks": checks}
    return text, record


def _server_ms(means_us: dict[str, int]) -> str:
    """The daemon's own mean timings per request (from the responses), to show where the time goes."""
    if not means_us:
        return "–"
    return " / ".join(f"{means_us[k] / 1000:.1f}" for k in ("preprocess", "queue", "compute"))


def target_lines(inproc: InProcess, daemon: dict[str, list[dict[str, Any]]],
                 eager: InProcess | None = None) -> list[str]:
    """Issue 5's CPU targets, measured: share of the limit (the limit of the runtime the daemon serves),
    single-request overhead, batching against none; issue 16's: the default daemon against eager PyTorch."""
    lines = runtime_lines(inproc, daemon.get("default", []), eager)
    batching = {level["concurrency"]: level for level in daemon.get("batching", [])}
    unbatched = {level["concurrency"]: level for level in daemon.get("mbs1", [])}
    if batching:
        top, low = max(batching), min(batching)
        lines.append(f"- concurrency {top}: the daemon reaches {batching[top]['throughput'] / inproc.limit:.0%} of "
                     f"the in-process limit (target ≥ 90%)")
        p50 = batching[low]["latency_ms"]["p50"]
        if p50 is not None:
            lines.append(f"- concurrency {low}: daemon p50 {p50:.2f} ms against {np.median(inproc.single_ms):.2f} ms "
                         f"in process: {p50 - np.median(inproc.single_ms):+.2f} ms (target ≤ +2 ms)")
        if top in unbatched and unbatched[top]["throughput"]:
            ratio = batching[top]["throughput"] / unbatched[top]["throughput"]
            lines.append(f"- concurrency {top}: batching gives {ratio:.2f}× the throughput of max_batch_size = 1 "
                         f"(target > 1)")
    default = {level["concurrency"]: level for level in daemon.get("default", [])}
    if default:
        top = max(default)
        lines.append(f"- concurrency {top}, default settings (cap autotuned at load): the daemon reaches "
                     f"{default[top]['throughput'] / inproc.limit:.0%} of the in-process limit (issue 8 target ≥ 95%)")
    return lines


def runtime_lines(inproc: InProcess, default: list[dict[str, Any]], eager: InProcess | None) -> list[str]:
    """Issue 16: served with default settings (after the runtime choice), at the highest concurrency, against the
    eager PyTorch pipeline limit and the limit of the runtime it runs on."""
    if not default or eager is None:
        return []
    top = max(default, key=lambda level: level["concurrency"])
    return [f"- concurrency {top['concurrency']}, default settings on {top['runtime']}: "
            f"{top['throughput'] / eager.limit:.2f}× the in-process eager PyTorch limit (issue 16 target ≥ 1.4× "
            f"resnet18, ≥ 1.5× mobilenet_v3_small) and {top['throughput'] / inproc.limit:.0%} of the in-process "
            f"{inproc.runtime} limit (target ≥ 90%)"]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


MANIFEST_TABLES = {"": "top", "input": "input_table", "batching": "batching"}
"""Where a ``--manifest`` key goes, by its table (``input.size``, ``batching.max_batch_size``, or top level)."""


def manifest_tables(settings: list[str]) -> dict[str, dict[str, Any]]:
    """``["precision=\"bf16\"", "input.decode=\"device\"", "batching.max_batch_size=8"]`` → ``{"top": {...},
    "input_table": {...}, "batching": {...}}``. Raises ValueError for a key of another table."""
    tables: dict[str, dict[str, Any]] = {name: {} for name in MANIFEST_TABLES.values()}
    for setting in settings:
        key, _, value = setting.partition("=")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word: a string
        table, _, name = key.strip().rpartition(".")
        if table not in MANIFEST_TABLES:
            raise ValueError(f"--manifest {setting}: [{table}] is not settable here; use a top-level key, "
                             "input.<key> or batching.<key>")
        tables[MANIFEST_TABLES[table]][name] = parsed
    return tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small", help="torchvision architectures")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (daemon and in-process)")
    parser.add_argument("--payload", choices=("jpeg", "tensor"), default="jpeg")
    parser.add_argument("--size", default="", help="JPEG WxH (default 640x480) or tensor HxW (default 224x224)")
    parser.add_argument("--payloads", type=int, default=16, help="distinct inputs (default: 16)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 32], help="daemon load levels (default: 1,32)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16, 32],
                        help="in-process batch sizes to try (default: 1,2,4,8,16,32)")
    parser.add_argument("--inproc-seconds", type=float, default=2.0, help="seconds per in-process measurement")
    parser.add_argument("--inproc-warmup", type=float, default=2.0,
                        help="seconds of forward passes before the in-process measurements (default: 2)")
    parser.add_argument("--inproc-workers", type=int, default=1,
                        help="preprocessing threads of the in-process pipeline; 1 = sequential (default)")
    parser.add_argument("--max-batch-size", default="auto",
                        help="daemon --max-batch-size for the batching run: auto = best in-process batch size")
    parser.add_argument("--setups", default="default,batching,mbs1",
                        help="daemon runs: default (no batch flags: the cap is autotuned at load), batching "
                             "(--max-batch-size), mbs1 (max_batch_size 1)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per level (default: 2)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level (default: 8)")
    parser.add_argument("--client-processes", type=int, default=1, help="bench client processes (default: 1)")
    parser.add_argument("--manifest", action="append", default=[], metavar="KEY=VALUE",
                        help="a manifest setting for the benchmarked model, TOML value, e.g. precision=\"bf16\", "
                             "channels_last=true, input.decode=\"device\", batching.max_batch_size=8 "
                             "(repeatable)")
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                        help="the daemon's --default-runtime, and what the in-process limit runs on unless the "
                             "manifest (--manifest runtime=...) says (default: auto, as the daemon)")
    parser.add_argument("--skip-eager", action="store_true",
                        help="do not measure the eager PyTorch in-process reference when another runtime serves")
    parser.add_argument("--switch-under-load", type=float, metavar="SECONDS",
                        help="keep the daemon at the top concurrency from its start, through its runtime switch "
                             "(auto) and SECONDS more, into the measured levels (default: measure a daemon that "
                             "switched idle)")
    parser.add_argument("--daemon-flags", default="", help="extra flags for python -m server, e.g. '--workers 4'")
    parser.add_argument("--markdown", type=Path, help="append the results section to this Markdown file")
    parser.add_argument("--json", type=Path, help="write every figure as JSON to this file")
    parser.add_argument("--title", default="", help="heading of the Markdown section")
    args = parser.parse_args(argv)
    args.size = args.size or ("224x224" if args.payload == "tensor" else "640x480")
    try:
        manifest_tables(args.manifest)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.cpu_bench", args.device)
    workload = make_workload(args.payload, args.size, args.payloads)
    sections, records = [], []
    with tempfile.TemporaryDirectory(prefix="classifyd-bench-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            models_dir = Path(tmp) / model / "models"
            version_dir = write_torchvision_model(models_dir, model, seed=0, **manifest_tables(args.manifest))
            runtime, export = served_runtime(version_dir, args, models_dir.parent / "onnx-cache")
            _progress(f"{model}: in-process on {runtime}, {workload.description}")
            inproc = measure_in_process(version_dir, workload, args, export)
            eager = None
            if export is not None and not args.skip_eager:
                _progress(f"{model}: in-process on eager PyTorch (the reference)")
                eager = measure_in_process(version_dir, workload, args)
            batch = inproc.best_batch if args.max_batch_size == "auto" else int(args.max_batch_size)
            daemon = {}
            for setup in [s.strip() for s in args.setups.split(",") if s.strip()]:
                size = SETUP_BATCH.get(setup, batch)
                _progress(f"{model}: daemon, max_batch_size {size or 'autotuned'}")
                daemon[setup] = measure_daemon(models_dir, model, size, workload, args,
                                               Path(tmp) / f"{model}-{setup}.log")
            text, record = model_section(model, inproc, daemon, batch, eager)
            sections.append(text)
            records.append(record)
    title = args.title or f"Daemon against the in-process limit ({args.device}, {workload.description})"
    output = "\n\n".join([f"## {title}", facts_block(facts), *sections]) + "\n"
    emit(output, args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "workload": workload.description, "models": records},
                                        indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
