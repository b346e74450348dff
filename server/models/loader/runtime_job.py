"""The job behind ``runtime = "auto"``: build a version's module, export it to ONNX (or take the export from the
cache), pass the correctness gate, and measure eager PyTorch against ONNX Runtime; the result says which to serve.

The daemon runs it as ``python -m server.models.loader.runtime_job --version-dir ... --cache-dir ...`` in a
subprocess started under ``nice`` (:mod:`server.models.loader.runtime_choice` starts it, one at a time, as
:mod:`server.models.loader.job_process` says), so neither the export nor the measurement holds the daemon's GIL or
its inference thread; the last line it prints is the :class:`JobResult` as JSON. ``python -m server check`` calls
:func:`run_job` in process. It builds the module with the loader's own code
(:func:`server.models.loader.build.build_for_serving`, ``--trust-code`` honoured) and uses the loader's export cache
and gate (:mod:`server.models.loader.onnx`, :mod:`server.models.loader.gate`).

Everything here blocks (build, export, forward passes: seconds to minutes). :func:`run_job` never raises for a
version that cannot be exported, verified or built: its result stays on torch with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from server.core.manifest import load_manifest
from server.inference.runtime import LoadedVersion
from server.inference.runtimes import Runtime
from server.models.loader import onnx
from server.models.loader.build import build_for_serving
from server.models.loader.gate import gate_inputs, warmup_images
from server.models.loader.weights import WeightsError
from server.ops.host import keep_freed_memory

SWITCH_RATIO = 1.1
"""ONNX Runtime must be at least this much faster than eager PyTorch (best batch size against best batch size) to
be chosen: a smaller gain is within what a niced measurement on a busy host can get wrong."""
MEASURE_SIZES = (1, 8)
MEASURE_S = 4.0
"""Seconds of timed forward passes, both runtimes and every size together (each pass runs at least once)."""
ROUNDS = 3
"""Interleaved rounds: each runtime at each size once per round, the fastest round kept (the host's load drifts)."""
GATE_BATCH = 8
PARK_S = 0.05
BUSY_SHARE = 0.5
"""Below this share of their time on a CPU, the timed passes ran on a busy host (the niced job waits for the
daemon's threads): the reason then says so, since the ratio is rough there (a starved two-thread OpenMP team once
measured eager PyTorch at 13 images/s against 400 idle, ``74× eager``); the choice itself still holds."""


@dataclass(frozen=True)
class RuntimeSpeed:
    """One measured point: a runtime's images per second at one batch size (decode excluded; normalisation,
    forward pass and softmax included, as ``LoadedVersion.predict`` serves them)."""

    runtime: str
    batch_size: int
    images_per_second: float


@dataclass(frozen=True)
class JobRequest:
    """What one job works on."""

    version_dir: Path
    cache_dir: Path
    trust_code: bool = False
    threads: int = 1
    measure_s: float = MEASURE_S

    def argv(self) -> list[str]:
        """The command line of ``python -m server.models.loader.runtime_job`` for this request."""
        return ["--version-dir", str(self.version_dir), "--cache-dir", str(self.cache_dir), "--threads",
                str(self.threads), "--measure-s", str(self.measure_s), *(["--trust-code"] if self.trust_code else [])]


@dataclass(frozen=True)
class JobResult:
    """The runtime to serve ("torch" or "onnxruntime"), why, what was measured, and the verified export."""

    runtime: str
    reason: str
    speeds: tuple[RuntimeSpeed, ...] = ()
    onnx_path: str = ""
    """The cached export that passed the gate; empty unless ``runtime`` is "onnxruntime"."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobResult:
        """Parse :meth:`to_json`'s output. Raises ValueError (json's, or a missing key's) for anything else."""
        raw = json.loads(text)
        try:
            speeds = tuple(RuntimeSpeed(str(s["runtime"]), int(s["batch_size"]), float(s["images_per_second"]))
                           for s in raw["speeds"])
            return cls(str(raw["runtime"]), str(raw["reason"]), speeds, str(raw.get("onnx_path", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a runtime job result: {exc}") from None


def run_job(request: JobRequest) -> JobResult:
    """Build, export (or reuse the cached export), verify and measure the version in ``request.version_dir``.
    Blocks (seconds to minutes); never raises for the version's faults: they are the result's reason."""
    try:
        version = _build(request)
    except Exception as exc:  # noqa: BLE001 -- model code may raise anything; the version stays on torch
        return JobResult("torch", f"the module could not be built for the export: {type(exc).__name__}: {exc}")
    blocker = not_exportable(version)
    if blocker:
        return JobResult("torch", blocker)
    eager = version.runtime
    assert eager is not None
    try:
        path, exported = onnx.cached_export(version.module, request.version_dir, version.manifest, request.cache_dir)
        ort_runtime = onnx.open_export(path)
        version.runtime = ort_runtime
        inputs = gate_inputs(version, request.version_dir)
        worst = onnx.verify(version, inputs)
    except (WeightsError, ValueError) as exc:  # no export, or the gate refused it (ValidationError: bad image)
        return JobResult("torch", str(exc))
    except Exception as exc:  # noqa: BLE001 -- ONNX Runtime's Fail/InvalidArgument, OutputShapeError, model code
        return JobResult("torch", f"the export could not be opened or checked: {type(exc).__name__}: {exc}")
    share = CpuShare()
    try:
        speeds = measure(version, {"torch": eager, "onnxruntime": ort_runtime}, MEASURE_SIZES, request.measure_s,
                         share)
    except Exception as exc:  # noqa: BLE001 -- a runtime failing at a measured batch size: torch serves on
        return JobResult("torch", f"the measurement failed: {type(exc).__name__}: {exc}")
    gate = (f"gate passed on {len(inputs.arrays)} {inputs.kind} (largest difference {worst:.2g}, tolerance "
            f"{onnx.TOLERANCE:g}); export {'made now' if exported else 'from the cache'}")
    return choose(speeds, str(path), gate, share.share)


@dataclass
class CpuShare:
    """The timed passes' CPU time (of the thread that runs them) against their wall time."""

    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def share(self) -> float:
        """CPU over wall; 1.0 before any pass."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 1.0


def choose(speeds: list[RuntimeSpeed], onnx_path: str, gate: str, cpu_share: float = 1.0) -> JobResult:
    """ONNX Runtime when its best rate is at least :data:`SWITCH_RATIO` times eager PyTorch's, else torch. A
    ``cpu_share`` below :data:`BUSY_SHARE` (the passes waited for the CPU) is said in the reason."""
    best = {name: max(s.images_per_second for s in speeds if s.runtime == name) for name in ("torch", "onnxruntime")}
    ratio = best["onnxruntime"] / best["torch"]
    busy = (f", on a busy host (the passes had a CPU {cpu_share:.0%} of their time: the ratio is rough)"
            if cpu_share < BUSY_SHARE else "")
    measured = (f"onnxruntime {ratio:.2g}× eager (best {best['onnxruntime']:.0f} against {best['torch']:.0f} "
                f"images/s, batch sizes {', '.join(map(str, MEASURE_SIZES))}{busy})")
    if ratio >= SWITCH_RATIO:
        return JobResult("onnxruntime", f"{measured}; {gate}", tuple(speeds), onnx_path)
    return JobResult("torch", f"{measured}, below the {SWITCH_RATIO:g}× needed to switch; {gate}", tuple(speeds))


def measure(version: LoadedVersion, runtimes: dict[str, Runtime], sizes: tuple[int, ...],
            seconds: float, share: CpuShare | None = None) -> list[RuntimeSpeed]:
    """Images per second of each runtime at each batch size through ``version.predict``: :data:`ROUNDS`
    interleaved rounds, each runtime and size repeated for its share of ``seconds``, the fastest pass kept; the
    timed passes' CPU and wall time add up in ``share``. Leaves ``version.runtime`` as it found it. Blocks."""
    spec = version.manifest.input
    images = list(np.random.default_rng(0).integers(0, 256, (max(sizes), spec.height, spec.width, spec.channels),
                                                    dtype=np.uint8))
    slot = seconds / (ROUNDS * len(sizes) * len(runtimes))
    share = share if share is not None else CpuShare()
    best: dict[tuple[str, int], float] = {}
    serving = version.runtime
    try:
        for _ in range(ROUNDS):
            for size in sizes:
                for name, runtime in runtimes.items():
                    version.runtime = runtime
                    best[name, size] = min(best.get((name, size), float("inf")),
                                           _fastest_pass(version, images[:size], slot, share))
    finally:
        version.runtime = serving
    return [RuntimeSpeed(name, size, size / best[name, size]) for size in sizes for name in runtimes]


def _fastest_pass(version: LoadedVersion, batch: list[np.ndarray], seconds: float, share: CpuShare) -> float:
    time.sleep(PARK_S)  # the other runtime's worker threads spin a while after its last pass: let them park
    version.predict(batch)  # untimed: the first pass at a new size allocates
    fastest, spent, cpu = float("inf"), 0.0, time.thread_time()
    while spent < seconds or fastest == float("inf"):
        started = time.perf_counter()
        version.predict(batch)
        took = time.perf_counter() - started
        fastest, spent = min(fastest, took), spent + took
    share.cpu_s += time.thread_time() - cpu
    share.wall_s += spent
    return fastest


def _build(request: JobRequest) -> LoadedVersion:
    """The version's module built as the loader builds it, on the CPU, as a version batching :data:`GATE_BATCH`,
    warmed up and given its torch thread count as the daemon does, so eager is measured as it serves."""
    manifest = load_manifest(request.version_dir)
    module, manifest = build_for_serving(request.version_dir, manifest, torch.device("cpu"), request.trust_code)
    number = request.version_dir.name  # a label only: `publish` checks a staging directory named otherwise
    version = LoadedVersion(name=request.version_dir.parent.name, version=int(number) if number.isdigit() else 0,
                            manifest=manifest, module=module, device=torch.device("cpu"), max_batch_size=GATE_BATCH,
                            max_delay_ms=0.0)
    images = warmup_images(manifest, request.version_dir)
    version.warm_up(images)
    version.choose_threads_now(images)
    return version


def not_exportable(version: LoadedVersion) -> str:
    """Why the version stays on PyTorch without trying an export; empty when nothing stops it. The daemon asks
    before scheduling a job (:mod:`server.models.loader.runtime_choice`), ``check`` inside :func:`run_job`."""
    manifest = version.manifest
    if manifest.compile != "off":
        return f"compile = {manifest.compile!r} is set: torch.compile serves it, not ONNX Runtime"
    if version.precision != "fp32":
        return f"precision {version.precision} runs on PyTorch only (ONNX Runtime serves fp32 exports)"
    return ""


def _parse(argv: list[str]) -> JobRequest:
    parser = argparse.ArgumentParser(prog="python -m server.models.loader.runtime_job")
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure-s", type=float, default=MEASURE_S)
    parser.add_argument("--trust-code", action="store_true")
    args = parser.parse_args(argv)
    return JobRequest(args.version_dir, args.cache_dir, args.trust_code, max(1, args.threads), args.measure_s)


def main(argv: list[str] | None = None) -> int:
    """Run one job and print its result as the last line. Exit 0 with a result (whatever
    runtime it chose), 2 on bad usage, 1 (a traceback on stderr) when classifyd itself failed."""
    keep_freed_memory()  # as the daemon does: its eager and ONNX Runtime speeds are measured like the daemon's
    request = _parse(sys.argv[1:] if argv is None else argv)  # the daemon started it niced (runtime_choice)
    torch.set_num_threads(request.threads)  # ONNX Runtime's sessions take the same count (onnx.onnx_threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.redirect_stdout(sys.stderr):  # the exporters print progress: stdout carries the result only
        result = run_job(request)
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
