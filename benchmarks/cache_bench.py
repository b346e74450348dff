"""Response cache: a repeated image answered from the cache against the same image computed, at concurrency 1.

Issue 18's target: for resnet18 from 640x480 JPEGs, a repeated image is answered at least 20x faster than a computed
one. The daemon serves two models with the same weights, ``<model>`` with ``[cache] enabled = true`` and
``<model>-uncached`` without; each round sends one JPEG ``--requests`` times to each, one request at a time, and
takes the median client-side latency (the first request to the cached model, its miss, left out). Rounds alternate
so that a machine whose speed drifts affects both alike.

    python -m benchmarks.cache_bench                                  # resnet18, 640x480, 3 rounds of 40
    python -m benchmarks.cache_bench --model digits --requests 5 --rounds 1          # a smoke run
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
    write_torchvision_model,
)
from client.api import ClassifierClient
from client.bench import parse_size, synthetic_jpeg

TARGET_RATIO = 20.0


def write_models(models_dir: Path, model: str) -> tuple[str, str]:
    """``model`` with the cache enabled and ``<model>-uncached``, the same files without it. Blocks."""
    version_dir = copy_digits(models_dir) if model == "digits" else write_torchvision_model(models_dir, model)
    cached = version_dir.parent
    uncached = models_dir / f"{model}-uncached"
    shutil.copytree(cached, uncached)
    manifest = cached / "model.toml"
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("default = true", "") +
                        "\n[cache]\nenabled = true\n", encoding="utf-8")
    (uncached / "model.toml").write_text((uncached / "model.toml").read_text(encoding="utf-8").replace(
        "default = true", ""), encoding="utf-8")
    return cached.name, uncached.name


def median_ms(client: ClassifierClient, model: str, image: bytes, count: int) -> tuple[float, bool]:
    """Median latency of ``count`` sequential requests, and whether every one of them was a cache hit."""
    times, hits = [], []
    for _ in range(count):
        started = time.perf_counter()
        response = client.classify(image, model=model, top_k=1, timeout=60)
        times.append((time.perf_counter() - started) * 1000)
        hits.append(response.cache_hit)
    return statistics.median(times), all(hits)


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    cached, uncached = write_models(tmp / "models", args.model)
    width, height = parse_size(args.size, 2)
    rounds = []
    with DaemonProcess(tmp / "models", tmp / "daemon.log", "--device", args.device, "--no-watch") as daemon, \
            ClassifierClient(daemon.target) as client:
        for index in range(args.rounds):
            image = synthetic_jpeg(width, height, seed=index)
            computed, _ = median_ms(client, uncached, image, args.requests)
            assert not client.classify(image, model=cached, top_k=1, timeout=60).cache_hit  # the miss that stores
            hit, all_hits = median_ms(client, cached, image, args.requests)
            if not all_hits:
                raise RuntimeError("a repeated request to the cached model was not a cache hit")
            rounds.append({"round": index + 1, "computed_ms": computed, "hit_ms": hit, "ratio": computed / hit})
            print(f"  round {index + 1}: computed {computed:.2f} ms, hit {hit:.3f} ms, {computed / hit:.1f}x",
                  file=sys.stderr)
    return rounds


def report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    rows = [[r["round"], f"{r['computed_ms']:.2f}", f"{r['hit_ms']:.3f}", f"{r['ratio']:.1f}x"] for r in rounds]
    ratio = statistics.median(r["ratio"] for r in rounds)
    return "\n".join([
        f"## Response cache: {args.model}, {args.size} JPEG, concurrency 1 ({args.device})", "",
        facts_block(run_facts("benchmarks.cache_bench", args.device)), "",
        markdown_table(["round", "computed p50 ms", "cache hit p50 ms", "computed / hit"], rows), "",
        f"- median ratio: {ratio:.1f}x (target ≥ {TARGET_RATIO:g}x); {args.requests} requests per model per round"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision architecture, or digits")
    parser.add_argument("--size", default="640x480", help="JPEG WxH (default: 640x480)")
    parser.add_argument("--requests", type=int, default=40, help="requests per model per round (default: 40)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path, help="append the results section to this Markdown file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="classifyd-cache-") as tmp:
        rounds = measure(args, Path(tmp))
    emit(report(args, rounds) + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
