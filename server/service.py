"""The classification service: domain calls in, predictions out.

Ties together the model manager (which version serves), the preprocessing
pool (decode and resize, off the event loop), one dynamic batcher per model
and the inference thread (forward passes). A model with ``[tiling]`` sends
each tile of an image through its batcher as an item of its own, so tiles
batch with each other and with other requests. It knows nothing of gRPC:
callers get :mod:`server.core.errors` exceptions, which the edge maps to status codes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from server.batching import batcher as batching
from server.batching.admission import Admission, Ticket
from server.batching.policy import LatencyTargetPolicy
from server.core.errors import (
    ClassifydError,
    DeadlineExpired,
    InferenceFailed,
    InvalidInput,
    ModelUnavailable,
    Overloaded,
)
from server.core.manifest import InputSpec
from server.core.outputs import reduce_tiles, select
from server.core.types import BatchReport, Box, ClassifyCall, ClassifyResult, RawTensor, TileResult
from server.inference.device_decode import DeviceJpeg, decode_batch, probe
from server.inference.isolation import FailureLog, is_out_of_memory, predict_splitting_on_oom
from server.inference.preprocess import MAX_PIXELS, is_model_sized, preprocess, preprocess_tiles, tensor_to_array
from server.inference.runtime import InferenceThread, LoadedVersion
from server.inference.staging import Pixels, StagedBatch
from server.models.manager import ModelManager

log = logging.getLogger("classifyd.service")
# Called on the event loop for every answered request: (model, version, batch_size, latency_s). Must not block.
Observer = Callable[[str, int, int, float], None]


@dataclass(eq=False)
class _Item:
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


@dataclass(frozen=True)
class _Computed:
    version: LoadedVersion
    probabilities: np.ndarray
    batch_size: int

    @property
    def num_labels(self) -> int:
        return len(self.version.labels)


class ClassifierService:
    """Classifies requests with dynamic batching per model."""

    def __init__(self, manager: ModelManager, inference: InferenceThread, *, preprocess_workers: int | None = None,
                 max_pixels: int = MAX_PIXELS, observer: Observer | None = None) -> None:
        self._manager = manager
        self._observer = observer
        self._inference = inference
        self._max_pixels = max_pixels
        workers = preprocess_workers or max(2, os.cpu_count() or 2)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="classifyd-pre")
        self._batchers: dict[str, batching.Batcher[_Item, _Computed]] = {}
        self._policies: weakref.WeakKeyDictionary[LoadedVersion, LatencyTargetPolicy] = weakref.WeakKeyDictionary()
        self.admission = Admission()
        self._failures = FailureLog()
        self._batch_listeners: list[Callable[[BatchReport], None]] = []
        self._accepting = True

    def add_batch_listener(self, listener: Callable[[BatchReport], None]) -> None:
        """Call ``listener(report)`` on the event loop after every forward pass (metrics)."""
        self._batch_listeners.append(listener)

    def stop_accepting(self) -> None:
        """Refuse new requests with ModelUnavailable; requests already accepted carry on (graceful shutdown)."""
        self._accepting = False

    async def classify(self, call: ClassifyCall) -> ClassifyResult:
        """Preprocess, batch and compute one request.

        Raises ModelNotFound, ModelUnavailable, InvalidInput, Overloaded, DeadlineExpired or InferenceFailed.
        """
        if not self._accepting:
            raise ModelUnavailable("the server is shutting down and accepts no new requests")
        started = time.perf_counter()
        version = self._manager.resolve(call.model, call.version)
        version.lease()  # the admitting version stays loaded until this request is answered
        try:
            result = await self._classify(call, version)
        finally:
            version.unlease()
        if self._observer is not None:
            self._observer(result.model, result.version, result.batch_size, time.perf_counter() - started)
        return result

    async def _classify(self, call: ClassifyCall, admitted: LoadedVersion) -> ClassifyResult:
        top_k = _check_top_k(call.top_k, admitted)
        batcher = self._batcher_for(admitted)
        ticket = self.admission.admit(admitted.name, queued=batcher.queue_depth, max_queue=admitted.max_queue,
                                      max_batch_size=admitted.max_batch_size, deadline=call.deadline)
        if admitted.manifest.tiling is not None:
            return await self._classify_tiled(call, admitted, top_k, ticket)
        started = time.perf_counter()
        try:
            array = await self._preprocess(call.payload, admitted)
        finally:
            ticket.release()  # no await between this and submit: the request moves straight into the queue
        preprocess_s = time.perf_counter() - started
        item = _Item(array, admitted.manifest.input, call.payload, call.version, admitted, request_id=call.request_id)
        batched = await self._submit(batcher, item, call.deadline)
        computed = batched.value
        manifest = computed.version.manifest
        lang, labels = manifest.labels_for(call.lang)
        return ClassifyResult(
            predictions=select(computed.probabilities, manifest, labels, min(top_k, computed.num_labels)),
            model=computed.version.name,
            version=computed.version.version,
            batch_size=computed.batch_size,
            queue_s=batched.queue_s,
            compute_s=batched.compute_s,
            preprocess_s=preprocess_s,
            lang=lang,
        )

    async def _classify_tiled(self, call: ClassifyCall, admitted: LoadedVersion, top_k: int,
                              ticket: Ticket) -> ClassifyResult:
        """Cut the image into tiles, submit each to the batcher, and reduce the tiles' scores to one row."""
        manifest = admitted.manifest
        assert manifest.tiling is not None
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            tiles = await loop.run_in_executor(self._pool, preprocess_tiles, call.payload, manifest.input,
                                               manifest.tiling, self._max_pixels)
        finally:
            ticket.release()  # the admission counted the request; its tiles now wait in the batcher's queue
        preprocess_s = time.perf_counter() - started
        items = [_Item(array, manifest.input, call.payload, admitted.version, admitted, box, exact=True,
                       request_id=call.request_id) for box, array in tiles]
        results = await self._submit_all(self._batcher_for(admitted), items, call.deadline)
        lang, labels = manifest.labels_for(call.lang)
        k = min(top_k, len(labels))
        rows = [r.value.probabilities for r in results]
        shown = [TileResult(box, select(row, manifest, labels, k), r.batch_size)
                 for (box, _), row, r in zip(tiles, rows, results, strict=True)] if call.return_tiles else []
        return ClassifyResult(
            predictions=select(reduce_tiles(rows, manifest.tiling.reduce), manifest, labels, k),
            model=admitted.name,
            version=admitted.version,
            batch_size=max(r.batch_size for r in results),
            queue_s=max(r.queue_s for r in results),
            compute_s=max(r.compute_s for r in results),
            preprocess_s=preprocess_s,
            lang=lang,
            tile_count=len(items),
            tiles=shown,
        )

    async def _submit_all(self, batcher: batching.Batcher[_Item, _Computed], items: list[_Item],
                          deadline: float | None) -> list[batching.Batched[_Computed]]:
        """Submit every item at once; if one fails, withdraw the others and raise its error."""
        tasks = [asyncio.ensure_future(self._submit(batcher, item, deadline)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _preprocess(self, payload: bytes | RawTensor, version: LoadedVersion,
                          box: Box | None = None) -> np.ndarray | DeviceJpeg:
        """The pixels for ``version`` (Pillow, in the pool), or the checked JPEG when it decodes on the device.

        A uint8 tensor already of the model's input size is only viewed, on the loop: no thread hop for the
        callers that preprocess themselves (the tensor path of the GPU benchmark)."""
        spec = version.manifest.input
        if box is None and is_model_sized(payload, spec):
            return tensor_to_array(payload, spec, self._max_pixels)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _prepare, payload, spec, self._max_pixels, box,
                                          box is None and version.decodes_on_device)

    async def _submit(self, batcher: batching.Batcher[_Item, _Computed], item: _Item,
                      deadline: float | None) -> batching.Batched[_Computed]:
        try:
            return await batcher.submit(item, deadline=deadline)
        except batching.QueueFull as exc:  # TargetUnreachable too: load beyond what the target allows
            raise Overloaded(str(exc)) from None
        except batching.DeadlineUnreachable as exc:
            raise DeadlineExpired(str(exc)) from None
        except batching.DeadlineExpired:
            raise DeadlineExpired("deadline passed while the request waited in the queue; it was not computed") \
                from None
        except batching.BatcherClosed:
            raise ModelUnavailable("the server is shutting down") from None

    def _batcher_for(self, version: LoadedVersion) -> batching.Batcher[_Item, _Computed]:
        """The model's batcher, created on first use and kept in step with the serving version's limits."""
        batcher = self._batchers.get(version.name)
        limits = {"max_batch_size": version.max_batch_size, "max_delay_s": version.max_delay_ms / 1000.0,
                  "max_queue": version.max_queue, "policy": self._policy_for(version)}
        if batcher is None:
            # On CUDA the next batch is staged (stacked, copied to the device) while the current one computes.
            batcher = batching.Batcher(lambda items, name=version.name: self._run_batch(name, items),
                                       name=f"model {version.name}",
                                       max_concurrent_batches=2 if version.device.type == "cuda" else 1, **limits)
            batcher.start()
            self._batchers[version.name] = batcher
        elif (batcher.max_batch_size, batcher.max_delay_s, batcher.max_queue, batcher.policy) != \
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
            policy = self._policies[version] = LatencyTargetPolicy(version.batch_curve.estimate,
                                                                   target_s=target_ms / 1000.0)
        return policy

    async def _run_batch(self, name: str, items: list[_Item]) -> list[_Computed | BaseException]:
        """Compute a batch. Versions are resolved now, so a swap takes effect between batches."""
        started = time.perf_counter()
        results: list[_Computed | BaseException] = [ModelUnavailable("not computed")] * len(items)
        groups: dict[LoadedVersion, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            try:
                groups[self._version_for(name, item)].append(position)
            except ClassifydError as exc:
                results[position] = exc
        for version, positions in groups.items():
            version.lease()
            try:
                await self._run_group(version, [items[p] for p in positions], positions, results)
            finally:
                version.unlease()
        self.admission.observe_batch(name, time.perf_counter() - started)
        return results

    def _version_for(self, name: str, item: _Item) -> LoadedVersion:
        """The version serving ``item`` now; the one it was admitted with if that is being retired."""
        if item.exact and not item.admitted.released:
            return item.admitted
        try:
            return self._manager.resolve(name, item.version)
        except ClassifydError:
            if item.version in (0, item.admitted.version) and not item.admitted.released:
                return item.admitted
            raise

    async def _run_group(self, version: LoadedVersion, items: list[_Item], positions: list[int],
                         results: list[_Computed | BaseException]) -> None:
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
                results[position] = _Computed(version, row, len(items))

    async def _predict(self, version: LoadedVersion, pixels: list[Pixels | InvalidInput],
                       splits: list[int]) -> list[np.ndarray | BaseException]:
        """A probability row per input; an input that failed to decode keeps its InvalidInput in its slot."""
        good = [p for p in pixels if not isinstance(p, InvalidInput)]
        if not good:
            return list(pixels)
        batch = await self._staged(version, good)
        computed = iter(await self._inference.run(predict_splitting_on_oom, version.predict, batch, splits))
        return [p if isinstance(p, InvalidInput) else next(computed) for p in pixels]

    def _account(self, version: LoadedVersion, items: list[_Item], rows: list[np.ndarray | BaseException],
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
        self._report_batch(BatchReport(version.name, version.version, len(items), seconds, error, splits))

    def _report_batch(self, report: BatchReport) -> None:
        for listener in list(self._batch_listeners):
            try:
                listener(report)
            except Exception:
                log.exception("batch listener failed")

    async def _staged(self, version: LoadedVersion, pixels: list[Pixels]) -> list[Pixels] | StagedBatch:
        """On CUDA, the batch stacked into pinned memory and on its way to the device, staged in the
        preprocessing pool; on the CPU the inputs as they are (stacking them there would only add a thread hop)."""
        if version.device.type != "cuda":
            return pixels
        return await asyncio.get_running_loop().run_in_executor(self._pool, version.stage, pixels)

    async def _decoded(self, version: LoadedVersion,
                       inputs: list[np.ndarray | DeviceJpeg]) -> list[Pixels | InvalidInput]:
        """The inputs with every device JPEG decoded and fitted on the version's device (``H x W x C``), or the
        InvalidInput of one that fails to decode. On CUDA in the preprocessing pool (nvJPEG's host stages overlap
        the running forward pass); on the CPU on the inference thread, the only one that runs torch operators."""
        positions = [i for i, item in enumerate(inputs) if isinstance(item, DeviceJpeg)]
        if not positions:
            return cast(list[Pixels | InvalidInput], inputs)
        jpegs = [cast(DeviceJpeg, inputs[i]) for i in positions]
        if version.device.type == "cuda":
            loop = asyncio.get_running_loop()
            decoded = await loop.run_in_executor(self._pool, _decode_hwc, jpegs, version.manifest.input, version.device)
        else:
            decoded = await self._inference.run(_decode_hwc, jpegs, version.manifest.input, version.device)
        out = cast(list[Pixels | InvalidInput], list(inputs))
        for position, pixels in zip(positions, decoded, strict=True):
            out[position] = pixels
        return out

    async def _arrays_for(self, version: LoadedVersion, items: list[_Item]) -> list[np.ndarray | DeviceJpeg]:
        """Inputs for ``version``; an item preprocessed for another input spec (a swap) is redone."""
        spec = version.manifest.input
        arrays = []
        for item in items:
            arrays.append(item.array if item.spec == spec else await self._preprocess(item.payload, version, item.box))
        return arrays

    def batcher_depth(self, name: str) -> int:
        """Requests waiting in the model's queue (0 if it has none yet)."""
        batcher = self._batchers.get(name)
        return batcher.queue_depth if batcher else 0

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """Per model: requests counted against its queue limit (preprocessing + waiting), and the limit.

        Safe to call from another thread (the metrics exporter): it only copies and reads sizes.
        """
        return {name: (b.queue_depth + self.admission.preparing(name), b.max_queue or 0)
                for name, b in dict(self._batchers).items()}

    async def aclose(self, *, drain: bool = True) -> None:
        """Finish (drain=True) or fail queued requests, then stop the batchers and the preprocessing pool."""
        await asyncio.gather(*(b.aclose(drain=drain) for b in self._batchers.values()))
        self._pool.shutdown(wait=True)


def _prepare(payload: bytes | RawTensor, spec: InputSpec, max_pixels: int, box: Box | None,
             device_decode: bool) -> np.ndarray | DeviceJpeg:
    """Preprocessing-pool work for one input: the checked JPEG when the device decodes it, else the pixels.
    Blocks; raises InvalidInput."""
    if device_decode and isinstance(payload, bytes):
        jpeg = probe(payload, spec, max_pixels)
        if jpeg is not None:
            return jpeg
    return preprocess(payload, spec, max_pixels, box)


def _decode_hwc(jpegs: list[DeviceJpeg], spec: InputSpec, device: torch.device) -> list[torch.Tensor | InvalidInput]:
    """:func:`decode_batch` with each image as ``H x W x C``, the layout of preprocessed arrays. Blocks."""
    return [t if isinstance(t, InvalidInput) else t.permute(1, 2, 0) for t in decode_batch(jpegs, spec, device)]


def _failure_message(version: LoadedVersion, exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return (f"model {version.name} version {version.version} ran out of memory even for a single request "
                f"(the batch was split down to one): {exc}")
    return f"model {version.name} version {version.version} failed on this batch: {type(exc).__name__}: {exc}"


def _check_top_k(top_k: int, version: LoadedVersion) -> int:
    labels = len(version.labels)
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0, got {top_k}")
    if top_k > labels:
        raise InvalidInput(f"top_k = {top_k} is larger than the {labels} labels of model {version.name}")
    return top_k or version.manifest.top_k

