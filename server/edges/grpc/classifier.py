"""The gRPC edge: protobuf in, domain calls, protobuf out.

Servicer methods only translate; the daemon's one interceptor (:mod:`server.edges.grpc.calls`) maps domain
errors to precise status codes in one place (:func:`server.edges.grpc.common.abort_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import grpc
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2

from server.batching.online import TuningSnapshot
from server.core import errors
from server.core.config import DEFAULT_RELOAD_MIN_INTERVAL_S, MAX_STREAM_IN_FLIGHT
from server.core.lifecycle import ModelEvent, VersionState
from server.core.types import FLOAT32, UINT8, ClassifyCall, ClassifyResult, Prediction, RawTensor, RequestObserver
from server.edges.common.describe import ModelDescription, VersionDescription, describe_model
from server.edges.common.requests import RequestBook, Ticket
from server.edges.common.results import prediction_fields, result_fields, tile_fields
from server.edges.grpc.common import (
    answer_concurrently,
    deadline_of,
    failure_status,
    mark_serving_process,
    outcome_in,
    stream_outcome,
)
from server.edges.grpc.rollout import promote, reject, rollback, rollout_info
from server.models.control import ModelControl, check_model_name
from server.models.manager import ModelManager, ModelRecord
from server.models.reloads import Reloads
from server.models.source.repository import model_present
from server.service import ClassifierService

log = logging.getLogger("classifyd.grpc")
CLASSIFY_SPAN = "classifier.v1.Classifier/Classify"
STREAM_SPAN = "classifier.v1.Classifier/ClassifyStream"
"""The names of a request's span (server/ops/tracing.py): the method, as OpenTelemetry names gRPC server spans."""

_DTYPE_NAMES = {pb.Tensor.UINT8: UINT8, pb.Tensor.FLOAT32: FLOAT32}


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
    """Translate a ClassifyResult (the fields are :func:`server.edges.common.results.result_fields`)."""
    return pb.ClassifyResponse(
        predictions=_predictions(result.predictions),
        request_id=request_id,
        tiles=[pb.TileResult(predictions=_predictions(t.predictions), **tile_fields(t)) for t in result.tiles],
        **result_fields(result),
    )


def _predictions(predictions: list[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(**prediction_fields(p)) for p in predictions]


def _tuning_info(info: pb.ModelInfo, tuning: TuningSnapshot) -> None:
    """The online cap tuner's state (ModelInfo fields 53-57, docs/batching.md)."""
    info.batch_cap_online = tuning.cap_online
    info.serving_batch_curve.extend(pb.BatchPoint(batch_size=e.batch_size, images_per_second=e.images_per_second,
                                                  batch_ms=e.batch_s * 1000.0, torch_threads=e.width)
                                    for e in tuning.estimates)
    info.batch_cap_changes = tuning.changes
    info.batch_cap_last_change = tuning.last_change
    info.batch_threads = tuning.width


def model_info(record: ModelRecord, device: str) -> pb.ModelInfo:
    """Describe a model from the manager's record (the one description: :mod:`server.edges.common.describe`)."""
    model = describe_model(record)
    device = model.serving.device if model.serving else device  # the serving version's placement, else --device
    info = pb.ModelInfo(name=model.name, versions=[version_info(v) for v in model.versions], device=device,
                        serving_version=model.serving_version)
    if model.manifest:
        _manifest_info(info, model)
    if model.rollout is not None:
        info.rollout.CopyFrom(rollout_info(model.rollout))
    serving = model.serving
    if serving:
        info.max_batch_size = serving.max_batch_size
        info.max_delay_ms = serving.max_delay_ms
        info.latency_target_ms = serving.latency_target_ms
        if serving.batch_curve is not None:
            info.autotuned = serving.batch_curve.autotuned
            info.batch_curve.extend(pb.BatchPoint(batch_size=p.batch_size, images_per_second=p.images_per_second,
                                                  batch_ms=p.batch_s * 1000.0) for p in serving.batch_curve.points)
        if serving.batch_tuning is not None:
            _tuning_info(info, serving.batch_tuning)
        info.precision = serving.precision
        info.precision_note = serving.precision_note
        info.runtime = serving.runtime
        info.loaded_bytes = serving.loaded_bytes
        if serving.runtime_choice is not None:
            info.runtime_reason = serving.runtime_choice.reason
            info.runtime_speeds.extend(pb.RuntimeSpeed(runtime=s.runtime, batch_size=s.batch_size,
                                                       images_per_second=s.images_per_second)
                                       for s in serving.runtime_choice.speeds)
    return info


def _manifest_info(info: pb.ModelInfo, model: ModelDescription) -> None:
    manifest = model.manifest
    assert manifest is not None
    spec = manifest.input
    info.num_labels = manifest.num_classes
    info.input.CopyFrom(pb.InputSpec(height=spec.height, width=spec.width, channels=spec.channels, color=spec.color,
                                     mean=spec.mean, std=spec.std, resize=spec.resize, crop=spec.crop,
                                     interpolation=spec.interpolation, resolved_from=spec.resolved_from))
    info.is_default = manifest.is_default
    info.architecture = manifest.architecture
    info.default_top_k = manifest.top_k
    info.activation = manifest.activation
    info.channels_last = manifest.channels_last
    info.languages.extend(manifest.translations)
    info.precision = manifest.precision
    info.runtime = manifest.runtime
    if manifest.tiling:
        t = manifest.tiling
        info.tiling.CopyFrom(pb.Tiling(tile_height=t.tile[0], tile_width=t.tile[1], stride_y=t.stride[0],
                                       stride_x=t.stride[1], reduce=t.reduce, max_tiles=t.max_tiles))


def version_info(entry: VersionDescription) -> pb.VersionInfo:
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
             VersionState.FAILED: pb.ModelEvent.FAILED, VersionState.UNLOADING: pb.ModelEvent.READY,
             VersionState.AVAILABLE: pb.ModelEvent.AVAILABLE, VersionState.CANDIDATE: pb.ModelEvent.CANDIDATE,
             VersionState.REJECTED: pb.ModelEvent.REJECTED}
    now = round(time.time() * 1000)
    return [pb.ModelEvent(model=record.name, version=v.version, kind=kinds[v.state], reason=v.error,
                          time_unix_ms=now, serving=serving is v)
            for v in sorted(record.versions.values(), key=lambda v: v.version)]


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """classifier.v1.Classifier, translating to :class:`ClassifierService` calls. A ClassifyStream holds at most
    ``stream_in_flight`` requests at once (``--max-stream-in-flight``)."""

    def __init__(self, service: ClassifierService, manager: ModelManager,
                 on_request: RequestObserver | None = None, *, stream_in_flight: int = MAX_STREAM_IN_FLIGHT,
                 reload_min_interval_s: float = DEFAULT_RELOAD_MIN_INTERVAL_S,
                 control: ModelControl | None = None) -> None:
        self._service = service
        self._manager = manager
        self._control = control or ModelControl(manager)
        self._reloads = Reloads(partial(manager.reconcile, force=True), reload_min_interval_s)
        self._requests = RequestBook(on_request)
        self._stream_in_flight = stream_in_flight

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        ticket = self._ticket(request, context, CLASSIFY_SPAN)
        result = await ticket.track_result(self._classify(request, deadline_of(context), ticket),
                                           outcome_in(context))
        mark_serving_process(context)
        return response_from_result(result, ticket.request_id)

    def _ticket(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, span_name: str) -> Ticket:
        return self._requests.open(request.request_id, request.model, request.version, name=span_name,
                                   carrier=context.invocation_metadata)

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None, ticket: Ticket) -> ClassifyResult:
        return await self._service.classify(call_from_request(request, deadline, ticket.request_id))

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyResponse]:
        """Requests are computed concurrently; responses go out as they complete (order not kept). With
        ``stream_in_flight`` requests held, the stream is read no further until the client reads an answer."""
        async for response in answer_concurrently(request_iterator,
                                                  lambda r: self._stream_answer(r, deadline_of(context), context),
                                                  self._stream_in_flight):
            yield response

    async def _stream_answer(self, request: pb.ClassifyRequest, deadline: float | None,
                             context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        ticket = self._ticket(request, context, STREAM_SPAN)
        try:
            result = await ticket.track_result(self._classify(request, deadline, ticket), stream_outcome)
        except Exception as exc:  # noqa: BLE001 - logged there when unexpected; the stream goes on
            code, message = failure_status(exc, STREAM_SPAN)
            return pb.ClassifyResponse(request_id=ticket.request_id, error=pb.Error(code=code.value[0],
                                                                                   message=message))
        return response_from_result(result, ticket.request_id)

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
        """Load the model's versions from disk again, or a model directory not loaded yet. Operators only (the
        model-control rule: server/edges/grpc/security.py); concurrent calls share one reload, and a model reloads
        at most once per ``--reload-min-interval-seconds`` (RESOURCE_EXHAUSTED: :class:`Reloads`)."""
        name = request.model or self._manager.get("").name
        check_model_name(name)
        self._control.check_reload(name)
        try:
            present = await asyncio.to_thread(model_present, self._manager.settings.models_dir, name)
        except OSError as exc:  # the repository is unreachable (renamed away, NFS): retryable, not the caller's fault
            raise errors.ModelUnavailable(f"cannot reload model {name}: the model repository cannot be read "
                                          f"({exc.strerror or exc})") from exc
        if not present:
            self._manager.get(name)  # raises NOT_FOUND for an unknown model
        await self._reloads.reload(name)
        return model_info(self._manager.get(name), str(self._manager.settings.device))

    async def PromoteVersion(self, request: pb.PromoteVersionRequest,
                             context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Promote the model's rollout candidate now; operators only (server/edges/grpc/rollout.py)."""
        return model_info(await promote(self._manager, request), str(self._manager.settings.device))

    async def RejectVersion(self, request: pb.RejectVersionRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Reject the model's candidate, or roll back its serving version; operators only."""
        return model_info(await reject(self._manager, request), str(self._manager.settings.device))

    async def RollbackModel(self, request: pb.RollbackModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Reject the serving version so that the previous one serves; operators only."""
        return model_info(await rollback(self._manager, request), str(self._manager.settings.device))

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Load a model of the catalogue (--model-control explicit); operators only. Returns once it is loaded."""
        return model_info(await self._control.load(request.model), str(self._manager.settings.device))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """Unload a model once its requests in flight are answered; operators only."""
        return model_info(await self._control.unload(request.model), str(self._manager.settings.device))


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

    async def set_overall(self, serving: bool, *, for_good: bool = True) -> None:
        """SERVING once the daemon serves; NOT_SERVING while the repository loads (``for_good=False``: each
        model still turns SERVING as it becomes ready) and when it begins to stop: then the server and every
        model report NOT_SERVING for good (model events that follow change nothing), and Watch streams are
        told so."""
        if serving:
            await self._servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        elif for_good:
            await self._servicer.enter_graceful_shutdown()
        else:
            await self._servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

