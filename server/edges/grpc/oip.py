"""The Open Inference Protocol edge: ``inference.GRPCInferenceService`` (KServe v2) on classifyd's port.

Only the wire form lives here: protobuf messages become the neutral requests of
:mod:`server.edges.common.oip_codec` and its outputs become protobuf again; the flow (model first, then tensors,
one classify call per image, one report per request) is :class:`server.edges.common.oip_infer.OipModels`, shared
with the REST binding. Errors of ``ModelInfer`` map to status codes in the daemon's one interceptor
(:func:`server.edges.grpc.common.abort_for`); ``ModelStreamInfer`` reports them per request in
``error_message``. Tensor layouts are in docs/oip.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import numpy as np
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.core import errors
from server.core.config import MAX_IMAGES_PER_REQUEST, MAX_STREAM_IN_FLIGHT
from server.core.types import RequestObserver
from server.edges.common.oip_codec import (
    BYTES,
    CACHE_HIT,
    COLD_START,
    InferRequest,
    InferTensor,
    ModelMetadata,
    OutputTensor,
    RequestedOutput,
    join_bytes_elements,
    require_one_input,
)
from server.edges.common.oip_infer import InferAnswer, OipModels
from server.edges.common.oip_repository import EXTENSIONS as REPOSITORY_EXTENSIONS
from server.edges.common.oip_repository import OipRepository
from server.edges.common.requests import RequestBook
from server.edges.grpc.common import (
    answer_concurrently,
    deadline_of,
    failure_status,
    mark_serving_process,
    outcome_in,
    stream_outcome,
)
from server.edges.grpc.oip_repository import config_message, index_message, statistics_message
from server.edges.grpc.registration import GenericOnly
from server.models.manager import ModelManager
from server.ops.host import package_version
from server.service import ClassifierService

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER_SPAN, STREAM_SPAN = f"{SERVICE_NAME}/ModelInfer", f"{SERVICE_NAME}/ModelStreamInfer"
"""The names of a request's span (server/ops/tracing.py): the method, as OpenTelemetry names gRPC server spans."""
EXTENSIONS = ("classification", *REPOSITORY_EXTENSIONS)
_CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents"}
"""The typed-contents field each accepted datatype is read from."""



class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over :class:`ClassifierService`. ``is_ready`` says whether the server accepts
    requests (false while starting and stopping); ``on_request`` gets one report per inference request. A request
    holds at most ``max_images`` images; a ModelStreamInfer stream at most ``stream_in_flight`` requests at once.
    ``repository`` answers the model-repository extension, ModelConfig and ModelStatistics."""

    def __init__(self, service: ClassifierService, manager: ModelManager, is_ready: Callable[[], bool],
                 on_request: RequestObserver | None = None, *, max_images: int = MAX_IMAGES_PER_REQUEST,
                 stream_in_flight: int = MAX_STREAM_IN_FLIGHT, repository: OipRepository) -> None:
        self._models = OipModels(service, manager, max_images)
        self._repository = repository
        self._is_ready = is_ready
        self._requests = RequestBook(on_request)
        self._stream_in_flight = stream_in_flight

    async def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelReadyResponse:
        """Ready when the version (or, with none named, the serving one) can compute; unknown models are not ready."""
        try:
            ready = self._models.ready(request.name, request.version)
        except errors.ModelNotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=ready and self._is_ready())

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="classifyd", version=package_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelMetadataResponse:
        """Raises ModelNotFound for an unknown model or version, ModelUnavailable when no manifest parsed."""
        return metadata_message(self._models.metadata(request.name, request.version))

    async def ModelConfig(self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelConfigResponse:
        return config_message(self._repository.config(request.name, request.version))

    async def ModelStatistics(self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelStatisticsResponse:
        return statistics_message(self._repository.statistics(request.name, request.version))

    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext) \
            -> oip.RepositoryIndexResponse:
        return index_message(self._repository.index(request.repository_name, request.ready))

    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> oip.RepositoryModelLoadResponse:
        """An operator's call (security.ADMIN_METHODS); returns once the model is loaded."""
        await self._repository.load(request.model_name, request.repository_name, parameters(request.parameters))
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: oip.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> oip.RepositoryModelUnloadResponse:
        """An operator's call; returns once the model's in-flight requests are answered and it is released."""
        await self._repository.unload(request.model_name, request.repository_name, parameters(request.parameters))
        return oip.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelInferResponse:
        ticket = self._requests.open(request.id, request.model_name, name=INFER_SPAN,
                                     carrier=context.invocation_metadata)
        answer = await self._models.infer(ticket, request.model_version, lambda: infer_request(request),
                                          deadline_of(context), outcome_in(context))
        mark_serving_process(context)
        return response_message(answer)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[oip.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests are computed concurrently; responses go out as they complete (match them by id). With
        ``stream_in_flight`` requests held, the stream is read no further until the client reads an answer."""
        async for response in answer_concurrently(request_iterator,
                                                  lambda r: self._stream_answer(r, deadline_of(context), context),
                                                  self._stream_in_flight):
            yield response

    async def _stream_answer(self, request: oip.ModelInferRequest, deadline: float | None,
                             context: grpc.aio.ServicerContext) -> oip.ModelStreamInferResponse:
        ticket = self._requests.open(request.id, request.model_name, name=STREAM_SPAN,
                                     carrier=context.invocation_metadata)
        try:
            answer = await self._models.infer(ticket, request.model_version, lambda: infer_request(request),
                                              deadline, stream_outcome)
        except Exception as exc:  # noqa: BLE001 - logged there when unexpected; the stream goes on
            code, message = failure_status(exc, STREAM_SPAN)
            return oip.ModelStreamInferResponse(error_message=f"{code.name}: {message}",
                                                infer_response=oip.ModelInferResponse(id=request.id))
        return oip.ModelStreamInferResponse(infer_response=response_message(answer))


# ----- protobuf <-> the neutral request and answer


async def infer_request(request: oip.ModelInferRequest) -> InferRequest:
    """The request without its protobuf. Raises InvalidInput unless it has one input with as many
    ``raw_input_contents`` (or none)."""
    require_one_input([t.name for t in request.inputs])
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise errors.InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s)")
    inputs = [_tensor(tensor, raw[n] if raw else None) for n, tensor in enumerate(request.inputs)]
    outputs = [RequestedOutput(o.name, parameters(o.parameters)) for o in request.outputs]
    return InferRequest(inputs, outputs, parameters(request.parameters), request.id)


def _tensor(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InferTensor:
    # The repeated field itself, not a list of it: its length is known without copying millions of elements, and
    # the codec counts the images before it copies anything.
    field = _CONTENTS.get(tensor.datatype)
    contents = getattr(tensor.contents, field) if field and raw is None else None
    return InferTensor(tensor.name, tensor.datatype, tuple(tensor.shape), contents, raw)


def parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """Protobuf parameters (InferParameter, ModelRepositoryParameter) as plain values; a parameter with no value set
    is left out (as JSON null is)."""
    plain = {}
    for name, value in values.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            plain[name] = getattr(value, which)
    return plain


def response_message(answer: InferAnswer) -> oip.ModelInferResponse:
    """The answer as protobuf: outputs always in ``raw_output_contents``, as Triton sends them."""
    response = oip.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version,
                                      id=answer.id)
    for output in answer.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(_raw(output))
    if answer.cache_hit:
        response.parameters[CACHE_HIT].bool_param = True
    if answer.cold_start:
        response.parameters[COLD_START].bool_param = True
    return response


def _raw(output: OutputTensor) -> bytes:
    if output.datatype == BYTES:
        return join_bytes_elements([str(s).encode() for s in output.data])
    return np.asarray(output.data, dtype="<f4").tobytes()


def metadata_message(model: ModelMetadata) -> oip.ModelMetadataResponse:
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=model.name, versions=model.versions, platform=model.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in model.outputs])


def add_to_server(servicer: OipServicer, server: grpc.aio.Server | GenericOnly) -> str:
    """Register the servicer; returns the service's full name (for reflection)."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return SERVICE_NAME
