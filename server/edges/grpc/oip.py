"""The Open Inference Protocol edge: ``inference.GRPCInferenceService`` (KServe v2) on classifyd's port.

Translates to the same :class:`ClassifierService` as ``classifier.v1``: the
same batchers, versions, deadlines and errors. Each image of a request
becomes one classify call, so the images of one request (and of concurrent
requests) are batched together. Errors of ``ModelInfer`` map to status codes
in :class:`server.edges.grpc.classifier.ErrorInterceptor`; ``ModelStreamInfer`` reports
them per request in ``error_message``. Tensor layouts are in
:mod:`server.edges.common.oip_codec` and docs/oip.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from importlib import metadata

import grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.core import errors
from server.core.lifecycle import VersionState
from server.core.types import ClassifyCall, ClassifyResult
from server.edges.common.oip_codec import (
    INPUT,
    OUTPUT,
    build_response,
    decode_payloads,
    parse_classification,
    parse_version,
)
from server.edges.grpc.classifier import _deadline, answer_concurrently, status_for
from server.models.manager import ModelManager
from server.service import ClassifierService

log = logging.getLogger("classifyd.oip")
SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("classification",)
PID_METADATA = "classifyd-pid"


def server_version() -> str:
    try:
        return metadata.version("classifyd")
    except metadata.PackageNotFoundError:
        return "unknown"


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over :class:`ClassifierService`. ``is_ready`` says whether the server accepts
    requests (false while starting and stopping)."""

    def __init__(self, service: ClassifierService, manager: ModelManager, is_ready: Callable[[], bool]) -> None:
        self._service = service
        self._manager = manager
        self._is_ready = is_ready

    async def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelReadyResponse:
        """Ready when the version (or, with none named, the newest) can compute; unknown models are not ready."""
        version = parse_version(request.version)
        try:
            self._manager.resolve(request.name, version)
        except (errors.ModelNotFound, errors.ModelUnavailable):
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext) \
            -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="classifyd", version=server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelMetadataResponse:
        """Raises ModelNotFound for an unknown model or version, ModelUnavailable when no manifest parsed."""
        return model_metadata(self._manager, request.name, parse_version(request.version))

    async def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) \
            -> oip.ModelInferResponse:
        response = await self._infer(request, _deadline(context))
        context.set_trailing_metadata(((PID_METADATA, str(os.getpid())),))
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[oip.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests are computed concurrently; responses go out as they complete (match them by id)."""
        async for response in answer_concurrently(request_iterator,
                                                  lambda r: self._stream_answer(r, _deadline(context))):
            yield response

    async def _stream_answer(self, request: oip.ModelInferRequest, deadline: float | None) \
            -> oip.ModelStreamInferResponse:
        try:
            response = await self._infer(request, deadline)
        except Exception as exc:
            if not isinstance(exc, errors.ClassifydError):
                log.exception("unexpected error in ModelStreamInfer")
            code, message = status_for(exc)
            return oip.ModelStreamInferResponse(error_message=f"{code.name}: {message}",
                                                infer_response=oip.ModelInferResponse(id=request.id))
        return oip.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: oip.ModelInferRequest, deadline: float | None) -> oip.ModelInferResponse:
        """Classify every image of the request. Raises the first image's error (prefixed with its position)."""
        version = parse_version(request.model_version)
        labels = len(self._manager.resolve(request.model_name, version).labels)  # NOT_FOUND/UNAVAILABLE first
        payloads = decode_payloads(request)
        classification = parse_classification(request, labels)
        calls = [ClassifyCall(request.model_name, p, version, classification or labels, deadline)
                 for p in payloads.images]
        outcomes = await asyncio.gather(*(self._service.classify(c) for c in calls), return_exceptions=True)
        for position, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                raise _with_position(outcome, position, len(outcomes))
        results: list[ClassifyResult] = list(outcomes)  # type: ignore[arg-type]
        return build_response(request, results, classification, labels, payloads.batched)


def _with_position(exc: BaseException, position: int, count: int) -> BaseException:
    """The error of one image; for a batch, its message says which image it was."""
    if count == 1 or not isinstance(exc, errors.ClassifydError):
        return exc
    return type(exc)(f"image {position} of the batch of {count}: {exc}")


def model_metadata(manager: ModelManager, name: str, version: int) -> oip.ModelMetadataResponse:
    """Versions, inputs and outputs of a model. Raises ModelNotFound or ModelUnavailable."""
    record = manager.get(name)
    if version and version not in record.versions:
        raise errors.ModelNotFound(f"model {record.name} has no version {version}")
    manifest = record.versions[version].manifest if version else record.latest_manifest()
    if manifest is None:
        raise errors.ModelUnavailable(f"model {record.name}: no version has a valid manifest")
    ready = sorted((v.version for v in record.versions.values() if v.state is VersionState.READY), reverse=True)
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=record.name,
        versions=[str(v) for v in ([version] if version else ready)],
        platform="pytorch",
        inputs=[tensor(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, manifest.num_classes])],
    )


def add_to_server(servicer: OipServicer, server: grpc.aio.Server) -> str:
    """Register the servicer; returns the service's full name (for reflection)."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return SERVICE_NAME
