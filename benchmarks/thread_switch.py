"""What switching torch's intra-op thread count between forward passes costs (server/inference/threads.py): a small
convolution net timed with the count fixed at 1, fixed at 2, and alternating 1/2 with ``torch.set_num_threads``
before each pass; prints the median pass per count and the bare cost of the call. Runs in seconds:

    python -m benchmarks.thread_switch --passes 400
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def timed(net: nn.Module, x: torch.Tensor, passes: int, count_of: Callable[[int], int]) -> dict[int, float]:
    """Median µs per pass (the switch included) for each thread count ``count_of(i)`` gives pass ``i``."""
    seen: dict[int, list[float]] = {}
    with torch.inference_mode():
        for i in range(passes):
            count = count_of(i)
            begin = time.perf_counter()
            if torch.get_num_threads() != count:
                torch.set_num_threads(count)
            net(x)
            seen.setdefault(count, []).append(time.perf_counter() - begin)
    return {count: statistics.median(times) * 1e6 for count, times in sorted(seen.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.thread_switch")
    parser.add_argument("--passes", type=int, default=400, help="passes per configuration")
    args = parser.parse_args(argv)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 64, 64)
    for name, count_of in (("fixed 1", lambda i: 1), ("fixed 2", lambda i: 2),
                           ("alternating", lambda i: 1 if i % 2 else 2)):
        medians = timed(net, x, args.passes, count_of)
        print(f"{name:12s} " + ", ".join(f"{count} thread(s) {us:.1f} µs" for count, us in medians.items()))
    begin = time.perf_counter()
    for i in range(1000):
        torch.set_num_threads(1 if i % 2 else 2)
    print(f"torch.set_num_threads alone, alternating: {(time.perf_counter() - begin) * 1000:.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
