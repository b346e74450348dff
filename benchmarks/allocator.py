"""Fresh processes, the same forward pass: glibc's default allocator against the daemon's setting.

Each start is a new process that loads a random-init torchvision model as the daemon does, warms it up and times
the forward pass alone (``forward_only``: no decode, no server) at one batch size on one torch thread, reading the
process's page faults and kernel time around it. Starts alternate between glibc's defaults (the child is given
``GLIBC_TUNABLES=glibc.malloc.tcache_count=7``, a malloc tunable at its default value: ``keep_freed_memory`` then
leaves the allocator alone, and glibc keeps its dynamic thresholds, which setting ``MALLOC_TRIM_THRESHOLD_`` would
turn off) and the daemon's setting (:func:`server.ops.host.keep_freed_memory`). Ratios within one run only:

    python -m benchmarks.allocator                                    # mobilenet_v3_small and resnet18, 6 starts
    python -m benchmarks.allocator --models mobilenet_v3_small --starts 2 --seconds 0.5   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.support import REPO, emit, facts_block, markdown_table, run_facts

GLIBC_DEFAULTS = "glibc.malloc.tcache_count=7"  # glibc's default value, so nothing changes but the choice
MODES = ("glibc default", "kept (daemon)")


def measure(model: str, batch: int, seconds: float) -> dict[str, float]:
    """In this process: img/s of the forward pass, the share of its time in the kernel, page faults a second."""
    from benchmarks.cpu_bench import forward_only, load_version, make_workload
    from benchmarks.support import write_torchvision_model

    with tempfile.TemporaryDirectory(prefix="classifyd-allocator-") as tmp:
        version = load_version(write_torchvision_model(Path(tmp), model, seed=0), "cpu", max(batch, 8))
        version.warm_up()
        version.torch_threads = 1
        inputs = make_workload("jpeg", "640x480", batch).inputs
        forward_only(version, inputs, batch, seconds / 2)  # warm at this size
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        rate = forward_only(version, inputs, batch, seconds)
        after, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    return {"img_s": rate, "kernel_share": (after.ru_stime - before.ru_stime) / elapsed,
            "faults_s": (after.ru_minflt - before.ru_minflt) / elapsed}


def one_start(model: str, batch: int, seconds: float, kept: bool) -> dict[str, float]:
    """A fresh process's :func:`measure`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if not kept:
        env["GLIBC_TUNABLES"] = GLIBC_DEFAULTS
    done = subprocess.run([sys.executable, "-m", "benchmarks.allocator", "--child", model, "--batch", str(batch),
                           "--seconds", str(seconds)], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def section(model: str, batch: int, starts: dict[str, list[dict[str, float]]]) -> str:
    rows = [[mode, ", ".join(f"{s['img_s']:.0f}" for s in runs), f"{statistics.median(s['img_s'] for s in runs):.1f}",
             f"{min(s['img_s'] for s in runs):.1f}", ", ".join(f"{s['kernel_share']:.0%}" for s in runs),
             f"{statistics.median(s['faults_s'] for s in runs):,.0f}"] for mode, runs in starts.items()]
    default, kept = (starts[mode] for mode in MODES)
    worst = min(s["img_s"] for s in kept) / min(s["img_s"] for s in default)
    median = statistics.median(s["img_s"] for s in kept) / statistics.median(s["img_s"] for s in default)
    return "\n".join([f"{model}, batch {batch}, one torch thread, forward pass alone, one fresh process per start:", "",
                      markdown_table(["allocator", "img/s per start", "median", "slowest", "kernel time per start",
                                      "page faults/s (median)"], rows), "",
                      f"kept ÷ default: median {median:.2f}×, slowest start {worst:.2f}×"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenet_v3_small,resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--starts", type=int, default=6, help="fresh processes per allocator setting")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed forward passes per start")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", type=Path, help="also append the results as Markdown to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seconds)))
        return 0
    sections = [facts_block(run_facts("benchmarks.allocator"))]
    for model in [m for m in args.models.split(",") if m]:
        starts: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for index in range(2 * args.starts):  # alternating, so drift hits both alike
            mode = MODES[index % 2]
            starts[mode].append(one_start(model, args.batch, args.seconds, kept=mode == MODES[1]))
            print(f"{model} {mode}: {starts[mode][-1]['img_s']:.1f} img/s", file=sys.stderr, flush=True)
        sections.append(section(model, args.batch, starts))
    emit("\n\n".join(sections), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
