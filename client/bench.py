"""``python -m client bench``: load generator and latency recorder for a classifyd daemon.

Closed loop (a fixed number of requests in flight, one level or a sweep) or open
loop (a fixed request rate, latency counted from each request's scheduled send
time, so a slow server cannot hide its queueing). A warm-up window, then a
measured window: only requests that complete inside the measured window count.

Built to cost the machine little, so that it can measure a server on the same
host: every request is serialised once before the run and sent as bytes through
a generic ``grpc.aio`` method with identity (de)serialisers; a response is parsed
once (upb, ~2 us); one asyncio loop per process; ``--processes N`` spreads the
load over N client processes started together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import queue
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from classifier.v1 import classifier_pb2 as pb

UNARY_METHOD = "/classifier.v1.Classifier/Classify"
STREAM_METHOD = "/classifier.v1.Classifier/ClassifyStream"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


# ----- options and payloads

@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run: where, what to send, and how much load."""

    target: str = "127.0.0.1:50051"
    model: str = ""
    version: int = 0
    top_k: int = 1
    concurrency: tuple[int, ...] = (8,)
    rates: tuple[float, ...] = ()  # requests/s; when set, the run is open loop
    warmup_s: float = 2.0
    duration_s: float = 10.0
    stream: bool = False
    processes: int = 1
    timeout_s: float = 30.0
    max_outstanding: int = 10_000  # open loop: requests in flight beyond this are counted as CLIENT_BACKLOG
    progress: bool = False

    @property
    def levels(self) -> list[tuple[str, float]]:
        """``("rate", r)`` or ``("concurrency", c)`` for each load level, in order."""
        if self.rates:
            return [("rate", r) for r in self.rates]
        return [("concurrency", float(c)) for c in self.concurrency]


@dataclass(frozen=True)
class Payloads:
    """Serialised ClassifyRequests, sent round-robin, and what they hold."""

    requests: tuple[bytes, ...]
    description: str

    @property
    def mean_bytes(self) -> float:
        return float(np.mean([len(r) for r in self.requests]))


def synthetic_jpeg(width: int, height: int, *, seed: int, quality: int = 90, noise: float = 12.0) -> bytes:
    """A photo-like JPEG: smooth random colour fields plus sensor-like noise (640x480 q90 is about 120 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0.0, noise, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def parse_size(text: str, parts: int) -> tuple[int, ...]:
    """``"640x480"`` → (640, 480); raises ValueError unless it has ``parts`` positive integers."""
    values = tuple(int(v) for v in text.lower().split("x"))
    if len(values) != parts or min(values) < 1:
        raise ValueError(f"expected {parts} positive integers separated by 'x', got {text!r}")
    return values


def _request(options: BenchOptions, **input_field: Any) -> bytes:
    return pb.ClassifyRequest(model=options.model, version=options.version, top_k=options.top_k,
                              **input_field).SerializeToString()


def image_payloads(options: BenchOptions, images: Sequence[bytes], description: str) -> Payloads:
    return Payloads(tuple(_request(options, image=data) for data in images), description)


def generated_payloads(options: BenchOptions, width: int, height: int, count: int = 16,
                       quality: int = 90) -> Payloads:
    """``count`` different synthetic JPEGs of ``width x height``."""
    images = [synthetic_jpeg(width, height, seed=i, quality=quality) for i in range(count)]
    kib = np.mean([len(i) for i in images]) / 1024
    return image_payloads(options, images, f"{count} generated {width}x{height} JPEGs q{quality} "
                                           f"(mean {kib:.0f} KiB)")


def folder_payloads(options: BenchOptions, folder: Path, limit: int = 256) -> Payloads:
    """Up to ``limit`` image files of ``folder`` (sorted). Raises ValueError when it holds none."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = [p.read_bytes() for p in paths]
    kib = np.mean([len(i) for i in images]) / 1024
    return image_payloads(options, images, f"{len(images)} images from {folder} (mean {kib:.0f} KiB)")


def tensor_payloads(options: BenchOptions, height: int, width: int, channels: int, count: int = 16) -> Payloads:
    """``count`` random raw uint8 ``H x W x C`` tensors."""
    rng = np.random.default_rng(0)
    shape = [height, width] if channels == 1 else [height, width, channels]
    requests = tuple(
        _request(options, tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=shape,
                                           data=rng.integers(0, 256, height * width * channels,
                                                             dtype=np.uint8).tobytes()))
        for _ in range(count))
    return Payloads(requests, f"{count} random uint8 tensors {height}x{width}x{channels}")


# ----- recording

@dataclass
class Samples:
    """What one process saw in one level's measured window (picklable, mergeable)."""

    window_s: float = 0.0
    latencies_s: array = field(default_factory=lambda: array("d"))
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    batch_sizes: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    server_us: Counter = field(default_factory=Counter)  # sums of preprocess/queue/compute microseconds

    def merge(self, other: Samples) -> None:
        self.window_s = max(self.window_s, other.window_s)
        self.latencies_s.extend(other.latencies_s)
        for mine, theirs in ((self.errors, other.errors), (self.batch_sizes, other.batch_sizes),
                             (self.versions, other.versions), (self.server_us, other.server_us)):
            mine.update(theirs)
        for code, message in other.error_examples.items():
            self.error_examples.setdefault(code, message)


class Recorder:
    """Counts completions inside ``[start, end)`` (perf_counter seconds); everything else is warm-up or drain."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.samples = Samples(window_s=end - start)
        self.completed = 0  # every completion, warm-up included: for the progress display
        self.failed = 0

    def ok(self, response: pb.ClassifyResponse, sent: float, done: float) -> None:
        self.completed += 1
        if not self.start <= done < self.end:
            return
        if response.HasField("error"):  # ClassifyStream reports a failed request in-band
            self.error(_CODE_NAMES.get(response.error.code, str(response.error.code)), response.error.message,
                       done)
            return
        samples = self.samples
        samples.latencies_s.append(done - sent)
        samples.batch_sizes[response.batch_size] += 1
        samples.versions[response.version] += 1
        server = samples.server_us
        server["preprocess"] += response.preprocess_us
        server["queue"] += response.queue_us
        server["compute"] += response.compute_us

    def error(self, code: str, message: str, done: float) -> None:
        self.failed += 1
        if self.start <= done < self.end:
            self.samples.errors[code] += 1
            self.samples.error_examples.setdefault(code, message)


# ----- transports: send one serialised request, get the parsed response or a (code, message) failure

class RpcFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


Send = Callable[[bytes], Awaitable[pb.ClassifyResponse]]


def unary_sender(channel: grpc.aio.Channel, timeout_s: float) -> Send:
    call = channel.unary_unary(UNARY_METHOD, request_serializer=None, response_deserializer=None)
    parse = pb.ClassifyResponse.FromString

    async def send(payload: bytes) -> pb.ClassifyResponse:
        try:
            return parse(await call(payload, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise RpcFailed(exc.code().name, exc.details() or "") from None

    return send


class StreamSender:
    """Multiplexes requests over one ClassifyStream; responses are matched by a request_id appended per send.

    A protobuf message followed by more fields is still one message, so the request_id (field 6) is appended
    to the pre-serialised bytes instead of serialising again. A broken stream fails its pending requests with
    its status and is reopened on the next send.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._method = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[pb.ClassifyResponse]] = {}
        self._write_lock = asyncio.Lock()
        self._next_id = 0

    async def send(self, payload: bytes) -> pb.ClassifyResponse:
        if self._call is None:
            self._call = self._method()
            self._reader = asyncio.create_task(self._read(self._call))
        call = self._call
        self._next_id += 1
        request_id = format(self._next_id, "x")
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with self._write_lock:
                await call.write(payload + b"\x32" + bytes([len(request_id)]) + request_id.encode())
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._pending.pop(request_id, None)
            if future.done():  # the reader already failed it with the stream's status
                return await future
            raise RpcFailed("UNAVAILABLE", f"stream closed: {exc}") from None
        return await future

    async def _read(self, call: Any) -> None:
        parse = pb.ClassifyResponse.FromString
        failure = RpcFailed("UNAVAILABLE", "stream ended")
        try:
            async for raw in call:
                response = parse(raw)
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            failure = RpcFailed(exc.code().name, exc.details() or "")
        if self._call is call:
            self._call = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()

    async def aclose(self) -> None:
        if self._call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


# ----- load generation (one process, one event loop)

async def _one(send: Send, payload: bytes, sent: float, recorder: Recorder) -> None:
    try:
        response = await send(payload)
    except RpcFailed as exc:
        recorder.error(exc.code, exc.message, time.perf_counter())
    else:
        recorder.ok(response, sent, time.perf_counter())


async def closed_loop(send: Send, payloads: Sequence[bytes], concurrency: int, recorder: Recorder,
                      offset: int = 0) -> None:
    """``concurrency`` workers, each sending its next request as soon as the last one is answered."""

    async def worker(index: int) -> None:
        position = offset + index
        while time.perf_counter() < recorder.end:
            await _one(send, payloads[position % len(payloads)], time.perf_counter(), recorder)
            position += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def open_loop(send: Send, payloads: Sequence[bytes], rate: float, recorder: Recorder, begin: float,
                    max_outstanding: int, phase: float = 0.0) -> None:
    """Send at ``rate`` per second from ``begin`` until the window ends; latency counts from the scheduled time."""
    interval = 1.0 / rate
    scheduled = begin + phase * interval
    in_flight: set[asyncio.Task[None]] = set()
    count = 0
    while scheduled < recorder.end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_outstanding:
            recorder.error("CLIENT_BACKLOG", f"more than {max_outstanding} requests in flight", time.perf_counter())
        else:
            task = asyncio.create_task(_one(send, payloads[count % len(payloads)], scheduled, recorder))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        count += 1
        scheduled += interval
    if in_flight:
        await asyncio.wait(in_flight)


@dataclass(frozen=True)
class Share:
    """One process's part of a level: its concurrency or rate, and its place among the processes."""

    kind: str  # "concurrency" or "rate"
    amount: float
    index: int = 0
    count: int = 1


async def run_share(options: BenchOptions, payloads: Sequence[bytes], share: Share, start: float,
                    on_recorder: Callable[[Recorder], None] | None = None) -> Samples:
    """Run one process's share of a level; the warm-up begins at perf_counter ``start``."""
    recorder = Recorder(start + options.warmup_s, start + options.warmup_s + options.duration_s)
    if on_recorder:
        on_recorder(recorder)
    channel = grpc.aio.insecure_channel(options.target, options=_CHANNEL_OPTIONS)
    stream = StreamSender(channel) if options.stream else None
    send = stream.send if stream else unary_sender(channel, options.timeout_s)
    try:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        if share.kind == "rate":
            await open_loop(send, payloads, share.amount, recorder, start, options.max_outstanding,
                            phase=share.index / share.count)
        else:
            await closed_loop(send, payloads, int(share.amount), recorder, offset=share.index)
    finally:
        if stream:
            await stream.aclose()
        await channel.close()
    return recorder.samples


def split(kind: str, amount: float, processes: int) -> list[Share]:
    """Divide a level over processes (a concurrency below the process count uses fewer processes)."""
    if kind == "rate":
        return [Share(kind, amount / processes, i, processes) for i in range(processes)]
    total = int(amount)
    used = max(1, min(processes, total))
    return [Share(kind, total // used + (1 if i < total % used else 0), i, used) for i in range(used)]


# ----- progress display

class Progress:
    """One stderr line, rewritten with \\r: phase, time, completions."""

    def __init__(self, label: str, options: BenchOptions, enabled: bool) -> None:
        self.label = label
        self.options = options
        self.enabled = enabled

    def show(self, elapsed: float, completed: int, failed: int) -> None:
        if not self.enabled:
            return
        warmup = self.options.warmup_s
        phase = "warm-up  " if elapsed < warmup else "measuring"
        shown = min(elapsed, warmup) if elapsed < warmup else min(elapsed - warmup, self.options.duration_s)
        total = warmup if elapsed < warmup else self.options.duration_s
        sys.stderr.write(f"\r  {self.label:<16} {phase} {shown:5.1f}/{total:.1f} s  {completed:>8} done  "
                         f"{failed:>6} failed ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


async def _show_progress(progress: Progress, start: float, counts: Callable[[], tuple[int, int]]) -> None:
    while True:
        progress.show(time.perf_counter() - start, *counts())
        await asyncio.sleep(0.5)


# ----- one level, in this process or spread over several

def run_level(options: BenchOptions, payloads: Payloads, kind: str, amount: float) -> Samples:
    """Run one load level and return the merged samples of every client process. Blocks for the level's time."""
    shares = split(kind, amount, options.processes)
    progress = Progress(f"{'rate' if kind == 'rate' else 'concurrency'} {amount:g}", options, options.progress)
    try:
        if len(shares) == 1:
            return asyncio.run(_run_here(options, payloads.requests, shares[0], progress))
        return _run_in_processes(options, payloads.requests, shares, progress)
    finally:
        progress.done()


async def _run_here(options: BenchOptions, payloads: Sequence[bytes], share: Share, progress: Progress) -> Samples:
    start = time.perf_counter()
    recorders: list[Recorder] = []
    ticker = asyncio.create_task(_show_progress(progress, start, lambda: (
        (recorders[0].completed, recorders[0].failed) if recorders else (0, 0))))
    try:
        return await run_share(options, payloads, share, start, recorders.append)
    finally:
        ticker.cancel()


def _run_in_processes(options: BenchOptions, payloads: Sequence[bytes], shares: list[Share],
                      progress: Progress) -> Samples:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(shares) + 1)
    counts = context.Array("q", 2 * len(shares), lock=False)
    results = context.Queue()
    children = [context.Process(target=_child, args=(options, payloads, share, barrier, counts, results),
                                daemon=True) for share in shares]
    for child in children:
        child.start()
    try:
        barrier.wait(timeout=120)
        start = time.perf_counter()
        merged = Samples()
        for _ in children:
            outcome = _next_result(results, children, lambda: progress.show(
                time.perf_counter() - start, sum(counts[0::2]), sum(counts[1::2])))
            if isinstance(outcome, str):
                raise RuntimeError(f"client process failed: {outcome}")
            merged.merge(outcome)
        return merged
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.terminate()


def _next_result(results: Any, children: list[Any], tick: Callable[[], None]) -> Samples | str:
    """The next child's samples (or error text); raises RuntimeError if every child died without answering."""
    while True:
        tick()
        try:
            return results.get(timeout=0.5)
        except queue.Empty:
            if not any(child.is_alive() for child in children):
                raise RuntimeError("client processes exited without reporting") from None


def _child(options: BenchOptions, payloads: Sequence[bytes], share: Share, barrier: Any, counts: Any,
           results: Any) -> None:
    """A client process: wait for the others, run its share, send back its samples (or its error text)."""
    try:
        barrier.wait(timeout=120)
        results.put(asyncio.run(_child_run(options, payloads, share, counts)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put(f"{type(exc).__name__}: {exc}")


async def _child_run(options: BenchOptions, payloads: Sequence[bytes], share: Share, counts: Any) -> Samples:
    recorders: list[Recorder] = []

    async def publish() -> None:
        while True:
            if recorders:
                counts[2 * share.index] = recorders[0].completed
                counts[2 * share.index + 1] = recorders[0].failed
            await asyncio.sleep(0.25)

    ticker = asyncio.create_task(publish())
    try:
        return await run_share(options, payloads, share, time.perf_counter(), recorders.append)
    finally:
        ticker.cancel()


# ----- reporting

def summarise(kind: str, amount: float, samples: Samples) -> dict[str, Any]:
    """One level's figures: throughput, latency percentiles (successful requests), errors, batch sizes."""
    latencies = np.asarray(samples.latencies_s, dtype=np.float64) * 1000.0
    ok = len(latencies)
    points = np.percentile(latencies, PERCENTILES) if ok else [float("nan")] * len(PERCENTILES)
    hist = {str(size): count for size, count in sorted(samples.batch_sizes.items())}
    return {
        "concurrency": int(amount) if kind == "concurrency" else None,
        "rate": amount if kind == "rate" else None,
        "window_s": round(samples.window_s, 3),
        "requests": ok,
        "throughput": ok / samples.window_s if samples.window_s else 0.0,
        "latency_ms": {
            **{f"p{p:g}": _round(v) for p, v in zip(PERCENTILES, points, strict=True)},
            "mean": _round(float(latencies.mean())) if ok else None,
            "max": _round(float(latencies.max())) if ok else None,
        },
        "errors": dict(sorted(samples.errors.items())),
        "error_examples": dict(sorted(samples.error_examples.items())),
        "batch_sizes": hist,
        "mean_batch_size": (sum(s * c for s, c in samples.batch_sizes.items()) / ok) if ok else None,
        "versions": {str(v): c for v, c in sorted(samples.versions.items())},
        "server_mean_us": {k: round(v / ok) for k, v in sorted(samples.server_us.items())} if ok else {},
    }


def _round(value: float) -> float | None:
    return None if value != value else round(value, 3)  # NaN → None, so the JSON stays standard


def machine() -> dict[str, Any]:
    """Where the client ran: host, CPU, cores, Python."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "grpcio": grpc.__version__}


def run_benchmark(options: BenchOptions, payloads: Payloads) -> dict[str, Any]:
    """Every level of ``options``, in order; the JSON report. Blocks for the whole run."""
    levels = []
    for kind, amount in options.levels:
        levels.append(summarise(kind, amount, run_level(options, payloads, kind, amount)))
    return {
        "target": options.target,
        "model": options.model,
        "version": options.version,
        "rpc": "ClassifyStream" if options.stream else "Classify",
        "mode": "open loop" if options.rates else "closed loop",
        "payload": {"description": payloads.description, "count": len(payloads.requests),
                    "mean_request_bytes": round(payloads.mean_bytes)},
        "options": {k: v for k, v in asdict(options).items() if k not in ("target", "model", "version", "progress")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "client": machine(),
        "levels": levels,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a terminal table, one row per level, then batch-size histograms and error messages."""
    load = "rate/s" if report["mode"] == "open loop" else "conc."
    header = (f"{load:>7} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'ok':>8} "
              f"{'errors':>7} {'batch':>6}")
    lines = [f"{report['rpc']} → {report['target']} model {report['model'] or '(default)'}, {report['mode']}, "
             f"{report['payload']['description']}", header, "-" * len(header)]
    for level in report["levels"]:
        amount = level["rate"] if level["rate"] is not None else level["concurrency"]
        lat = level["latency_ms"]
        mean_batch = level["mean_batch_size"]
        lines.append(f"{amount:>7g} {level['throughput']:>9.1f} {_ms(lat['p50'])} {_ms(lat['p90'])} "
                     f"{_ms(lat['p99'])} {_ms(lat['p99.9'], 9)} {level['requests']:>8} "
                     f"{sum(level['errors'].values()):>7} {'-' if mean_batch is None else f'{mean_batch:.1f}':>6}")
    for level in report["levels"]:
        amount = level["rate"] if level["rate"] is not None else level["concurrency"]
        if level["batch_sizes"]:
            hist = " ".join(f"{size}:{count}" for size, count in level["batch_sizes"].items())
            lines.append(f"{load} {amount:g}: requests by batch size  {hist}")
        for code, count in level["errors"].items():
            lines.append(f"{load} {amount:g}: {count} × {code}: {level['error_examples'].get(code, '')}")
    return "\n".join(lines)


def _ms(value: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


# ----- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags."""
    parser.add_argument("--model", default="", help="model name (default: the daemon's default model)")
    parser.add_argument("--version", type=int, default=0, help="pin a version (default: newest ready)")
    parser.add_argument("--top-k", type=int, default=1, help="predictions per response (default: 1)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="8",
                      help="closed loop: requests in flight, one level or a sweep such as 1,8,32,128 (default: 8)")
    load.add_argument("--rate", default="", help="open loop: requests per second, one level or a sweep (100,200)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per level (default: 2)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default: 10)")
    payload = parser.add_mutually_exclusive_group()
    payload.add_argument("--images", type=Path, help="send the image files of this folder")
    payload.add_argument("--generate", default="", metavar="WxH",
                         help="send generated JPEGs of this size, q90 (the default: 640x480)")
    payload.add_argument("--tensor", default="", metavar="HxWxC", help="send raw uint8 tensors, e.g. 224x224x3")
    parser.add_argument("--payloads", type=int, default=16, help="distinct generated payloads (default: 16)")
    parser.add_argument("--stream", action="store_true", help="use ClassifyStream instead of unary Classify")
    parser.add_argument("--processes", type=int, default=1, help="client processes sharing the load (default: 1)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write the JSON report to FILE; alone: print JSON instead of the table")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    parser.add_argument("--target", default=argparse.SUPPRESS, help="host:port")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """BenchOptions from parsed flags. Raises ValueError for a malformed level list."""
    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c.strip()) if not args.rate else ()
    rates = tuple(float(r) for r in args.rate.split(",") if r.strip()) if args.rate else ()
    if any(c < 1 for c in concurrency) or any(r <= 0 for r in rates) or not (concurrency or rates):
        raise ValueError("--concurrency needs integers >= 1 and --rate numbers > 0")
    if args.duration <= 0 or args.warmup < 0 or args.processes < 1:
        raise ValueError("--duration must be > 0, --warmup >= 0 and --processes >= 1")
    return BenchOptions(target=args.target, model=args.model, version=args.version, top_k=args.top_k,
                        concurrency=concurrency, rates=rates, warmup_s=args.warmup, duration_s=args.duration,
                        stream=args.stream, processes=args.processes, timeout_s=args.timeout,
                        progress=args.progress and sys.stderr.isatty())


def payloads_from_args(options: BenchOptions, args: argparse.Namespace) -> Payloads:
    if args.images:
        return folder_payloads(options, args.images)
    if args.tensor:
        height, width, channels = parse_size(args.tensor, 3)
        return tensor_payloads(options, height, width, channels, args.payloads)
    width, height = parse_size(args.generate or "640x480", 2)
    return generated_payloads(options, width, height, args.payloads)


def main(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand: table on stdout (or JSON), progress on stderr."""
    try:
        options = options_from_args(args)
        payloads = payloads_from_args(options, args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_benchmark(options, payloads)
    report["command"] = " ".join(["python -m client", *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") \
        else " ".join(sys.argv)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.json == "-":
        print(text)
    else:
        print(format_table(report))
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0
