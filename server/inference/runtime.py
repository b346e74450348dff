"""A loaded model version and the dedicated thread its forward passes run on.

Everything here that touches torch blocks: call it through
:class:`InferenceThread` (forward passes, warm-up) or a loader thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from server.batching.curve import BatchCurve
from server.batching.online import OnlineTuner
from server.core.config import DEFAULT_MAX_QUEUE
from server.core.manifest import Manifest
from server.inference.compiled import warm_up_sizes
from server.inference.device_decode import uses_device_decode
from server.inference.isolation import contained, describe
from server.inference.precision import autocast, effective_precision
from server.inference.runtimes import OnnxRuntime, Runtime, TorchRuntime
from server.inference.staging import Pixels, StagedBatch, Stager
from server.inference.threads import (
    choose_threads,
    choose_threads_async,
    process_threads,
    remember_process_threads,
    use_threads,
)

T = TypeVar("T")
log = logging.getLogger("classifyd.models")


class InferenceThread:
    """One dedicated thread for every torch forward pass.

    Running warm-up and all inference on a single thread avoids the per-call
    cost torch pays when its work hops between threads (see docs/architecture.md).
    """

    def __init__(self) -> None:
        """Create the thread (it starts on the first call). Records the process's torch thread count, which the
        versions' own counts (:mod:`server.inference.threads`) fall back to: create it after ``--torch-threads``
        was applied."""
        remember_process_threads()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifyd-infer")
        self._live = 0  # run() calls queued or running; the low-priority lane waits for none, or for its credit
        self._quiet: list[asyncio.Future[None]] = []
        self.live_busy_s = 0.0
        """Seconds the thread spent on :meth:`run` calls (the low-priority lane's owed share is counted from it);
        written by the thread alone."""

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the inference thread and await its result. Raises what ``fn`` raises, except
        that model code's StopIteration or BaseException arrives as ModelCodeError
        (:func:`server.inference.isolation.contained`): the awaiting task never hangs on it."""
        self._live += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)
        finally:
            self._live -= 1
            for waiter in self._quiet:  # after every live call: a waiting low-priority call checks its credit
                if not waiter.done():
                    waiter.set_result(None)
            self._quiet.clear()

    def _timed(self, fn: Callable[..., T], *args: object) -> T:
        started = time.perf_counter()
        try:
            return contained(fn, *args)
        finally:
            self.live_busy_s += time.perf_counter() - started

    async def run_when_quiet(self, fn: Callable[..., T], *args: object,
                             may_overtake: Callable[[float], bool] | None = None) -> T:
        """Low priority (rollout shadow work, :mod:`server.inference.shadow`): wait until no :meth:`run` call is
        queued or running, or until ``may_overtake(live_busy_s)`` says the lane's owed share allows it to go ahead
        of the next live call (checked after each live call), then run ``fn(*args)`` as :meth:`run` does. A live
        call that arrives meanwhile waits at most for this one call. Call on the event loop."""
        while self._live and not (may_overtake is not None and may_overtake(self.live_busy_s)):
            waiter = asyncio.get_running_loop().create_future()
            self._quiet.append(waiter)
            await waiter
        return await asyncio.get_running_loop().run_in_executor(self._executor, contained, fn, *args)

    def shutdown(self) -> None:
        """Wait for the running call, then stop the thread."""
        self._executor.shutdown(wait=True)


async def choose_version_threads(version: LoadedVersion, inference: InferenceThread,
                                 images: Sequence[Pixels] = ()) -> None:
    """Choose ``version``'s torch thread count (:mod:`server.inference.threads`) after its warm-up: each timed pass
    is its own call on ``inference`` and the idle gaps are awaited here, so other models' batches wait at most one
    pass. Does nothing unless :attr:`LoadedVersion.measures_threads`. Never raises for a failed pass (the version
    keeps the process's count); call on the event loop."""
    if not version.measures_threads:
        return
    try:
        outcome: tuple[int, str] | Exception = await choose_threads_async(
            lambda count, size: inference.run(version.timed_pass, count, size, images), process_threads(),
            version.max_batch_size)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: the warm-up passed, so the version may still serve
        outcome = exc
    version.threads_chosen(outcome)


class OutputShapeError(RuntimeError):
    """The model returned something other than one row of logits per image."""


class WarmUpError(RuntimeError):
    """The warm-up batch failed: the version must not serve."""


@dataclass(eq=False)
class LoadedVersion:
    """One model version, in eval mode on its device, ready for forward passes."""

    name: str
    version: int
    manifest: Manifest
    module: nn.Module
    device: torch.device
    max_batch_size: int
    max_delay_ms: float
    max_queue: int = DEFAULT_MAX_QUEUE
    batch_curve: BatchCurve | None = None
    """Measured at load time by :mod:`server.models.loader.autotune`; None when not measured."""
    tuner: OnlineTuner | None = None
    """Moves ``max_batch_size`` (and the torch threads under load) while serving (:mod:`server.batching.online`); set
    by the model's batcher (:func:`server.inference.cap_tuning.tuner_for`): for an autotuned cap, or a pinned or
    not yet measured one whose threads alone are tuned; None under a latency target, and when neither is tuned."""
    runtime: Runtime | None = None
    """What runs the forward pass (server/inference/runtimes.py); None: the module itself (TorchRuntime)."""
    torch_threads: int | None = None
    """torch intra-op threads of this version's forward passes, chosen after warm-up (:func:`choose_version_threads`);
    None: the process's count."""

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = TorchRuntime(self.module)
        spec = self.manifest.input
        shape = (1, spec.channels, 1, 1)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(shape)
        self._inv_std = (1.0 / torch.tensor(spec.std, dtype=torch.float32, device=self.device)).view(shape)
        self.precision, self.precision_note = effective_precision(self.manifest.precision, self.device)
        if self.precision_note:
            log.warning("model %s version %d: %s", self.name, self.version, self.precision_note)
        self._stager = Stager(self.device)
        self.decodes_on_device = uses_device_decode(self.manifest, self.device)
        """Whether JPEG payloads are decoded on the device (``[input] decode``); decided once, at load."""
        self._lock = threading.Lock()
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.released = False

    def lease(self) -> None:
        """Keep this version loaded until :meth:`unlease`; call on the event loop."""
        self._leases += 1
        self._idle.clear()

    def unlease(self) -> None:
        """Give back a lease taken with :meth:`lease`."""
        self._leases -= 1
        if self._leases == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Wait until no request holds a lease on this version."""
        await self._idle.wait()

    @property
    def leases(self) -> int:
        """Requests holding this version now: being prepared, queued or computed (0: idle)."""
        return self._leases

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def stage(self, inputs: Sequence[Pixels]) -> StagedBatch:
        """Stack a batch's inputs and, on CUDA, start copying the arrays among them to the device from pinned
        memory (see server/inference/staging.py). Blocks on the copy into host memory; call it from the
        preprocessing pool on CUDA, never from the event loop."""
        return self._stager.stage(inputs, self.max_batch_size)

    def predict(self, inputs: Sequence[Pixels] | StagedBatch, *, threads: int | None = None) -> np.ndarray:
        """Scores, one row per ``H x W x C`` input array (or per image of a staged batch): softmax
        probabilities, or per-label sigmoids for ``activation = "sigmoid"``. Runs under autocast at the
        version's precision, on the CPU on ``threads`` torch threads (default: the online tuner's width, else the
        version's count, else the process's). Blocks; raises OutputShapeError."""
        with self._lock, torch.inference_mode():
            if self.released:
                raise RuntimeError(f"model {self.name} version {self.version} was already released")
            if self.device.type == "cpu":
                use_threads(threads or self._batch_threads())
            staged = inputs if isinstance(inputs, StagedBatch) else self._stager.stage(inputs, self.max_batch_size)
            stacked, runtime = staged.wait(), self.runtime
            # the runtime that runs the batch decides, here under the lock: a switch between preparing and running
            # a batch cannot feed it the wrong kind (server/inference/onnx_normalise.py)
            if stacked.dtype == torch.uint8 and isinstance(runtime, OnnxRuntime) and runtime.takes_pixels:
                logits = runtime.pixels(stacked, self._mean, self._inv_std)
            else:
                batch = self._normalize(stacked)
                with autocast(self.precision, self.device):
                    logits = runtime(batch)
            self._check_output(logits, len(staged))
            if self.manifest.activation == "sigmoid":
                return torch.sigmoid(logits.float()).cpu().numpy()
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def _batch_threads(self) -> int:
        """The torch threads of a batch on the CPU: the tuner's width, else the version's count, else the process's;
        one once another runtime runs the graph."""
        runtime = self.runtime
        if runtime is not None and runtime.name != "torch":
            # torch only glues (softmax, a float normalisation): a team would spin after each of those small
            # operators on the cores JPEG decoding needs. Served mobilenet_v3_small after a switch to ONNX Runtime
            # at concurrency 32: 422-447 images/s against 364-388 with the team (docs/benchmarks.md).
            return 1
        return self._tuned_threads() or self.torch_threads or process_threads()

    def _tuned_threads(self) -> int:
        """The thread count the online tuner gives this batch (its width, or the one on trial); 0 when none."""
        tuner = self.tuner
        return 0 if tuner is None else tuner.width_now()

    def warm_up(self, images: Sequence[Pixels] = ()) -> None:
        """Run one batch of ``max_batch_size`` inputs: ``images`` (the version's ``warmup/`` images, repeated to fill
        the batch) when given, else blank images; catches shape errors and OOM before serving.
        A compiled module runs one batch per batch-size bucket instead, which compiles every bucket here, on the
        inference thread (seconds per bucket; other models wait). The torch thread count is chosen afterwards, by
        :func:`choose_version_threads` (the loader) or :meth:`choose_threads_now`. Raises WarmUpError saying what
        failed."""
        spec, pool = self.manifest.input, self._pool(images)
        kind = "warmup/" if images else "blank"
        for size in warm_up_sizes(self.module, self.max_batch_size):
            try:
                self.predict([pool[i % len(pool)] for i in range(size)])
            except Exception as exc:
                reason = str(exc) if isinstance(exc, OutputShapeError) else describe(exc)
                raise WarmUpError(f"warm-up on a batch of {size} {kind} {spec.height}x{spec.width}"
                                  f"x{spec.channels} ({spec.color}) inputs failed: {reason}{self._channel_hint()}") \
                    from exc

    @property
    def measures_threads(self) -> bool:
        """Whether its torch thread count is still to be chosen: on the CPU, on the torch runtime, not chosen yet."""
        return self.device.type == "cpu" and self.torch_threads is None and self.runtime is not None \
            and self.runtime.name == "torch"

    def timed_pass(self, count: int, size: int, images: Sequence[Pixels] = ()) -> float:
        """Seconds one :meth:`predict` of ``size`` inputs (``images`` repeated, else blank) takes on ``count`` torch
        threads. Blocks; raises what predict raises."""
        pool = self._pool(images)
        batch = [pool[i % len(pool)] for i in range(size)]
        begin = time.perf_counter()
        self.predict(batch, threads=count)
        return time.perf_counter() - begin

    def choose_threads_now(self, images: Sequence[Pixels] = ()) -> None:
        """Choose the version's torch thread count on this thread (the runtime job, benchmarks): blocks for up to
        about a second. Does nothing unless :attr:`measures_threads`."""
        if self.measures_threads:
            try:
                outcome: tuple[int, str] | Exception = choose_threads(
                    functools.partial(self.timed_pass, images=images), process_threads(), self.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - an optimisation only: the version may still serve
                outcome = exc
            self.threads_chosen(outcome)

    def threads_chosen(self, outcome: tuple[int, str] | Exception) -> None:
        """Keep a measurement's count (or the process's, when it raised) and log it with why."""
        count, why = outcome if isinstance(outcome, tuple) else \
            (process_threads(), f"not measured: a pass failed: {describe(outcome)}")
        self.torch_threads = count
        log.info("model %s version %d: %d torch thread(s) per forward pass (%s)", self.name, self.version, count, why)

    def _pool(self, images: Sequence[Pixels]) -> list[Pixels]:
        """``images``, else one blank input."""
        spec = self.manifest.input
        return list(images) or [np.zeros((spec.height, spec.width, spec.channels), dtype=np.uint8)]

    def _channel_hint(self) -> str:
        """Name the first convolution when its input channels differ from the manifest's colour mode."""
        for name, layer in self.module.named_modules():
            kind = getattr(layer, "original_name", type(layer).__name__)  # TorchScript keeps the class name there
            if kind in ("Conv1d", "Conv2d", "Conv3d"):
                takes, spec = getattr(layer, "in_channels", None), self.manifest.input
                if isinstance(takes, int) and takes != spec.channels:
                    return (f"; the model's first convolution ({name}) takes {takes} input channel(s) but [input] "
                            f"color = {spec.color!r} gives {spec.channels}")
                return ""
        return ""

    def _normalize(self, stacked: torch.Tensor) -> torch.Tensor:
        """``N x H x W x C`` uint8 (or float 0..1) → normalised ``N x C x H x W`` float in the model's layout."""
        batch = stacked.permute(0, 3, 1, 2)
        batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
        batch = batch.sub_(self._mean).mul_(self._inv_std) if batch.data_ptr() != stacked.data_ptr() else \
            (batch - self._mean) * self._inv_std
        layout = torch.channels_last if self.manifest.channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=layout)

    def _check_output(self, logits: object, count: int) -> None:
        expected = (count, self.manifest.num_classes)
        if isinstance(logits, torch.Tensor) and tuple(logits.shape) == expected:
            return
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == count:
            raise OutputShapeError(f"model outputs {logits.shape[1]} logits per image but has "
                                   f"{expected[1]} labels: the label count must equal the output width")
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise OutputShapeError(f"model returned {got} for a batch of {count}; expected one row of {expected[1]} "
                               f"logits per image {expected}")

    def release(self) -> None:
        """Drop the module so its memory (GPU memory included) can be returned."""
        with self._lock:
            self.released = True
            self.module = nn.Identity()
            self.runtime = TorchRuntime(self.module)  # an ONNX session's memory goes with it
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
