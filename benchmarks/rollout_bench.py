"""Shadow rollouts: live throughput and p99 with a candidate computing 100 % of the traffic, against rollout off.

Issue 18's target: live throughput with ``shadow_percent = 100`` at least 0.9x of rollout off at concurrency 32 when
the machine has headroom; without headroom the shadow work shrinks first (it runs only while no live batch waits,
and at most ``shadow_max_share`` of the inference thread). The daemon serves two models with the same version 1:
``<model>-off`` (no ``[rollout]``) and ``<model>`` (``mode = "shadow"``, a manual decision so the candidate stays)
whose version 2 is loaded as its candidate. Each round runs ``--seconds`` of closed-loop load at ``--concurrency``
on each model in turn, so a machine whose speed drifts affects both alike; the shadow model's figures say how many
requests its candidate compared.

    python -m benchmarks.rollout_bench                                        # resnet18, 640x480, c=32, 3 x 20 s
    python -m benchmarks.rollout_bench --model digits --seconds 2 --rounds 1 --concurrency 8    # a smoke run
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.support import (
    DaemonProcess,
    copy_digits,
    emit,
    facts_block,
    markdown_table,
    run_facts,
    torchvision_weights,
    write_torchvision_model,
)
from client.api import ClassifierClient
from client.bench import BenchOptions, generated_payloads, parse_size, run_level, summarise

TARGET_RATIO = 0.9
ROLLOUT = '\n[rollout]\nmode = "shadow"\nshadow_percent = 100\ndecision = "manual"\nmin_requests = 1000000000\n'


def write_models(models_dir: Path, model: str) -> tuple[str, str]:
    """``model`` (shadow rollout) and ``<model>-off`` (none), the same version 1. Blocks."""
    version_dir = copy_digits(models_dir) if model == "digits" else write_torchvision_model(models_dir, model)
    shadowed = version_dir.parent
    off = models_dir / f"{shadowed.name}-off"
    shutil.copytree(shadowed, off)
    for directory in (shadowed, off):
        manifest = directory / "model.toml"
        text = manifest.read_text(encoding="utf-8").replace("default = true", "")
        manifest.write_text(text + (ROLLOUT if directory == shadowed else ""), encoding="utf-8")
    return shadowed.name, off.name


def add_candidate(models_dir: Path, model: str, client: ClassifierClient) -> None:
    """Version 2 of ``model`` (other weights of the same architecture), loaded as its candidate. Blocks."""
    version_dir = models_dir / model / "2"
    if model == "digits":
        shutil.copytree(models_dir / model / "1", version_dir)
    else:
        torchvision_weights(model, version_dir / "model.safetensors", seed=1)
    client.reload_model(model, timeout=600)
    deadline = time.monotonic() + 600
    while client.get_model(model).rollout.candidate_version != 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"version 2 of {model} did not become a candidate")
        time.sleep(0.2)


def one_level(args: argparse.Namespace, target: str, model: str) -> dict[str, Any]:
    options = BenchOptions(target=target, model=model, concurrency=(args.concurrency,), warmup_s=args.warmup,
                           duration_s=args.seconds)
    width, height = parse_size(args.size, 2)
    samples = run_level(options, generated_payloads(options, width, height), "concurrency", args.concurrency)
    return summarise("concurrency", args.concurrency, samples)


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    shadowed, off = write_models(tmp / "models", args.model)
    rounds = []
    with DaemonProcess(tmp / "models", tmp / "daemon.log", "--device", args.device, "--no-watch") as daemon, \
            ClassifierClient(daemon.target) as client:
        add_candidate(tmp / "models", shadowed, client)
        for index in range(args.rounds):
            before = client.get_model(shadowed).rollout.compared
            plain = one_level(args, daemon.target, off)
            shadow = one_level(args, daemon.target, shadowed)
            compared = client.get_model(shadowed).rollout.compared - before
            rounds.append({"round": index + 1, "off": plain, "shadow": shadow, "compared": compared})
            print(f"  round {index + 1}: off {plain['throughput']:.1f} req/s, shadow {shadow['throughput']:.1f} "
                  f"req/s, {compared} compared", file=sys.stderr)
        if any(r["off"]["errors"] or r["shadow"]["errors"] for r in rounds):
            print(daemon.log_tail(), file=sys.stderr)
    return rounds


def report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    rows = []
    for r in rounds:
        off, shadow = r["off"], r["shadow"]
        rows.append([r["round"], f"{off['throughput']:.1f}", f"{shadow['throughput']:.1f}",
                     f"{shadow['throughput'] / off['throughput']:.2f}" if off["throughput"] else "–",
                     off["latency_ms"]["p99"], shadow["latency_ms"]["p99"], f"{r['compared']} of {shadow['requests']}",
                     sum(off["errors"].values()) + sum(shadow["errors"].values())])
    ratio = statistics.median(r["shadow"]["throughput"] / r["off"]["throughput"] for r in rounds
                              if r["off"]["throughput"])
    return "\n".join([
        f"## Shadow rollout: {args.model}, {args.size} JPEG, concurrency {args.concurrency} ({args.device})", "",
        facts_block(run_facts("benchmarks.rollout_bench", args.device)), "",
        markdown_table(["round", "off req/s", "shadow 100 % req/s", "shadow / off", "off p99 ms", "shadow p99 ms",
                        "compared (warm-up included) of answered", "errors"], rows), "",
        f"- median live throughput ratio: {ratio:.2f} (target ≥ {TARGET_RATIO:g} with headroom; without it the "
        f"compared share shrinks first); {args.seconds:g} s per model per round"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision architecture, or digits")
    parser.add_argument("--size", default="640x480", help="JPEG WxH (default: 640x480)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="load per model per round (default: 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded load before each level (default: 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path, help="append the results section to this Markdown file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="classifyd-rollout-") as tmp:
        rounds = measure(args, Path(tmp))
    emit(report(args, rounds) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
