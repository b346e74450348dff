"""Processes, torch threads, preprocessing threads and decode memory for this host: the rule, in one place.

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
* **preprocessing threads per process** (decode, resize, staging): ``max(MIN_POOL_THREADS, cores // workers)``:
  decoding releases the GIL, so one thread per core; at least two, so that one long decode (a 100-megapixel
  image takes seconds) does not hold up every other request's preprocessing.
* **preprocessing threads' priority**: the process's, unless ``--preprocess-nice N`` lowers it for the inputs of
  PyTorch forward passes on the CPU, so that when the cores are contended the forward pass runs first and
  the decoders take what it leaves (docs/batching.md#the-forward-pass-goes-first); :func:`lower_thread_priority`.
* **decode budget per process** (``--max-decode-bytes``): ``memory // DECODE_MEMORY_SHARE // workers``, where
  ``memory`` is the machine's RAM lowered by a cgroup v2 memory limit: a quarter of the memory for pixels
  being decoded, shared by the workers; the model copies, queues and the rest of the process keep the others.

``cores`` are the cores this process may run on (CPU affinity and a cgroup CPU quota both count). The
``--torch-threads`` flag overrides the thread rule; issue 7's ``--workers`` is meant to default to
:func:`default_workers`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

log = logging.getLogger("classifyd")

MAX_CPU_WORKERS = 8
MAX_GPU_WORKERS = 4
MIN_POOL_THREADS = 2
DECODE_MEMORY_SHARE = 4
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


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


def available_memory() -> int:
    """Bytes of memory this process may use: the machine's RAM, lowered by a cgroup v2 ``memory.max``.
    Blocks on one file read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not on Linux: assume a small machine rather than none
        total = 4 << 30
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit else total


def _cgroup_memory_limit() -> int | None:
    try:
        text = CGROUP_MEMORY_MAX.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text) or None
    except ValueError:
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


def default_pool_threads(workers: int = 1, cores: int | None = None) -> int:
    """Preprocessing threads for each of ``workers`` processes: ``max(MIN_POOL_THREADS, cores // workers)``."""
    cores = available_cores() if cores is None else cores
    return max(MIN_POOL_THREADS, cores // max(1, workers))


def default_decode_bytes(workers: int = 1, memory: int | None = None) -> int:
    """The decode budget of each of ``workers`` processes: ``memory // DECODE_MEMORY_SHARE // workers`` bytes."""
    memory = available_memory() if memory is None else memory
    return max(1, memory // DECODE_MEMORY_SHARE // max(1, workers))


def return_freed_memory() -> bool:
    """Give the memory glibc holds freed in its heaps back to the system (``malloc_trim``). Blocks for about a
    millisecond per GiB of heap. False where glibc's ``malloc_trim`` is missing.

    Call it after freeing something large on a thread. glibc keeps freed blocks of up to 32 MiB in the heap of the
    thread that freed them (a large decoded image is made of 16 MiB blocks), so the next large decode, on another
    pool thread, grows the process again. Measured (three 10000x10000 16-bit PNGs, a 400 MB decode budget): peak
    RSS growth 501 MiB without, 319 MiB (one decode, 302 MB reserved) with it."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _malloc_trim() -> Callable[[int], int] | None:
    return cast("Callable[[int], int] | None", _glibc("malloc_trim", ctypes.c_size_t))


@functools.cache
def _glibc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """glibc's function ``name`` taking ``argtypes`` and returning an int; None where it is missing (not glibc,
    or not Linux)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return cast(Callable[..., int], function)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEPT_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: blocks up to here come from the heaps, reused
KEPT_TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt takes (an int): freed heap tops are not given back
ALLOCATOR_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def keep_freed_memory() -> str:
    """Make glibc keep the memory a forward pass frees for the next one, and say what was done (for the log).

    Call once, first thing in a process that runs forward passes. Why: by default glibc gives freed memory back to
    the kernel once the free top of a heap exceeds a trim threshold that moves with the process's history (twice
    the largest mmap'd block freed so far, up to 64 MiB), so a pass's activations may be refaulted page by page on
    every pass, or not, depending on what the process happened to allocate first. Measured here (docs/benchmarks.md,
    "benchmarks/allocator.py"): mobilenet_v3_small, batch 16, one torch thread, four fresh processes: 200-260
    images/s in three, with 31-45% of the thread's time in the kernel (190k-270k page faults a second), and 385-400
    in the fourth; with these settings 395-415 in every process and no page faults. The cost: freed memory stays in the
    process, which keeps its peak size (:func:`return_freed_memory` still trims on purpose after a huge decode).

    Does nothing when the environment already chose (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, another
    allocator in ``LD_PRELOAD``), or where glibc's ``mallopt`` is missing. Never raises."""
    chosen = [name for name in ALLOCATOR_ENVIRONMENT if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    preloaded = [name for name in OTHER_ALLOCATORS if name in os.environ.get("LD_PRELOAD", "")]
    if chosen or preloaded:
        return f"memory allocator left as the environment sets it ({', '.join(chosen + preloaded)})"
    mallopt = _mallopt()
    if mallopt is None:
        return "memory allocator left as it is (not glibc)"
    if not (mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)):
        return "memory allocator left as it is (glibc refused the thresholds)"
    return (f"memory allocator: freed memory stays in the process for the next forward pass (glibc M_MMAP_THRESHOLD "
            f"{KEPT_MMAP_THRESHOLD // 2**20} MiB, M_TRIM_THRESHOLD {KEPT_TRIM_THRESHOLD // 2**20} MiB)")


def _mallopt() -> Callable[[int, int], int] | None:
    return cast("Callable[[int, int], int] | None", _glibc("mallopt", ctypes.c_int, ctypes.c_int))


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


def lower_thread_priority(increment: int) -> bool:
    """Lower the calling thread's CPU priority by ``increment`` nice levels (Linux: a thread has its own nice value;
    raising it needs no privilege). False, changing nothing, for an increment of 0, on another system (where the
    call would change the whole process's) or when the kernel refuses."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment))
    except OSError:
        return False
    return True


@functools.cache
def package_version() -> str:
    """classifyd's installed version ("unknown" when run from a checkout that was not pip-installed). Reading the
    package metadata touches the disk, so it is read once per process."""
    try:
        return importlib.metadata.version("classifyd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
