"""Forward pass only, runtime against runtime: eager PyTorch, eager + channels_last, ONNX Runtime and (when
installed) OpenVINO, same random-init weights, interleaved rounds in one run.

For each torchvision model (random init, never pretrained) the module is exported once to ONNX (the dynamo
exporter with a dynamic batch dimension, as the daemon does: server/models/loader/onnx.py) and opened in ONNX
Runtime with ``torch.get_num_threads()`` intra-op threads (server/inference/runtimes.py ``open_session``, the
session the daemon serves with). OpenVINO, an optional package that is not a dependency (issue 16 item 6), runs
the same ONNX file with the LATENCY hint when ``import openvino`` works; ``--runtimes`` chooses. Each round times
every (batch size, runtime) cell once for ``--seconds``; the median over rounds is reported. Printed: img/s per
batch size, the best img/s and the batch-1 latency per runtime, and their ratio to eager. Compare figures within
one run only: the CPU under these machines changes between sessions.

    python -m benchmarks.runtime_bench
    python -m benchmarks.runtime_bench --models resnet18 --batch-sizes 1,8 --rounds 5 --markdown docs/benchmarks.md
    python -m benchmarks.runtime_bench --quick        # tiny sizes: proves the script runs, measures nothing
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.support import emit, facts_block, fmt, markdown_table, run_facts
from server.inference.runtimes import open_session
from server.models.loader.architectures import build_architecture

Runner = Callable[[np.ndarray], Any]
RUNTIMES = ("eager", "channels_last", "onnxruntime", "openvino", "openvino_bf16")


def export_onnx(module: nn.Module, size: int, path: Path) -> Path:
    """Export ``module`` with the dynamo exporter and a dynamic batch dimension. Blocks (seconds)."""
    example = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter advice is noise in a benchmark's output
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), dynamo=True, external_data=False)
    return path


def eager_runner(module: nn.Module, channels_last: bool) -> Runner:
    module = copy.deepcopy(module).eval()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> Any:
        tensor = torch.from_numpy(batch)
        if channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return module(tensor)
    return run


def onnxruntime_runner(onnx_path: Path) -> Runner:
    session = open_session(onnx_path, torch.get_num_threads(), pixels=False)  # the float forward pass alone
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def openvino_runner(onnx_path: Path, precision: str) -> Runner | None:
    """OpenVINO's CPU plugin on the ONNX file with the LATENCY hint, or None when openvino is not installed.
    ``precision`` is its INFERENCE_PRECISION_HINT: its default on a CPU with AVX-512 BF16 or AMX is bf16, so
    "f32" is the like-for-like figure and "bf16" what OpenVINO does out of the box there."""
    try:
        import openvino as ov  # optional: not a project dependency (issue 16 item 6)
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda batch: request.infer([batch])[0]


def build_runners(arch: str, size: int, runtimes: list[str],
                  workdir: Path) -> tuple[dict[str, Runner], dict[str, float]]:
    """The runners for one model, and each one's largest |logit| error relative to eager's largest |logit|."""
    torch.manual_seed(0)
    module = build_architecture(f"torchvision:{arch}", 1000, 3, {}).eval()
    onnx_path = export_onnx(module, size, workdir / f"{arch}.onnx")
    makers: dict[str, Callable[[], Runner | None]] = {
        "eager": lambda: eager_runner(module, False), "channels_last": lambda: eager_runner(module, True),
        "onnxruntime": lambda: onnxruntime_runner(onnx_path), "openvino": lambda: openvino_runner(onnx_path, "f32"),
        "openvino_bf16": lambda: openvino_runner(onnx_path, "bf16")}
    runners = {name: runner for name in runtimes if (runner := makers[name]()) is not None}
    probe = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    reference = runners["eager"](probe).numpy()
    scale = max(float(np.abs(reference).max()), 1e-30)
    errors = {name: float(np.abs(np.asarray(runner(probe)) - reference).max() / scale)
              for name, runner in runners.items() if name != "eager"}
    return runners, errors


def time_cell(runner: Runner, batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """Call ``runner`` for at least ``seconds`` (and at least twice); returns (img/s, median ms per call)."""
    calls: list[float] = []
    start = time.perf_counter()
    while len(calls) < 2 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        runner(batch)
        calls.append(time.perf_counter() - began)
    return len(batch) * len(calls) / sum(calls), statistics.median(calls) * 1000


def measure(runners: dict[str, Runner], size: int, batch_sizes: list[int], rounds: int,
            seconds: float) -> dict[tuple[str, int], tuple[float, float]]:
    """Median (img/s, ms per call) per (runtime, batch size) over interleaved rounds, after one warm-up round."""
    rng = np.random.default_rng(1)
    batches = {b: rng.standard_normal((b, 3, size, size), dtype=np.float32) for b in batch_sizes}
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_index in range(rounds + 1):
        for b in batch_sizes:
            for name, runner in runners.items():
                result = time_cell(runner, batches[b], seconds if round_index else seconds / 2)
                if round_index:  # round 0 warms up every cell (allocators, OpenVINO's shape compilation)
                    samples.setdefault((name, b), []).append(result)
    return {key: (statistics.median(s[0] for s in values), statistics.median(s[1] for s in values))
            for key, values in samples.items()}


def tables(arch: str, results: dict[tuple[str, int], tuple[float, float]], runtimes: list[str],
           batch_sizes: list[int]) -> tuple[list[list[Any]], list[Any]]:
    """Rows per batch size (img/s per runtime) and the summary rows (best img/s, batch-1 ms, ratios)."""
    per_batch = [[arch, b, *(fmt(results[(r, b)][0]) for r in runtimes)] for b in batch_sizes]
    best = {r: max(results[(r, b)][0] for b in batch_sizes) for r in runtimes}
    first = min(batch_sizes)
    latency = {r: results[(r, first)][1] for r in runtimes}
    summary = [[arch, r, fmt(best[r]), max(batch_sizes, key=lambda b, r=r: results[(r, b)][0]), fmt(latency[r], 2),
                fmt(best[r] / best["eager"], 2), fmt(latency["eager"] / latency[r], 2)] for r in runtimes]
    return per_batch, summary


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small", help="torchvision architectures")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8, 16], help="default: 1,4,8,16")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="subset of " + ",".join(RUNTIMES) + " (openvino is skipped when not installed)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measured rounds (default: 3)")
    parser.add_argument("--seconds", type=float, default=0.6, help="seconds per cell per round (default: 0.6)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: batch 1,2, 64x64, one short round")
    parser.add_argument("--markdown", type=Path, help="append the tables to this Markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.size, args.rounds, args.seconds = [1, 2], 64, 1, 0.02
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    if "eager" not in args.runtimes or any(r not in RUNTIMES for r in args.runtimes):
        parser.error(f"--runtimes: choose from {', '.join(RUNTIMES)}, eager included (the ratios' reference)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.runtime_bench")
    per_batch: list[list[Any]] = []
    summary: list[list[Any]] = []
    notes: list[str] = []
    runtimes = args.runtimes
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        for arch in args.models.split(","):
            runners, errors = build_runners(arch, args.size, runtimes, Path(tmp))
            runtimes = [r for r in runtimes if r in runners]
            results = measure(runners, args.size, args.batch_sizes, args.rounds, args.seconds)
            rows, best = tables(arch, results, runtimes, args.batch_sizes)
            per_batch += rows
            summary += best
            notes.append(f"{arch}: " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    extra = [f"ONNX Runtime {_version('onnxruntime')}, OpenVINO {_version('openvino')}; input {args.size}x{args.size}"
             f", {args.rounds} rounds x {args.seconds} s per cell; largest |logit| error vs eager relative to "
             "the largest |logit|: " + "; ".join(notes)]
    text = "\n\n".join([
        facts_block(facts) + "\n- " + extra[0],
        markdown_table(["model", "batch", *(f"{r} img/s" for r in runtimes)], per_batch),
        markdown_table(["model", "runtime", "best img/s", "at batch", f"batch {min(args.batch_sizes)} ms",
                        "best vs eager", "latency gain vs eager"], summary)])
    emit(text + "\n", args.markdown)
    return 0


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
