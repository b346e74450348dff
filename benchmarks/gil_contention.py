"""What a Python-busy thread does to a forward pass that needs the GIL between operators.

Eager PyTorch releases the GIL inside each operator and takes it back before the next one, so a forward pass of a
model with many small operators (mobilenet_v3_small: about 150 per pass) waits for the GIL at every operator
boundary while another thread runs Python. In the daemon that other thread is the event loop (gRPC callbacks,
futures) and the preprocessing pool's Python glue. A traced and frozen TorchScript module runs the whole graph in
C++ with the GIL released. The script times, in process and on one torch thread, img/s of a batch for: eager and
traced, alone and beside a thread that spins in pure Python (the worst case), under each of ``--intervals``
(``sys.setswitchinterval``: how long a thread may hold the GIL while another waits; Python's default is 5 ms).
Rounds are interleaved; ratios within one run only. Random-init torchvision weights, nothing downloaded:

    python -m benchmarks.gil_contention                        # mobilenet_v3_small, batch 8, about 1 minute
    python -m benchmarks.gil_contention --seconds 0.2 --rounds 1 --intervals 0.005 --markdown /tmp/gil.md  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from benchmarks.support import emit, facts_block, markdown_table, run_facts

Forward = Callable[[torch.Tensor], torch.Tensor]


def images_per_second(forward: Forward, batch: torch.Tensor, seconds: float) -> float:
    """img/s of ``forward(batch)`` run back to back for about ``seconds`` on this thread."""
    done, end = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end or done == 0:
        forward(batch)
        done += batch.shape[0]
    return done / (time.perf_counter() - started)


def beside_spinner(forward: Forward, batch: torch.Tensor, seconds: float) -> float:
    """img/s of ``forward`` while another thread runs pure Python (it wants the GIL all the time)."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    spinner = threading.Thread(target=spin, name="gil-spinner", daemon=True)
    spinner.start()
    try:
        return images_per_second(forward, batch, seconds)
    finally:
        stop.set()
        spinner.join()


def forwards(arch: str, batch: torch.Tensor) -> dict[str, Forward]:
    """The eager module and its traced, frozen TorchScript copy (same weights)."""
    module = getattr(torchvision.models, arch)(num_classes=1000).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch 2.14; measured, not adopted
        traced = torch.jit.freeze(torch.jit.trace(module, batch, check_trace=False))
    return {"eager": module, "torchscript": traced}


def measure(args: argparse.Namespace) -> list[list[str]]:
    """One row per (interval, runtime): median img/s alone and beside the spinner over ``--rounds``. The process's
    torch thread count and switch interval are put back afterwards (the smoke test runs inside pytest)."""
    threads, default_interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    seen: dict[tuple[float, str, str], list[float]] = {}
    try:
        batch = torch.randn(args.batch, 3, 224, 224)
        runs = forwards(args.model, batch)
        with torch.inference_mode():
            for forward in runs.values():  # first passes are slow (allocator, kernel choice)
                images_per_second(forward, batch, args.seconds / 2)
            for _ in range(args.rounds):
                for interval in args.intervals:
                    sys.setswitchinterval(interval)
                    for name, forward in runs.items():
                        seen.setdefault((interval, name, "alone"), []).append(
                            images_per_second(forward, batch, args.seconds))
                        seen.setdefault((interval, name, "spinner"), []).append(
                            beside_spinner(forward, batch, args.seconds))
    finally:
        sys.setswitchinterval(default_interval)
        torch.set_num_threads(threads)
    rows = []
    for interval in args.intervals:
        for name in runs:
            alone = statistics.median(seen[(interval, name, "alone")])
            busy = statistics.median(seen[(interval, name, "spinner")])
            rows.append([f"{interval * 1000:g}", name, f"{alone:,.0f}", f"{busy:,.0f}", f"{busy / alone:.2f}"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gil_contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v3_small", help="torchvision architecture (random init)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervals", default="0.005,0.001,0.0002",
                        help="sys.setswitchinterval values in seconds (Python's default: 0.005)")
    parser.add_argument("--markdown", type=Path, help="also append the results as Markdown to this file")
    args = parser.parse_args(argv)
    args.intervals = [float(v) for v in args.intervals.split(",") if v]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure(args)
    table = markdown_table(["switch interval ms", "forward", "alone img/s", "beside a Python thread img/s",
                            "beside ÷ alone"], rows)
    emit("\n".join([facts_block(run_facts("benchmarks.gil_contention")), "",
                    f"{args.model}, batch {args.batch}, 1 torch thread, {args.rounds} round(s) × "
                    f"{args.seconds:g} s per cell, medians", "", table]), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
