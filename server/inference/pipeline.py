"""The batch pipeline: from a batch a model's batcher formed to one result per item.

:class:`ModelBatchers` keeps one :class:`~server.batching.batcher.Batcher` per model, configured from the
serving version's limits and latency-target policy; each calls :meth:`BatchPipeline.run_batch`, which

1. regroups the batch by the version that serves each item *now* (so a swap takes effect between batches),
   keeping an item on the version it was admitted with while that one is being retired, and leases every
   version it will use before computing any group (a version retired meanwhile is released only afterwards);
2. redoes the preprocessing of an item prepared for another input spec (a swap: a payload invalid for the new
   spec fails alone, with InvalidInput), decodes device JPEGs and, on
   CUDA, stages the batch into pinned memory, in the preprocessing pool while the previous batch computes;
3. predicts on the inference thread of the version's device (:mod:`server.inference.devices`), splitting a
   batch that runs out of memory (:mod:`server.inference.isolation`);
4. accounts: the failure log, the batch listeners (metrics), admission's batch times and, with tracing on, the
   batch's spans (:mod:`server.ops.tracing`).

It knows nothing of the model manager: versions are looked up through the ``resolve`` callable it is given.
Everything here runs on the event loop and blocks only the calling task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from server.batching.admission import Admission
from server.batching.batcher import Batcher
from server.batching.policy import LatencyTargetPolicy
from server.core.errors import ClassifydError, InferenceFailed, InvalidInput, ModelUnavailable
from server.core.manifest import InputSpec
from server.core.types import BatchReport, Box, RawTensor
from server.inference.cap_tuning import tuner_for
from server.inference.device_decode import DeviceJpeg, decode_batch
from server.inference.devices import InferenceThreads
from server.inference.isolation import FailureLog, describe, is_out_of_memory, predict_splitting_on_oom
from server.inference.prepare import InputPreparer
from server.inference.runtime import LoadedVersion
from server.inference.staging import Pixels, StagedBatch
from server.ops import tracing
from server.ops.tracing import ItemTrace

log = logging.getLogger("classifyd.service")

Resolve = Callable[[str, int], LoadedVersion]
"""``resolve(model, version)``: the loaded version serving it now (0: the serving version). Raises
ModelNotFound or ModelUnavailable."""
BatchListener = Callable[[BatchReport], None]


@dataclass(eq=False)
class BatchItem:
    """A preprocessed request waiting in a model's batcher."""

    array: np.ndarray | DeviceJpeg
    """The input pixels, or a JPEG the inference side decodes on the model's device."""
    spec: InputSpec
    payload: bytes | RawTensor
    version: int
    admitted: LoadedVersion  # leased by the request: computes it if no other version can
    box: Box | None = None  # a tile: the region of the payload it was cut from
    exact: bool = False  # computed by ``admitted`` only, so all tiles of an image share one version
    request_id: str = ""
    trace: ItemTrace | None = None  # its request's span while tracing is on (server/ops/tracing.py)


@dataclass(frozen=True)
class Computed:
    """One item's scores, and the version and batch that computed them."""

    version: LoadedVersion
    probabilities: np.ndarray
    batch_size: int

    @property
    def num_labels(self) -> int:
        return len(self.version.labels)


Handler = Callable[[str, list[BatchItem]], Awaitable[list[Computed | BaseException]]]


class BatchPipeline:
    """What every model's batcher calls with a batch (:meth:`run_batch`)."""

    def __init__(self, resolve: Resolve, inference: InferenceThreads, inputs: InputPreparer,
                 admission: Admission) -> None:
        self._resolve = resolve
        self._inference = inference
        self._inputs = inputs
        self._admission = admission
        self._failures = FailureLog()
        self._listeners: list[BatchListener] = []

    def add_listener(self, listener: BatchListener) -> None:
        """Call ``listener(report)`` on the event loop after every forward pass (metrics)."""
        self._listeners.append(listener)

    async def run_batch(self, name: str, items: list[BatchItem]) -> list[Computed | BaseException]:
        """Compute a batch of model ``name``: one result per item, a ClassifydError for an item that failed."""
        started = time.perf_counter()
        traced = tracing.open_batch(name, items)  # None while tracing is off
        results: list[Computed | BaseException] = [ModelUnavailable("not computed")] * len(items)
        groups: dict[LoadedVersion, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            try:
                groups[self._version_for(name, item)].append(position)
            except ClassifydError as exc:
                results[position] = exc
        # Every version is leased before the first await: one that is retired while an earlier group computes
        # is released only once this batch is done with it (its later group would find it gone otherwise).
        for version in groups:
            version.lease()
        try:
            for version, positions in groups.items():
                group_started = tracing.now_ns() if traced else 0
                await self._run_group(version, [items[p] for p in positions], positions, results)
                if traced is not None:
                    traced.computed(version.version, [items[p].trace for p in positions],
                                    [results[p] for p in positions], group_started)
        finally:
            for version in groups:
                version.unlease()
            if traced is not None:
                traced.end()
        self._admission.observe_batch(name, time.perf_counter() - started)
        return results

    def _version_for(self, name: str, item: BatchItem) -> LoadedVersion:
        """The version serving ``item`` now; the one it was admitted with if that is being retired."""
        if item.exact and not item.admitted.released:
            return item.admitted
        try:
            return self._resolve(name, item.version)
        except ClassifydError:
            if item.version in (0, item.admitted.version) and not item.admitted.released:
                return item.admitted
            raise

    async def _run_group(self, version: LoadedVersion, items: list[BatchItem], positions: list[int],
                         results: list[Computed | BaseException]) -> None:
        """One forward pass of one version over its share of the batch; out of memory splits it (isolation.py)."""
        splits: list[int] = []
        started = time.perf_counter()
        try:
            pixels = await self._decoded(version, await self._arrays_for(version, items))
            rows = await self._predict(version, pixels, splits)
        except Exception as exc:  # noqa: BLE001 - fails this group only; FailureLog logs model errors
            rows = [exc] * len(items)
        if not all(isinstance(row, ClassifydError) for row in rows):
            self._account(version, items, rows, time.perf_counter() - started, len(splits))
        for position, row in zip(positions, rows, strict=True):
            if isinstance(row, ClassifydError):
                results[position] = row
            elif isinstance(row, BaseException):
                results[position] = InferenceFailed(_failure_message(version, row))
            else:
                results[position] = Computed(version, row, len(items))

    async def _arrays_for(self, version: LoadedVersion,
                          items: list[BatchItem]) -> list[np.ndarray | DeviceJpeg | ClassifydError]:
        """Inputs for ``version``. Items preprocessed for another input spec (a swap) are redone, concurrently in
        the preprocessing pool; one that cannot be (InvalidInput for the new spec) keeps its error in its slot
        and fails alone."""
        spec = version.manifest.input
        arrays: list[np.ndarray | DeviceJpeg | ClassifydError] = [item.array for item in items]
        redo = [i for i, item in enumerate(items) if item.spec != spec]
        if redo:
            redone = await asyncio.gather(*(self._prepared(version, items[i]) for i in redo))
            for position, array in zip(redo, redone, strict=True):
                arrays[position] = array
        return arrays

    async def _prepared(self, version: LoadedVersion, item: BatchItem) -> np.ndarray | DeviceJpeg | ClassifydError:
        """``item``'s payload preprocessed for ``version``, or the error that says why it cannot be."""
        try:
            return await self._inputs.prepare(item.payload, version, item.box)
        except ClassifydError as exc:
            return exc

    async def _decoded(self, version: LoadedVersion,
                       inputs: list[np.ndarray | DeviceJpeg | ClassifydError]) -> list[Pixels | ClassifydError]:
        """The inputs with every device JPEG decoded and fitted on the version's device (``H x W x C``), or the
        InvalidInput of one that fails to decode. On CUDA in the preprocessing pool (nvJPEG's host stages overlap
        the running forward pass); on the CPU on the inference thread, the only one that runs torch operators."""
        positions = [i for i, item in enumerate(inputs) if isinstance(item, DeviceJpeg)]
        if not positions:
            return cast(list[Pixels | ClassifydError], inputs)
        jpegs = [cast(DeviceJpeg, inputs[i]) for i in positions]
        if version.device.type == "cuda":
            decoded = await self._inputs.run(_decode_hwc, jpegs, version.manifest.input, version.device)
        else:
            decoded = await self._inference.for_version(version).run(_decode_hwc, jpegs, version.manifest.input,
                                                                     version.device)
        out = cast(list[Pixels | ClassifydError], list(inputs))
        for position, pixels in zip(positions, decoded, strict=True):
            out[position] = pixels
        return out

    async def _predict(self, version: LoadedVersion, pixels: list[Pixels | ClassifydError],
                       splits: list[int]) -> list[np.ndarray | BaseException]:
        """A probability row per input; an input that could not be prepared or decoded keeps its error."""
        good = [p for p in pixels if not isinstance(p, ClassifydError)]
        if not good:
            return list(pixels)
        batch = await self._staged(version, good)
        thread = self._inference.for_version(version)  # one per device: two GPUs compute at once
        computed = iter(await thread.run(predict_splitting_on_oom, version.predict, batch, splits))
        return [p if isinstance(p, ClassifydError) else next(computed) for p in pixels]

    async def _staged(self, version: LoadedVersion, pixels: list[Pixels]) -> list[Pixels] | StagedBatch:
        """On CUDA, the batch stacked into pinned memory and on its way to the device, staged in the
        preprocessing pool; on the CPU the inputs as they are (stacking them there would only add a thread hop)."""
        if version.device.type != "cuda":
            return pixels
        return await self._inputs.run(version.stage, pixels)

    def _account(self, version: LoadedVersion, items: list[BatchItem], rows: list[np.ndarray | BaseException],
                 seconds: float, splits: int) -> None:
        """Count and log a model failure, and tell the batch listeners."""
        failed = [(item, row) for item, row in zip(items, rows, strict=True)
                  if isinstance(row, BaseException) and not isinstance(row, ClassifydError)]
        if failed:
            ids = [item.request_id for item, _ in failed]
            self._failures.failed(version.name, version.version, len(items), failed[0][1], ids)
        else:
            self._failures.succeeded(version.name, version.version)
        error = type(failed[0][1]).__name__ if failed else ""
        report = BatchReport(version.name, version.version, len(items), seconds, error, splits)
        for listener in list(self._listeners):
            try:
                listener(report)
            except Exception:
                log.exception("batch listener failed")


class ModelBatchers:
    """One batcher per model, created on first use and kept in step with the serving version's limits."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._batchers: dict[str, Batcher[BatchItem, Computed]] = {}
        self._policies: weakref.WeakKeyDictionary[LoadedVersion, LatencyTargetPolicy] = weakref.WeakKeyDictionary()

    def for_version(self, version: LoadedVersion) -> Batcher[BatchItem, Computed]:
        """The batcher of ``version``'s model, (re)configured with its limits. Call on the event loop."""
        batcher = self._batchers.get(version.name)
        limits = {"max_batch_size": version.max_batch_size, "max_delay_s": version.max_delay_ms / 1000.0,
                  "max_queue": version.max_queue, "policy": self._policy_for(version), "tuner": tuner_for(version)}
        if batcher is None:
            # On CUDA the next batch is staged (stacked, copied to the device) while the current one computes.
            batcher = Batcher(lambda items, name=version.name: self._handler(name, items),
                              name=f"model {version.name}",
                              max_concurrent_batches=2 if version.device.type == "cuda" else 1, **limits)
            batcher.start()
            self._batchers[version.name] = batcher
        elif (batcher.max_batch_size, batcher.max_delay_s, batcher.max_queue, batcher.policy, batcher.tuner) != \
                tuple(limits.values()):
            batcher.configure(**limits)
        return batcher

    def _policy_for(self, version: LoadedVersion) -> LatencyTargetPolicy | None:
        """The version's latency-target policy (one per version, so its learned correction persists); None
        without a target or a measured curve."""
        target_ms = version.manifest.batching.latency_target_ms
        if target_ms is None or version.batch_curve is None:
            return None
        policy = self._policies.get(version)
        if policy is None:
            # the curve is read at each call: a runtime switch measures a new one (server/models/loader/runtime_choice)
            policy = self._policies[version] = LatencyTargetPolicy(functools.partial(_curve_estimate, version),
                                                                   target_s=target_ms / 1000.0)
        return policy

    def get(self, name: str) -> Batcher[BatchItem, Computed] | None:
        """Model ``name``'s batcher; None before its first request."""
        return self._batchers.get(name)

    def snapshot(self) -> dict[str, Batcher[BatchItem, Computed]]:
        """Every model's batcher, copied (safe to call from another thread: it only copies)."""
        return dict(self._batchers)

    async def aclose(self, *, drain: bool = True) -> None:
        """Finish (drain=True) or fail the queued items, then stop every batcher."""
        await asyncio.gather(*(b.aclose(drain=drain) for b in self._batchers.values()))


def _curve_estimate(version: LoadedVersion, batch_size: int) -> float:
    """Seconds of one batch of ``batch_size`` by ``version``'s batch curve as it is now."""
    curve = version.batch_curve
    assert curve is not None  # a latency-target policy exists only once a curve was measured; none is ever removed
    return curve.estimate(batch_size)


def _decode_hwc(jpegs: list[DeviceJpeg], spec: InputSpec, device: torch.device) -> list[torch.Tensor | InvalidInput]:
    """:func:`decode_batch` with each image as ``H x W x C``, the layout of preprocessed arrays. Blocks."""
    return [t if isinstance(t, InvalidInput) else t.permute(1, 2, 0) for t in decode_batch(jpegs, spec, device)]


def _failure_message(version: LoadedVersion, exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return (f"model {version.name} version {version.version} ran out of memory even for a single request "
                f"(the batch was split down to one): {exc}")
    return f"model {version.name} version {version.version} failed on this batch: {describe(exc)}"
