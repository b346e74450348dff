"""The gRPC edge: protobuf in, domain calls, protobuf out.

Servicer methods only translate; :class:`ErrorInterceptor` maps domain errors
to precise status codes in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2

from server.core import errors
from server.core.errors import Status
from server.core.lifecycle import ModelEvent, VersionState
from server.core.types import ClassifyCall, ClassifyResult, Prediction, RawTensor, RequestObserver, RequestReport
from server.models.manager import ModelManager, ModelRecord, VersionRecord
from server.service import ClassifierService

log = logging.getLogger("classifyd.grpc")

Request = TypeVar("Request")
Response = TypeVar("Response")
_DTYPE_NAMES = {pb.Tensor.UINT8: "uint8", pb.Tensor.FLOAT32: "float32"}


def grpc_code(status: Status) -> grpc.StatusCode:
    """The gRPC code of a domain status (the names are the same)."""
    return grpc.StatusCode[status.name]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a request that raised ``exc`` gets (the table is :mod:`server.core.errors`)."""
    status, message = errors.status_for(exc)
    return grpc_code(status), message


def new_request_id() -> str:
    """An id for a request that brought none."""
    return f"{random.getrandbits(64):016x}"  # uuid4 costs a system call per request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping handlers into status codes; unexpected ones are logged as INTERNAL.

    Unary and server-streaming handlers are wrapped (a stream fails with the status once its error surfaces);
    ClassifyStream answers bad requests inside the stream itself.
    """

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        codec = {"request_deserializer": getattr(handler, "request_deserializer", None),
                 "response_serializer": getattr(handler, "response_serializer", None)}
        if handler is not None and handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary, method), **codec)
        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(handler.unary_stream, method), **codec)
        return handler


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler already chose its status
        raise exc
    if not isinstance(exc, errors.ClassifydError):
        log.exception("unexpected error in %s", method)
    code, message = status_for(exc)
    await context.abort(code, message)


def _guard_unary(inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except Exception as exc:
            await _abort_for(exc, context, method)
            raise  # unreachable: abort raises

    return unary


def _guard_stream(inner: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in inner(request, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            await _abort_for(exc, context, method)

    return stream


def call_from_request(request: pb.ClassifyRequest, deadline: float | None, request_id: str = "") -> ClassifyCall:
    """Translate a ClassifyRequest. Raises InvalidInput when no input is set."""
    which = request.WhichOneof("input")
    if which == "image":
        payload: bytes | RawTensor = request.image
    elif which == "tensor":
        tensor = request.tensor
        dtype = _DTYPE_NAMES.get(tensor.dtype, pb.Tensor.DType.Name(tensor.dtype) if tensor.dtype in
                                 pb.Tensor.DType.values() else str(tensor.dtype))
        payload = RawTensor(dtype, tuple(tensor.shape), tensor.data)
    else:
        raise errors.InvalidInput("empty input: set either 'image' (encoded bytes) or 'tensor'")
    return ClassifyCall(request.model, payload, request.version, request.top_k, deadline, lang=request.lang,
                        return_tiles=request.return_tiles, request_id=request_id or request.request_id)


def response_from_result(result: ClassifyResult, request_id: str) -> pb.ClassifyResponse:
    """Translate a ClassifyResult."""
    return pb.ClassifyResponse(
        predictions=_predictions(result.predictions),
        model=result.model,
        version=result.version,
        request_id=request_id,
        batch_size=result.batch_size,
        queue_us=round(result.queue_s * 1e6),
        compute_us=round(result.compute_s * 1e6),
        preprocess_us=round(result.preprocess_s * 1e6),
        tiles=[pb.TileResult(x=t.box[0], y=t.box[1], width=t.box[2], height=t.box[3],
                             predictions=_predictions(t.predictions), batch_size=t.batch_size) for t in result.tiles],
        tile_count=result.tile_count,
        lang=result.lang,
    )


def _predictions(predictions: list[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(index=p.index, label=p.label, score=p.score) for p in predictions]


def model_info(record: ModelRecord, device: str) -> pb.ModelInfo:
    """Describe a model from the manager's record."""
    manifest = record.latest_manifest()
    serving = record.serving()
    info = pb.ModelInfo(
        name=record.name,
        versions=[version_info(v) for v in sorted(record.versions.values(), key=lambda v: -v.version)],
        device=device,
        serving_version=serving.version if serving else 0,
    )
    if manifest:
        spec = manifest.input
        info.num_labels = manifest.num_classes
        info.input.CopyFrom(pb.InputSpec(height=spec.height, width=spec.width, channels=spec.channels,
                                         color=spec.color, mean=spec.mean, std=spec.std, resize=spec.resize,
                                         crop=spec.crop, interpolation=spec.interpolation,
                                         resolved_from=spec.resolved_from))
        info.is_default = manifest.is_default
        info.architecture = manifest.architecture
        info.default_top_k = manifest.top_k
        info.activation = manifest.activation
        info.channels_last = manifest.channels_last
        info.languages.extend(manifest.translations)
        info.precision = manifest.precision
        if manifest.tiling:
            t = manifest.tiling
            info.tiling.CopyFrom(pb.Tiling(tile_height=t.tile[0], tile_width=t.tile[1], stride_y=t.stride[0],
                                           stride_x=t.stride[1], reduce=t.reduce, max_tiles=t.max_tiles))
    if serving and serving.loaded:
        info.max_batch_size = serving.loaded.max_batch_size
        info.max_delay_ms = serving.loaded.max_delay_ms
        info.latency_target_ms = serving.loaded.manifest.batching.latency_target_ms or 0.0
        curve = serving.loaded.batch_curve
        if curve is not None:
            info.autotuned = curve.autotuned
            info.batch_curve.extend(pb.BatchPoint(batch_size=p.batch_size, images_per_second=p.images_per_second,
                                                  batch_ms=p.batch_s * 1000.0) for p in curve.points)
        info.precision = serving.loaded.precision
        info.precision_note = serving.loaded.precision_note
    return info


def version_info(entry: VersionRecord) -> pb.VersionInfo:
    """Describe one version."""
    info = pb.VersionInfo(version=entry.version, state=entry.state.value, error=entry.error,
                          generation=entry.generation)
    if entry.validation_accuracy is not None:
        info.validation_accuracy = entry.validation_accuracy
    return info


def event_message(event: ModelEvent) -> pb.ModelEvent:
    """Translate a manager event."""
    return pb.ModelEvent(model=event.model, version=event.version, kind=event.kind.value, reason=event.reason,
                         time_unix_ms=round(event.time * 1000), serving=event.serving)


def current_events(record: ModelRecord) -> list[pb.ModelEvent]:
    """One event per known version, describing where it stands now."""
    serving = record.serving()
    kinds = {VersionState.LOADING: pb.ModelEvent.LOADING, VersionState.READY: pb.ModelEvent.READY,
             VersionState.FAILED: pb.ModelEvent.FAILED, VersionState.UNLOADING: pb.ModelEvent.READY}
    now = round(time.time() * 1000)
    return [pb.ModelEvent(model=record.name, version=v.version, kind=kinds[v.state], reason=v.error,
                          time_unix_ms=now, serving=serving is v)
            for v in sorted(record.versions.values(), key=lambda v: v.version)]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def answer_concurrently(requests: AsyncIterator[Request],
                              answer: Callable[[Request], Awaitable[Response]]) -> AsyncIterator[Response]:
    """Answer each request of a stream in its own task; yield the answers as they complete (order not kept).

    ``answer`` must not raise. Ends once every request is answered; cancels the rest when the caller stops.
    """
    done: asyncio.Queue[Response | None] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()

    async def answer_one(request: Request) -> None:
        await done.put(await answer(request))

    async def read_all() -> None:
        async for request in requests:
            task = asyncio.create_task(answer_one(request))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*list(pending))
        await done.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while (response := await done.get()) is not None:
            yield response
        await reader
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()


def _outcome(exc: BaseException, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """The status a request ended with; a cancelled handler means the deadline passed or the client left."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    return status_for(exc)


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """classifier.v1.Classifier, translating to :class:`ClassifierService` calls."""

    def __init__(self, service: ClassifierService, manager: ModelManager,
                 on_request: RequestObserver | None = None) -> None:
        self._service = service
        self._manager = manager
        self._on_request = on_request

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        request_id = request.request_id or new_request_id()
        started = time.perf_counter()
        try:
            result = await self._service.classify(call_from_request(request, _deadline(context), request_id))
        except BaseException as exc:
            self._report(request, request_id, started, *_outcome(exc, context))
            raise
        self._report(request, request_id, started, grpc.StatusCode.OK, "", result)
        context.set_trailing_metadata((("classifyd-pid", str(os.getpid())),))  # which process served (--workers)
        return response_from_result(result, request_id)

    def _report(self, request: pb.ClassifyRequest, request_id: str, started: float, code: grpc.StatusCode,
                message: str, result: ClassifyResult | None = None) -> None:
        if self._on_request is None:
            return
        report = RequestReport(request_id, request.model, request.version, Status[code.name], message,
                               time.perf_counter() - started, result)
        try:
            self._on_request(report)
        except Exception:
            log.exception("request observer failed")

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Requests are computed concurrently; responses go out as they complete (order not kept)."""
        async for response in answer_concurrently(request_iterator,
                                                  lambda r: self._stream_answer(r, _deadline(context))):
            yield response

    async def _stream_answer(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        request_id = request.request_id or new_request_id()
        started = time.perf_counter()
        try:
            result = await self._service.classify(call_from_request(request, deadline, request_id))
        except asyncio.CancelledError:
            self._report(request, request_id, started, grpc.StatusCode.CANCELLED, "stream ended before the answer")
            raise
        except Exception as exc:
            if not isinstance(exc, errors.ClassifydError):
                log.exception("unexpected error in ClassifyStream")
            code, message = status_for(exc)
            self._report(request, request_id, started, code, message)
            return pb.ClassifyResponse(request_id=request_id, error=pb.Error(code=code.value[0], message=message))
        self._report(request, request_id, started, grpc.StatusCode.OK, "", result)
        return response_from_result(result, request_id)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) \
            -> pb.ListModelsResponse:
        device = str(self._manager.settings.device)
        return pb.ListModelsResponse(models=[model_info(r, device) for r in self._manager.models()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return model_info(self._manager.get(request.model), str(self._manager.settings.device))

    async def WatchModels(self, request: pb.WatchModelsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelEvent]:
        """Events as they happen; the current state first when asked. Ends when the client goes away."""
        events: asyncio.Queue[ModelEvent] = asyncio.Queue(maxsize=10_000)

        def listener(event: ModelEvent) -> None:
            if not request.model or event.model == request.model:
                with contextlib.suppress(asyncio.QueueFull):  # a client that stopped reading loses old events
                    events.put_nowait(event)

        self._manager.add_listener(listener)
        try:
            if request.include_current:
                records = [self._manager.get(request.model)] if request.model else self._manager.models()
                for record in records:
                    for message in current_events(record):
                        yield message
            while True:
                yield event_message(await events.get())
        finally:
            self._manager.remove_listener(listener)

    async def ReloadModel(self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        name = request.model or self._manager.get("").name
        if not name.isprintable() or "/" in name or name.startswith("."):
            raise errors.InvalidInput(f"invalid model name {name!r}")
        if not (self._manager.settings.models_dir / name).is_dir():
            self._manager.get(name)  # raises NOT_FOUND for an unknown model
        await self._manager.reconcile(name, force=True)
        return model_info(self._manager.get(name), str(self._manager.settings.device))


class HealthReporter:
    """Keeps grpc.health.v1 in step with the manager: "" for the server, one service name per model."""

    def __init__(self, servicer: health.aio.HealthServicer, manager: ModelManager) -> None:
        self._servicer = servicer
        self._manager = manager
        self._tasks: set[asyncio.Task[None]] = set()

    def model_changed(self, event: ModelEvent) -> None:
        """Manager listener: schedule the status update (the health servicer's setters are async)."""
        task = asyncio.get_running_loop().create_task(self.update(event.model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def update(self, name: str) -> None:
        try:
            serving = self._manager.get(name).serving() is not None
        except errors.ModelNotFound:
            serving = False
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._servicer.set(name, status)

    async def set_overall(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._servicer.set("", status)
        for record in self._manager.models():
            if not serving:
                await self._servicer.set(record.name, status)

