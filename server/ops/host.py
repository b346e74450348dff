"""How many processes and torch threads this host should run: the rule, measured, in one place.

Measured on the 2-core development machine (/work/shared/perf-notes.md, resnet18, CPU): two processes with one
torch thread each served 74 img/s, one process with two torch threads 61 img/s. torch's intra-op parallelism
gains little on small batches while a second process also runs a second event loop, gRPC stack and
preprocessing pool. On a GPU the forward pass is not the bottleneck but the request path on the CPU is: four
gRPC processes answered 22k RPC/s against 7.5k for one, and torch's default thread count in every process
oversubscribed the cores (57 → 45 img/s with one worker, 144 → 17 with four).

The rule:

* **workers** (processes): on a CPU one per core, at most ``MAX_CPU_WORKERS`` (each process holds its own copy
  of every model); on a GPU ``cores // 4`` clamped to 1..``MAX_GPU_WORKERS`` (each process also holds a CUDA
  context and its own copies on the device).
* **torch intra-op threads per process**: ``max(1, cores // workers)``, so that the processes together never
  ask for more threads than there are cores.

``cores`` are the cores this process may run on (CPU affinity and a cgroup CPU quota both count). The
``--torch-threads`` flag overrides the thread rule; issue 7's ``--workers`` is meant to default to
:func:`default_workers`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("classifyd")

MAX_CPU_WORKERS = 8
MAX_GPU_WORKERS = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, lowered by a cgroup v2 CPU quota. Blocks on one file read."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    try:
        quota, period = CGROUP_CPU_MAX.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, int(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def default_workers(device_type: str = "cpu", cores: int | None = None) -> int:
    """Serving processes for this host by the rule in the module docstring; ``device_type`` "cpu" or "cuda"."""
    cores = available_cores() if cores is None else cores
    if device_type == "cuda":
        return max(1, min(MAX_GPU_WORKERS, cores // 4))
    return max(1, min(MAX_CPU_WORKERS, cores))


def default_torch_threads(workers: int = 1, cores: int | None = None) -> int:
    """torch intra-op threads for each of ``workers`` processes: ``max(1, cores // workers)``."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


def apply_torch_threads(threads: int | None, workers: int = 1) -> int:
    """Set torch's intra-op thread count for this process (``threads`` or the rule) and return it.

    Call once at start, before the first forward pass. Threads created later inherit it.
    """
    import torch

    count = threads if threads is not None else default_torch_threads(workers)
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    log.info("torch intra-op threads: %d (%s)", count, "--torch-threads" if threads is not None else
             f"rule: {available_cores()} cores // {workers} worker(s)")
    return count
