"""Request inputs made ready for a batch, off the event loop, in the preprocessing pool, within the decode budget.

Pillow decodes and resizes a payload to the model's input (:mod:`server.inference.preprocess`), or, for a model
that decodes JPEGs on its device, only the JPEG's header is checked here and the batch decodes it
(:mod:`server.inference.device_decode`). A uint8 tensor already of the model's input size is only viewed, on
the loop. The same pool runs the batch pipeline's blocking CPU work on CUDA (staging, nvJPEG's host stages),
which overlaps the forward pass running on the inference thread.

Every decode first reads its input's header and reserves its peak bytes (:mod:`server.inference.decode_cost`)
from the process's :class:`~server.inference.decode_budget.DecodeBudget`, in the pool thread when they fit at
once; otherwise the request waits on the event loop (never in a pool thread) and decodes when they do. The
bytes go back when the pool is done with the job, whatever its outcome, or when the job never ran.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server.core.config import DEFAULT_PREPROCESS_NICE, MAX_PIXELS
from server.core.manifest import InputSpec, Manifest, TilingSpec
from server.core.types import Box, RawTensor
from server.inference.decode_budget import DecodeBudget
from server.inference.decode_cost import decode_bytes
from server.inference.device_decode import DeviceJpeg, probe
from server.inference.preprocess import (
    check_opened_tiles,
    is_model_sized,
    open_input,
    preprocess,
    preprocess_tiles,
    tensor_to_array,
)
from server.inference.runtime import LoadedVersion
from server.inference.threads import without_team
from server.ops.host import default_decode_bytes, default_pool_threads, lower_thread_priority, return_freed_memory

T = TypeVar("T")
log = logging.getLogger("classifyd")
Tiles = list[tuple[Box, np.ndarray]]
TRIM_AFTER_BYTES = 64 << 20
"""A decode that reserved this much hands its freed memory back to the system when done (a millisecond or so)."""


@dataclass(frozen=True)
class _NeedsBudget:
    """A pool job's answer when its bytes did not fit the budget at once: reserve them on the loop, then rerun."""

    nbytes: int


class _Held:
    """The budget bytes one pool job holds: taken in the job (or before it, on the loop), given back once."""

    def __init__(self, budget: DecodeBudget, nbytes: int = 0) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def take(self, nbytes: int) -> bool:
        """Hold ``nbytes`` if they fit now (True at once if the loop reserved them). Raises Overloaded if they
        exceed the whole budget."""
        if self.nbytes:
            return True
        if not self._budget.try_reserve(nbytes):
            return False
        self.nbytes = nbytes
        return True

    def give_back(self, _done: object = None) -> None:
        """Release the bytes (the job's done callback, on the thread that finished or cancelled it). After a large
        decode, the freed memory goes back to the system first, so that the budget bounds the process's growth."""
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes >= TRIM_AFTER_BYTES:
            return_freed_memory()
        if nbytes:
            self._budget.release(nbytes)


def _pool_thread(nice: int) -> None:
    """A preprocessing thread's start: no OpenMP team of its own (only inference threads get one), and its CPU
    priority ``nice`` levels below the process's. A new thread starts at its creator's nice value: the pools'
    threads are all started from the event loop's thread, which keeps the process's."""
    without_team()
    if nice > 0 and not lower_thread_priority(nice):
        _cannot_lower(nice)


@functools.cache
def _cannot_lower(nice: int) -> None:
    log.warning("--preprocess-nice %d has no effect here: this system does not let a thread lower its own "
                "priority (Linux only)", nice)


def forward_first(version: LoadedVersion) -> bool:
    """Whether ``version``'s inputs are prepared at the lower priority of ``--preprocess-nice``: when PyTorch computes
    it on the CPU (eager, compiled, TorchScript or exported; eager is what was measured). For a model like
    mobilenet_v3_small the forward pass is then the slower stage, and a decoder that takes its core leaves it
    waiting with its batch: at concurrency 32 on one torch thread it served 292-299 images/s with the decoders 5
    nice levels lower against 192-278 without. ONNX Runtime's forward pass is quicker than decoding, so there
    the decoders must not wait: the same model served 367-374 images/s with them lower against 415-422
    (docs/batching.md#the-forward-pass-goes-first). On CUDA the forward pass waits on the device, not on a core."""
    runtime = version.runtime
    return version.device.type == "cpu" and (runtime is None or runtime.name == "torch")


class InputPreparer:
    """The preprocessing pool, the decode budget and the input rules of one daemon. ``shutdown()`` when done.

    ``workers``: the pool's threads (None: the host rule, :func:`server.ops.host.default_pool_threads`);
    ``budget``: the decode budget (None: one of :func:`server.ops.host.default_decode_bytes`); ``nice``: how much
    lower the CPU priority of the threads that prepare inputs for a PyTorch forward pass on the CPU is
    (:func:`forward_first`; 0: the same)."""

    def __init__(self, workers: int | None = None, max_pixels: int = MAX_PIXELS,
                 budget: DecodeBudget | None = None, nice: int = DEFAULT_PREPROCESS_NICE) -> None:
        self.threads = workers or default_pool_threads()
        # two pools of the same size; a pool starts its threads on first use, so the one no model needs costs nothing
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="classifyd-pre",
                                        initializer=_pool_thread, initargs=(0,))
        self._yielding = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="classifyd-pre-low",
                                            initializer=_pool_thread, initargs=(nice,)) if nice > 0 else self._pool
        self.max_pixels = max_pixels
        self.budget = budget or DecodeBudget(default_decode_bytes())

    async def prepare(self, payload: bytes | RawTensor, version: LoadedVersion, box: Box | None = None,
                      deadline: float | None = None) -> np.ndarray | DeviceJpeg:
        """The pixels of ``payload`` (or of its ``box``) for ``version``, or the checked JPEG when it decodes on
        the device. Blocks the calling task only, also while it waits for the decode budget until ``deadline``
        (``time.monotonic()`` seconds). Raises InvalidInput, or Overloaded when the budget cannot hold it.

        A uint8 tensor already of the model's input size is only viewed, on the loop: no thread hop for the
        callers that preprocess themselves (the tensor path of the GPU benchmark)."""
        spec = version.manifest.input
        if box is None and is_model_sized(payload, spec):
            return tensor_to_array(payload, spec, self.max_pixels)
        device_decode = box is None and version.decodes_on_device
        return await self._within_budget(self.pool_for(version), _prepare, deadline, payload, spec, self.max_pixels,
                                         box, device_decode)

    def pool_for(self, version: LoadedVersion) -> ThreadPoolExecutor:
        """The pool that prepares ``version``'s inputs: the lower-priority one when its forward pass goes first
        (:func:`forward_first`)."""
        return self._yielding if forward_first(version) else self._pool

    async def tiles(self, payload: bytes | RawTensor, manifest: Manifest, deadline: float | None = None) -> Tiles:
        """The tiles of ``payload`` for a model with ``[tiling]``, each with its box. Blocks the calling task only;
        raises InvalidInput, or Overloaded when the decode budget cannot hold it by ``deadline``."""
        assert manifest.tiling is not None
        return await self._within_budget(self._pool, _tiles, deadline, payload, manifest.input, manifest.tiling,
                                         self.max_pixels)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool; blocks the calling task only."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _within_budget(self, pool: ThreadPoolExecutor, job: Callable[..., T | _NeedsBudget],
                             deadline: float | None, *args: object) -> T:
        """``job(held, *args)`` in ``pool``; if its bytes did not fit at once, reserve them here (waiting on the
        loop until ``deadline``) and run it again holding them."""
        outcome = await self._submit(pool, _Held(self.budget), job, *args)
        if isinstance(outcome, _NeedsBudget):
            await self.budget.reserve(outcome.nbytes, deadline)
            # no await between the reservation and the job's callback: a cancellation cannot lose the bytes
            outcome = await self._submit(pool, _Held(self.budget, outcome.nbytes), job, *args)
        assert not isinstance(outcome, _NeedsBudget)
        return outcome

    @staticmethod
    def _submit(pool: ThreadPoolExecutor, held: _Held, job: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run ``job(held, *args)`` in ``pool``; ``held`` goes back when the job is done or was cancelled unrun."""
        try:
            future: Future[T] = pool.submit(job, held, *args)
        except BaseException:  # the pool was shut down (the daemon is stopping): the bytes go back at once
            held.give_back()
            raise
        future.add_done_callback(held.give_back)
        return asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Wait for the work in the pools, then stop their threads."""
        self._pool.shutdown(wait=True)
        self._yielding.shutdown(wait=True)


def _prepare(held: _Held, payload: bytes | RawTensor, spec: InputSpec, max_pixels: int, box: Box | None,
             device_decode: bool) -> np.ndarray | DeviceJpeg | _NeedsBudget:
    """Pool job for one input: the checked JPEG when the device decodes it, else the pixels once its peak bytes
    are held, else what it needs. Blocks; raises InvalidInput or Overloaded."""
    if device_decode and isinstance(payload, bytes):
        jpeg = probe(payload, spec, max_pixels)
        if jpeg is not None:
            return jpeg
    opened = open_input(payload, max_pixels)
    nbytes = decode_bytes(opened, payload, spec, box=box)
    if not held.take(nbytes):
        return _NeedsBudget(nbytes)
    return preprocess(opened, spec, max_pixels, box)


def _tiles(held: _Held, payload: bytes | RawTensor, spec: InputSpec, tiling: TilingSpec,
           max_pixels: int) -> Tiles | _NeedsBudget:
    """Pool job for a tiled input: its tiles once its peak bytes are held, else what it needs. Blocks; raises
    InvalidInput (too many tiles is known from the header) or Overloaded."""
    opened = open_input(payload, max_pixels)
    check_opened_tiles(opened, tiling)
    nbytes = decode_bytes(opened, payload, spec, tiling=tiling)
    if not held.take(nbytes):
        return _NeedsBudget(nbytes)
    return preprocess_tiles(opened, spec, tiling, max_pixels)
