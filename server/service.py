"""The classification service: domain calls in, predictions out. The request path only.

For each request: resolve the version that serves it (the model manager), lease it until the request is
answered, admit it (:mod:`server.batching.admission`), preprocess it in the pool, submit it to its model's
batcher, and select the predictions from the scores it gets back. A model with ``[tiling]`` sends each tile of
an image through its batcher as an item of its own, so tiles batch with each other and with other requests;
their scores are reduced to one row. What happens to a batch (regrouping by version, device decode, staging,
forward pass, out-of-memory splitting, accounting) is :mod:`server.inference.pipeline`. It knows nothing of
gRPC: callers get :mod:`server.core.errors` exceptions, which the edge maps to status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable

from server.batching import interface as batching
from server.batching.admission import Admission, Ticket
from server.batching.batcher import Batcher
from server.core.config import DEFAULT_CACHE_BYTES, DEFAULT_PREPROCESS_NICE, MAX_PIXELS
from server.core.errors import DeadlineExpired, InvalidInput, ModelUnavailable, Overloaded
from server.core.outputs import reduce_tiles, select
from server.core.types import BatchReport, ClassifyCall, ClassifyResult, RawTensor, TileResult
from server.inference.decode_budget import DecodeBudget
from server.inference.devices import InferenceThreads
from server.inference.pipeline import BatchItem, BatchPipeline, Computed, ModelBatchers
from server.inference.prepare import InputPreparer
from server.inference.runtime import LoadedVersion
from server.models.manager import ModelManager
from server.models.memory_budget import MemoryBudget
from server.ops import tracing
from server.ops.response_cache import HASH_OFF_LOOP_BYTES, ResponseCache
from server.rollouts import Rollouts

# Called on the event loop for every answered request: (model, version, batch_size, latency_s). Must not block.
Observer = Callable[[str, int, int, float], None]


class ClassifierService:
    """Classifies requests with dynamic batching per model."""

    def __init__(self, manager: ModelManager, inference: InferenceThreads, *, preprocess_workers: int | None = None,
                 max_pixels: int = MAX_PIXELS, max_decode_bytes: int | None = None,
                 observer: Observer | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 preprocess_nice: int = DEFAULT_PREPROCESS_NICE) -> None:
        """``preprocess_workers`` and ``max_decode_bytes`` None: the host rules (server/ops/host.py);
        ``cache_bytes``: the response cache's budget for models with ``[cache] enabled`` (0: off);
        ``preprocess_nice``: the preprocessing threads' lower CPU priority (``--preprocess-nice``)."""
        self._manager = manager
        self.cache = ResponseCache(cache_bytes)
        self._observer = observer
        self.admission = Admission()
        budget = DecodeBudget(max_decode_bytes) if max_decode_bytes else None
        self._inputs = InputPreparer(preprocess_workers, max_pixels, budget, preprocess_nice)
        self.decode_budget = self._inputs.budget
        self._pipeline = BatchPipeline(manager.resolve, inference, self._inputs, self.admission)
        self._batchers = ModelBatchers(self._pipeline.run_batch)
        self.rollouts = Rollouts(manager, inference, self._inputs)  # canary answers and shadow comparisons
        self._accepting = True
        self.budget: MemoryBudget | None = None
        """Set by the daemon: resolves requests, loading models on demand (--lazy-load) and noting their use."""

    def add_batch_listener(self, listener: Callable[[BatchReport], None]) -> None:
        """Call ``listener(report)`` on the event loop after every forward pass (metrics)."""
        self._pipeline.add_listener(listener)

    def stop_accepting(self) -> None:
        """Refuse new requests with ModelUnavailable; requests already accepted carry on (graceful shutdown)."""
        self._accepting = False

    async def close_queues(self) -> None:
        """The end of a graceful stop: refuse new requests, answer every queued one ModelUnavailable now (its client
        may retry it elsewhere) and those still being prepared once they are; returns when the batches being
        computed are done."""
        self._accepting = False
        await self._batchers.aclose(drain=False)

    async def classify(self, call: ClassifyCall) -> ClassifyResult:
        """Preprocess, batch and compute one request.

        Raises ModelNotFound, ModelUnavailable, InvalidInput, Overloaded, DeadlineExpired or InferenceFailed.
        """
        if not self._accepting:
            raise ModelUnavailable("the server is shutting down and accepts no new requests")
        started = time.perf_counter()
        resolved, cold = await self.resolve(call.model, call.version, call.deadline)
        version = self.rollouts.route(call, resolved)
        version.lease()  # before any await: a swap meanwhile must not release the version this request uses
        try:
            key = await self._cache_key(call, version)
            result = self.cache.get(version.name, key) if key is not None else None
            if result is None:  # a hit skips admission, the queue and the forward pass
                result = await self._classify(call, version)
                # only what the keyed version computed: a request admitted just before a swap may be computed by
                # the version that replaced it, and a canary may answer for the serving version
                if key is not None and result.version == version.version:
                    self.cache.put(key, version, result)
        finally:
            version.unlease()
        if self._observer is not None:
            self._observer(result.model, result.version, result.batch_size, time.perf_counter() - started)
        return dataclasses.replace(result, cold_start=True) if cold else result

    async def resolve(self, model: str, version: int, deadline: float | None) -> tuple[LoadedVersion, bool]:
        """The loaded version a request for ``model`` / ``version`` runs on, and whether it was loaded for it (a
        cold start: ``--lazy-load``, within ``deadline``). Raises ModelNotFound, ModelUnavailable, DeadlineExpired."""
        if self.budget is None:
            return self._manager.resolve(model, version), False
        return await self.budget.resolve(model, version, deadline)

    async def _cache_key(self, call: ClassifyCall, version: LoadedVersion) -> bytes | None:
        """The request's response-cache key (server/ops/response_cache.py), hashed in a worker thread for a large
        payload; None when its model is not cached. Raises InvalidInput for a bad ``top_k``."""
        if not self.cache.active_for(version.name, version.manifest.cache.enabled):
            return None
        lang, _ = version.manifest.labels_for(call.lang)
        key = functools.partial(self.cache.key, version, call.payload, top_k=_check_top_k(call.top_k, version),
                                lang=lang, return_tiles=call.return_tiles)
        payload = call.payload.data if isinstance(call.payload, RawTensor) else call.payload
        return await asyncio.to_thread(key) if len(payload) >= HASH_OFF_LOOP_BYTES else key()

    async def _classify(self, call: ClassifyCall, admitted: LoadedVersion) -> ClassifyResult:
        top_k = _check_top_k(call.top_k, admitted)
        batcher = self._batchers.for_version(self.rollouts.batching_version(admitted))
        ticket = self.admission.admit(admitted.name, queued=batcher.queue_depth, max_queue=admitted.max_queue,
                                      max_batch_size=admitted.max_batch_size, deadline=call.deadline)
        if admitted.manifest.tiling is not None:
            return await self._classify_tiled(call, admitted, top_k, ticket)
        started = time.perf_counter()
        try:
            with tracing.stage("classifyd.preprocess"):
                array = await self._inputs.prepare(call.payload, admitted, deadline=call.deadline)
        finally:
            ticket.release()  # no await between this and submit: the request moves straight into the queue
        preprocess_s = time.perf_counter() - started
        item = BatchItem(array, admitted.manifest.input, call.payload, call.version, admitted,
                         exact=self.rollouts.is_candidate(admitted), request_id=call.request_id,
                         trace=tracing.item_trace())
        batched = await self._submit(batcher, item, call.deadline)
        computed = batched.value
        self.rollouts.compare_later(call, [array], admitted, computed.version, computed.probabilities)
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
        try:
            with tracing.stage("classifyd.preprocess"):
                tiles = await self._inputs.tiles(call.payload, manifest, deadline=call.deadline)
        finally:
            ticket.release()  # the admission counted the request; its tiles now wait in the batcher's queue
        preprocess_s = time.perf_counter() - started
        trace = tracing.item_trace()
        items = [BatchItem(array, manifest.input, call.payload, admitted.version, admitted, box, exact=True,
                           request_id=call.request_id, trace=trace) for box, array in tiles]
        batcher = self._batchers.for_version(self.rollouts.batching_version(admitted))
        results = await self._submit_all(batcher, items, call.deadline)
        lang, labels = manifest.labels_for(call.lang)
        k = min(top_k, len(labels))
        rows = [r.value.probabilities for r in results]
        reduced = reduce_tiles(rows, manifest.tiling.reduce)
        self.rollouts.compare_later(call, [array for _, array in tiles], admitted, admitted, reduced)
        shown = [TileResult(box, select(row, manifest, labels, k), r.batch_size)
                 for (box, _), row, r in zip(tiles, rows, results, strict=True)] if call.return_tiles else []
        return ClassifyResult(
            predictions=select(reduced, manifest, labels, k),
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

    async def _submit_all(self, batcher: Batcher[BatchItem, Computed], items: list[BatchItem],
                          deadline: float | None) -> list[batching.Batched[Computed]]:
        """Submit every item at once; if one fails, withdraw the others and raise its error."""
        tasks = [asyncio.ensure_future(self._submit(batcher, item, deadline)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _submit(self, batcher: Batcher[BatchItem, Computed], item: BatchItem,
                      deadline: float | None) -> batching.Batched[Computed]:
        """Queue ``item`` and wait for its result, the batcher's errors translated to domain errors."""
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
            raise ModelUnavailable("the server is shutting down: the request was not computed; retry it") from None

    def batcher_depth(self, name: str) -> int:
        """Requests waiting in the model's queue (0 if it has none yet)."""
        batcher = self._batchers.get(name)
        return batcher.queue_depth if batcher else 0

    def queue_depth(self, name: str) -> int:
        """Requests counted against the model's queue limit: being prepared or waiting for a batch (what the
        status page and the ``classifyd_queue_depth`` metric show). Safe to call from another thread."""
        return self.batcher_depth(name) + self.admission.preparing(name)

    def queue_depths(self) -> dict[str, tuple[int, int]]:
        """Per model: :meth:`queue_depth` and the queue limit.

        Safe to call from another thread (the metrics exporter): it only copies and reads sizes.
        """
        return {name: (self.queue_depth(name), b.max_queue or 0) for name, b in self._batchers.snapshot().items()}

    async def aclose(self, *, drain: bool = True) -> None:
        """Finish (drain=True) or fail queued requests, then stop the batchers and the preprocessing pool."""
        await self._batchers.aclose(drain=drain)
        await self.rollouts.aclose()
        await asyncio.to_thread(self._inputs.shutdown)  # waits for the images being decoded


def _check_top_k(top_k: int, version: LoadedVersion) -> int:
    labels = len(version.labels)
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0, got {top_k}")
    if top_k > labels:
        raise InvalidInput(f"top_k = {top_k} is larger than the {labels} labels of model {version.name}")
    return top_k or version.manifest.top_k
