"""``compile = "default" | "reduce-overhead" | "max-autotune"``: a module compiled at bucketed batch sizes.

``torch.compile(..., dynamic=False)`` builds one graph per input shape, so a batcher that forms batches of any
size from 1 to ``max_batch_size`` would compile at serve time, on the inference thread, for every new size.
:class:`BucketedModule` runs each batch at a fixed *bucket* size instead: a batch of ``n`` is padded with zeros
up to the smallest bucket ``>= n`` and the first ``n`` rows of the output are returned; a batch larger than the
largest bucket runs in chunks of the largest bucket. The runtime warms every bucket at load
(:func:`warm_up_sizes`), so every graph (and, with ``"reduce-overhead"`` on CUDA, every CUDA graph)
exists before the version serves.

Compilation happens on the first call of a bucket, on the calling thread. Call it on the inference thread:
inductor's CPU kernels bake in the torch thread count of the thread that compiles them (a kernel compiled on
a thread that runs torch single-threaded stays single-threaded; see docs/manifest.md#compile). Everything here
blocks.
"""

from __future__ import annotations

import bisect
import itertools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from server.core.manifest import COMPILE_MODES

CUDA_GRAPH_MODE = "reduce-overhead"
WARM_RUNS_CUDA_GRAPHS = 3
"""Calls per bucket at warm-up under CUDA graphs: cudagraph trees run a function eagerly once, record it on the
next call and replay from then on, so the recording must also happen at load."""

Compiler = Callable[..., Callable[..., Any]]


class CompileError(RuntimeError):
    """torch.compile failed for a batch-size bucket (no C++ compiler, an unsupported platform or model, ...)."""


def default_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself: 1, 2, 4, ..., max_batch_size."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max(1, max_batch_size))


def _call(module: nn.Module, batch: torch.Tensor) -> Any:
    return module(batch)


def fresh_runner(tag: str) -> Callable[[nn.Module, torch.Tensor], Any]:
    """``module(batch)`` as a function with a code object of its own.

    torch.compile caches graphs per code object, and a model class's ``forward`` is shared by every version of
    every model of that class: with one code object per bucket, buckets and versions never count against each
    other's recompile limit (8 by default: 256 as max_batch_size already needs 9 buckets), and a released version
    takes its graphs with it.
    """
    code = _call.__code__.replace(co_name=f"classifyd_bucket_{tag}")
    return types.FunctionType(code, _call.__globals__, code.co_name)


class BucketedModule(nn.Module):
    """Runs ``module`` compiled with ``torch.compile(mode=mode, dynamic=False)`` at a fixed set of batch sizes."""

    def __init__(self, module: nn.Module, mode: str = "default", batch_sizes: Sequence[int] = (),
                 compiler: Compiler | None = None) -> None:
        """``batch_sizes``: the buckets, strictly increasing; empty: :func:`default_batch_sizes` of the
        ``max_batch_size`` given to :meth:`sizes_up_to`. ``compiler`` replaces ``torch.compile`` (tests)."""
        super().__init__()
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES[1:])}; got {mode!r}")
        if any(b <= a for a, b in itertools.pairwise(batch_sizes)) or any(s < 1 for s in batch_sizes):
            raise ValueError(f"batch sizes must be positive and strictly increasing; got {list(batch_sizes)}")
        self.module = module
        self.mode = mode
        self.explicit = tuple(batch_sizes)
        self.buckets = self.explicit or default_batch_sizes(1)
        self._compiler = compiler or torch.compile
        self._compiled: dict[int, Callable[..., Any]] = {}
        self._warm: set[int] = set()
        self.compiled_threads: dict[int, int] = {}
        """Bucket → torch's thread count on the thread that compiled it (inductor's CPU kernels keep it)."""

    def sizes_up_to(self, max_batch_size: int) -> tuple[int, ...]:
        """Fix the buckets for batches of up to ``max_batch_size`` and return the ones those batches run at.

        Warm each before serving (:func:`warm_up_sizes`). With default buckets the set becomes the powers of two
        below ``max_batch_size`` plus ``max_batch_size``; explicit buckets stay as given, and those above the
        smallest one that holds ``max_batch_size`` are never used.
        """
        if not self.explicit:
            self.buckets = default_batch_sizes(max_batch_size)
        index = bisect.bisect_left(self.buckets, max_batch_size)
        return self.buckets[:index + 1]

    def bucket_for(self, count: int) -> int:
        """The bucket a batch of ``count`` runs at: the smallest ``>= count``, else the largest (in chunks)."""
        index = bisect.bisect_left(self.buckets, count)
        return self.buckets[min(index, len(self.buckets) - 1)]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        count, largest = batch.shape[0], self.buckets[-1]
        if count <= largest:
            return self._run_bucket(batch)
        return torch.cat([self._run_bucket(batch[start:start + largest]) for start in range(0, count, largest)])

    def _run_bucket(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        bucket = self.bucket_for(count)
        layout = _memory_format(batch)
        if count == bucket and batch.is_contiguous(memory_format=layout):
            padded = batch  # already the shape and strides the bucket was compiled for
        else:
            padded = torch.empty((bucket, *batch.shape[1:]), dtype=batch.dtype, device=batch.device,
                                 memory_format=layout)
            padded[:count].copy_(batch)
            padded[count:].zero_()
        out = self._invoke(bucket, padded)
        # a copy: CUDA graph replays overwrite their output buffers, and the rows past count are padding
        return out[:count].clone()

    def _invoke(self, bucket: int, padded: torch.Tensor) -> Any:
        compiled = self._compiled.get(bucket)
        if compiled is None:
            compiled = self._compiled[bucket] = self._compiler(fresh_runner(str(bucket)), mode=self.mode,
                                                               dynamic=False)
        if self.mode == CUDA_GRAPH_MODE:
            torch.compiler.cudagraph_mark_step_begin()  # a new inference step: earlier outputs may be overwritten
        if bucket in self._warm:
            return compiled(self.module, padded)
        try:
            out = compiled(self.module, padded)
        except torch.cuda.OutOfMemoryError:
            raise  # the batch is too big for the device: warm-up reports it, serving splits the batch
        except Exception as exc:
            raise CompileError(f"torch.compile (mode {self.mode!r}) failed at batch size {bucket}: "
                               f"{type(exc).__name__}: {_first_line(exc)}") from exc
        self._warm.add(bucket)
        self.compiled_threads[bucket] = torch.get_num_threads()
        return out


def warm_up_sizes(module: nn.Module, max_batch_size: int) -> list[int]:
    """The batch sizes to run at warm-up, in order: ``[max_batch_size]`` for a plain module; for a
    :class:`BucketedModule` every bucket up to ``max_batch_size`` (compiling each), repeated under CUDA graphs
    so that each graph is also recorded before serving."""
    if not isinstance(module, BucketedModule):
        return [max_batch_size]
    on_cuda = any(p.is_cuda for p in module.parameters())
    runs = WARM_RUNS_CUDA_GRAPHS if module.mode == CUDA_GRAPH_MODE and on_cuda else 1
    return [size for size in module.sizes_up_to(max_batch_size) for _ in range(runs)]


def _memory_format(batch: torch.Tensor) -> torch.memory_format:
    """Channels-last when the batch is laid out so (and not also plain contiguous), so the padded copy matches."""
    if batch.dim() == 4 and batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[:limit] + " ..."
