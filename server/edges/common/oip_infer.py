"""The Open Inference Protocol on classifyd's service: one flow behind both bindings.

An inference request is answered in this order on gRPC and REST alike: the version string is parsed, the model
and version are resolved (so a bad tensor sent to a missing model is NOT_FOUND), the binding's wire form is read
into an :class:`InferRequest`, its input, outputs and parameters are checked (:mod:`oip_codec`), and every image
becomes one classify call, submitted together so they share batches with each other and all other traffic. The
request is reported once to the request observer (:class:`Ticket`). Readiness and model metadata share the same
version rule and the one model description.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from server.core import errors
from server.core.config import MAX_IMAGES_PER_REQUEST
from server.core.manifest import TilingSpec
from server.core.types import ClassifyCall, ClassifyResult
from server.edges.common.describe import describe_model
from server.edges.common.oip_codec import (
    BYTES,
    InferRequest,
    InferTensor,
    ModelMetadata,
    OutputTensor,
    build_output,
    checked_input,
    decode_input,
    image_count,
    is_large,
    model_metadata,
    parse_classification,
    parse_timeout,
    parse_version,
)
from server.edges.common.requests import (
    Outcome,
    Ticket,
    classify_within,
    deadline_after,
    earliest,
    off_loop_if,
    outcome_of,
)
from server.inference.preprocess import tile_count
from server.models.manager import ModelManager
from server.service import ClassifierService


@dataclass(frozen=True)
class InferAnswer:
    """What a binding renders: the model and version that computed the request, and its one output."""

    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: Any
    """The request's ``id``, to echo."""
    result: ClassifyResult
    """The first image's result: the one the request's report is timed from."""
    cache_hit: bool = False
    """Every image was answered from the response cache: the bindings say so in the response's parameters."""
    cold_start: bool = False
    """The model was loaded for the request (``--lazy-load``): the bindings say so in the response's parameters."""


class OipModels:
    """Inference, readiness and metadata over the daemon's service and manager; an inference request holds at most
    ``max_images`` images (``--max-images-per-request``)."""

    def __init__(self, service: ClassifierService, manager: ModelManager,
                 max_images: int = MAX_IMAGES_PER_REQUEST) -> None:
        self._service = service
        self._manager = manager
        self._max_images = max_images

    def ready(self, name: str, version_text: str) -> bool:
        """Whether the version (or, with none named, the serving version) can compute.

        Raises ModelNotFound for an unknown model (each binding answers that its own way), InvalidInput for a bad
        version string.
        """
        version = parse_version(version_text)
        self._manager.get(name)
        try:
            self._manager.resolve(name, version)
        except (errors.ModelNotFound, errors.ModelUnavailable):
            return False
        return True

    def metadata(self, name: str, version_text: str) -> ModelMetadata:
        """Raises InvalidInput for a bad version string, ModelNotFound, or ModelUnavailable when no manifest parsed."""
        version = parse_version(version_text)
        return model_metadata(describe_model(self._manager.get(name)), version)

    async def infer(self, ticket: Ticket, version_text: str, read: Callable[[], Awaitable[InferRequest]],
                    deadline: float | None, outcome: Outcome = outcome_of) -> InferAnswer:
        """:meth:`answer`, reported on ``ticket`` (``outcome`` names the status of what it raised)."""
        return await ticket.track(self.answer(ticket, version_text, read, deadline), _result, outcome)

    async def answer(self, ticket: Ticket, version_text: str, read: Callable[[], Awaitable[InferRequest]],
                     deadline: float | None) -> InferAnswer:
        """Answer the request for ``ticket.model`` that ``read`` returns once the model and version are resolved.

        ``deadline`` is the transport's (None: none); the request's ``timeout`` parameter may shorten it. Raises
        the domain errors of the request, the first failed image's (prefixed with its position) included.
        """
        ticket.version = parse_version(version_text)
        # NOT_FOUND / UNAVAILABLE before any tensor; a model not loaded is loaded first with --lazy-load
        loaded, cold = await self._service.resolve(ticket.model, ticket.version, deadline)
        labels = len(loaded.labels)
        request = await read()
        tensor = checked_input(request.inputs, self._max_images)  # the cost bound, before anything is copied
        _check_tiles(tensor, loaded.manifest.tiling, self._max_images)
        payloads = await off_loop_if(is_large(tensor), decode_input, tensor)
        classification = parse_classification(request.outputs, labels)
        timeout_s = parse_timeout(request.parameters)
        deadline = earliest(deadline, deadline_after(timeout_s))
        calls = [ClassifyCall(ticket.model, payload, ticket.version, classification or labels, deadline,
                              request_id=ticket.request_id) for payload in payloads.images]
        outcomes = await asyncio.gather(*(classify_within(self._service, c, timeout_s) for c in calls),
                                        return_exceptions=True)
        for position, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                raise _with_position(outcome, position, len(outcomes))
        results: list[ClassifyResult] = list(outcomes)  # type: ignore[arg-type]
        output = build_output(results, classification, labels, payloads.batched,
                              multi_label=loaded.manifest.activation == "sigmoid")
        first = replace(results[0], cold_start=True) if cold else results[0]  # the request log reports it
        return InferAnswer(first.model, str(max(r.version for r in results)), [output], request.id, first,
                           cache_hit=all(r.cache_hit for r in results),
                           cold_start=cold or any(r.cold_start for r in results))


def _check_tiles(tensor: InferTensor, tiling: TilingSpec | None, max_images: int) -> None:
    """For a tiling model, the images of a pixel tensor count as their tiles, known from its shape by arithmetic.
    An encoded image counts once (its size is known only once decoded; its tiles are capped by ``max_tiles``).
    Raises InvalidInput past ``max_images``."""
    if tiling is None or tensor.datatype == BYTES:
        return
    shape = tensor.shape
    height, width = shape[1:3] if len(shape) == 4 else shape[:2]
    tiles = image_count(tensor) * tile_count(width, height, tiling)
    if tiles > max_images:
        raise errors.InvalidInput(f"the request's {image_count(tensor)} image(s) of {width}x{height} pixels give "
                                  f"{tiles} tiles of {tiling.tile[1]}x{tiling.tile[0]}, more than the limit of "
                                  f"{max_images} images (tiles included) per request")


def _result(answer: InferAnswer) -> ClassifyResult:
    return answer.result


def _with_position(exc: BaseException, position: int, count: int) -> BaseException:
    """The error of one image; for a batch, its message says which image it was."""
    if count == 1 or not isinstance(exc, errors.ClassifydError):
        return exc
    return type(exc)(f"image {position} of the batch of {count}: {exc}")
