"""Concurrency 1: the daemon's median latency against the in-process single-image pipeline, interleaved.

Issue 5's target: at concurrency 1 the daemon's median latency is within 2 ms of the in-process single-image
pipeline (decode + preprocess + forward on one thread, the daemon's own code). On a shared VM the machine's speed
drifts by more than that within minutes, so one in-process window followed by one daemon window can be off by
±10 ms either way. This script alternates short windows of the two, ``--rounds`` times, with the daemon started
once and idle during the in-process windows, and reports each round's medians and the median of the per-round
differences.

    python -m benchmarks.latency_c1                                   # resnet18 + mobilenet_v3_small, 5 rounds
    python -m benchmarks.latency_c1 --models mobilenet_v3_small --rounds 8 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.cpu_bench import load_version, make_workload, sequential_pipeline
from benchmarks.support import DaemonProcess, emit, facts_block, markdown_table, run_facts, write_torchvision_model
from client.bench import BenchOptions, run_benchmark


def measure_model(model: str, models_dir: Path, args: argparse.Namespace, log: Path) -> list[tuple[float, float]]:
    """``(in-process p50 ms, daemon p50 ms)`` per round."""
    workload = make_workload("jpeg", args.size, args.payloads)
    version = load_version(write_torchvision_model(models_dir, model, seed=0), "cpu", 1)
    rounds = []
    with DaemonProcess(models_dir, log, "--device", "cpu", "--no-watch", "--max-batch-size", "8") as daemon:
        options = BenchOptions(target=daemon.target, model=model, top_k=1, concurrency=(1,), warmup_s=args.warmup,
                               duration_s=args.seconds, progress=False)
        payloads = workload.payloads(model)
        for index in range(args.rounds):
            _, times = sequential_pipeline(version, workload.inputs, 1, args.seconds)
            in_process = statistics.median(times) * 1000
            daemon_p50 = run_benchmark(options, payloads)["levels"][0]["latency_ms"]["p50"]
            rounds.append((in_process, daemon_p50))
            print(f"  {model} round {index + 1}: in process {in_process:.2f} ms, daemon {daemon_p50:.2f} ms, "
                  f"{daemon_p50 - in_process:+.2f} ms", file=sys.stderr)
    return rounds


def section(model: str, rounds: list[tuple[float, float]]) -> tuple[str, dict[str, Any]]:
    rows = [[i + 1, f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"] for i, (a, b) in enumerate(rounds)]
    difference = statistics.median(b - a for a, b in rounds)
    text = "\n".join([f"### {model}", "", markdown_table(["round", "in-process p50 ms", "daemon p50 ms",
                                                           "difference ms"], rows), "",
                      f"- median of the per-round differences: {difference:+.2f} ms (target ≤ +2 ms)"])
    return text, {"model": model, "rounds": rounds, "median_difference_ms": difference}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_c1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per window (default: 6)")
    parser.add_argument("--warmup", type=float, default=1.0, help="daemon warm-up per window (default: 1)")
    parser.add_argument("--size", default="640x480", help="JPEG WxH")
    parser.add_argument("--payloads", type=int, default=16)
    parser.add_argument("--markdown", type=Path, help="append the results section to this Markdown file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = run_facts("benchmarks.latency_c1")
    sections = []
    with tempfile.TemporaryDirectory(prefix="classifyd-c1-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            rounds = measure_model(model, Path(tmp) / model, args, Path(tmp) / f"{model}.log")
            sections.append(section(model, rounds)[0])
    output = "\n\n".join(["## Concurrency 1, interleaved (cpu)", facts_block(facts), *sections]) + "\n"
    emit(output, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
