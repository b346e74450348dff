"""The Open Inference Protocol's REST form (KServe v2, as Triton serves it), on the same service and batchers.

Only the wire form lives here: the JSON body (with Triton's binary tensor extension) becomes the neutral request
of :mod:`server.edges.common.oip_codec`, and its outputs become JSON again. What a request may hold, the order of
the checks and the answer are the gRPC binding's too (:class:`server.edges.common.oip_infer.OipModels`); the
tensor layouts are in docs/oip.md and docs/http.md. JSON ``BYTES`` elements are base64 (Triton's convention for
binary data in JSON). Answers are JSON (binary outputs are not produced; clients read JSON data whatever they
asked for). Errors are ``{"error": message}`` as the protocol says, with the same HTTP codes as ``/v1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

from aiohttp import web

from server.core import errors
from server.edges.common.oip_codec import (
    BYTES,
    CACHE_HIT,
    COLD_START,
    InferRequest,
    InferTensor,
    OutputTensor,
    RequestedOutput,
    require_one_input,
)
from server.edges.common.oip_infer import InferAnswer
from server.edges.common.oip_repository import EXTENSIONS as REPOSITORY_EXTENSIONS
from server.edges.common.requests import Ticket, off_loop_if
from server.edges.http.bodies import JSON_INLINE_BYTES, BodyTooLarge, parse_json, read_body
from server.edges.http.classify import CONTEXT, HttpContext, decode_b64, dumps, http_outcome

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_LENGTH_DIGITS = 18
"""A longer byte count is refused before ``int()`` sees it (a body has fewer than 10**18 bytes)."""

# ----- reading an inference request


@dataclass(frozen=True)
class InferBody:
    """An inference request's body: its JSON document and the binary data after it (binary tensor extension)."""

    document: dict[str, Any]
    binary: bytes
    size: int
    """The body's length in bytes."""


async def read_infer_body(request: web.Request, context: HttpContext) -> InferBody:
    """The JSON header and the binary data after it. Raises InvalidInput, or 413 for a body over the body limit or
    JSON over the JSON limit (a body that is all JSON is refused before it is read when it says its length)."""
    header = request.headers.get(HEADER_LENGTH)
    if header is None:
        body = await read_body(request, context.json_limit, "JSON body")
        return InferBody(_infer_document(await parse_json(body)), b"", len(body))
    if not (header.isascii() and header.isdigit()) or len(header) > MAX_LENGTH_DIGITS:
        raise errors.InvalidInput(f"{HEADER_LENGTH} must be a byte count, got {header[:40]!r}")
    size = int(header)
    if size > context.json_limit:
        raise BodyTooLarge(f"the JSON header ({HEADER_LENGTH})", context.json_limit, size)
    body = await read_body(request, context.max_body_bytes)
    if size > len(body):
        raise errors.InvalidInput(f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
    return InferBody(_infer_document(await parse_json(body[:size])), body[size:], len(body))


def _infer_document(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise errors.InvalidInput("inference request must be a JSON object with 'inputs'")
    return document


def infer_request(document: dict[str, Any], binary: bytes) -> InferRequest:
    """The request without its JSON. Raises InvalidInput for a body whose structure is not the protocol's."""
    inputs = document.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise errors.InvalidInput("'inputs' must be a list of tensor objects")
    require_one_input([t.get("name") for t in inputs])
    tensors, offset = [], 0
    for tensor in inputs:
        size = _object(tensor.get("parameters"), "an input's 'parameters'").get("binary_data_size")
        raw = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise errors.InvalidInput(f"binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                          "binary bytes left")
            raw, offset = binary[offset:offset + size], offset + size
        tensors.append(_tensor(tensor, raw))
    if offset != len(binary):
        raise errors.InvalidInput(f"{len(binary) - offset} binary bytes are not claimed by any input's "
                                  "binary_data_size")
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise errors.InvalidInput("'outputs' must be a list of objects")
    requested = [RequestedOutput(o.get("name"), _object(o.get("parameters"), "an output's 'parameters'"))
                 for o in outputs]
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise errors.InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    return InferRequest(tensors, requested, _object(document.get("parameters"), "'parameters'"), request_id)


def _object(value: Any, what: str) -> dict[str, Any]:
    """A ``parameters`` object without its null values (a parameter with no value is not given)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


def _tensor(tensor: dict[str, Any], raw: bytes | None) -> InferTensor:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise errors.InvalidInput(f"input shape must be a list of integers, got {str(shape)[:100]}")
    if not all(INT64_MIN <= d <= INT64_MAX for d in shape):
        raise errors.InvalidInput("input shape must be a list of 64-bit integers; a dimension is out of range")
    datatype = tensor.get("datatype")
    datatype = datatype if isinstance(datatype, str) else ""
    contents: Sequence[Any] | None = None
    if raw is None and tensor.get("data") is not None:
        contents = _flatten(tensor["data"])
        if datatype == BYTES:
            contents = Base64Elements(contents)
    return InferTensor(str(tensor.get("name", "")), datatype, tuple(shape), contents, raw)


def _flatten(data: Any) -> list[Any]:
    """Nested arrays as one row-major list, a level per pass (the document's depth is bounded)."""
    if not isinstance(data, list):
        return [data]
    while any(isinstance(item, list) for item in data):
        data = [leaf for item in data for leaf in (item if isinstance(item, list) else (item,))]
    return data


class Base64Elements(Sequence[bytes]):
    """JSON ``BYTES`` elements (base64 strings), decoded only when read: the codec counts them before it reads
    any, so a request of millions of elements is refused without decoding one."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def encoded_bytes(self) -> int:
        """The base64 text's length: what decoding the elements costs (:func:`is_large` weighs this)."""
        return sum(len(item) for item in self._items if isinstance(item, str))

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        """Raises InvalidInput for an element that is not base64."""
        if isinstance(index, slice):
            return [self[n] for n in range(*index.indices(len(self)))]
        return decode_b64(self._items[index], f"BYTES element {index}")


# ----- answering


def output_json(output: OutputTensor) -> dict[str, Any]:
    """One output tensor, JSON data, row-major."""
    data = output.data if isinstance(output.data, list) else output.data.tolist()
    return {"name": output.name, "datatype": output.datatype, "shape": output.shape, "data": data}


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}[/versions/{version}]/infer. Reported to the request observer under its ``id``."""
    context = request.app[CONTEXT]
    ticket = context.requests.open(model=request.match_info["model"], name="POST /v2/models/{name}/infer",
                                   carrier=request.headers)
    answer = await ticket.track(_answer(request, ticket), lambda a: a.result, http_outcome)
    body: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version,
                            "outputs": [output_json(o) for o in answer.outputs]}
    if answer.id is not None:
        body["id"] = answer.id
    flags = {CACHE_HIT: answer.cache_hit, COLD_START: answer.cold_start}
    if any(flags.values()):
        body["parameters"] = {name: True for name, set_ in flags.items() if set_}
    return web.json_response(body, dumps=dumps)


async def _answer(request: web.Request, ticket: Ticket) -> InferAnswer:
    """Read the body (its ``id`` names the request), then the flow both bindings share: model first, then tensors."""
    context = request.app[CONTEXT]
    body = await read_infer_body(request, context)
    if isinstance(body.document.get("id"), str) and body.document["id"]:
        ticket.request_id = body.document["id"]

    async def read() -> InferRequest:  # flattening and decoding a large document takes long: off the loop then
        return await off_loop_if(body.size > JSON_INLINE_BYTES, infer_request, body.document, body.binary)

    return await context.oip.answer(ticket, _version(request), read, None)


# ----- health and metadata


def _ready(ready: bool, **fields: Any) -> web.Response:
    # The protocol: 200 means true, a 4xx means false.
    return web.json_response({**fields, "ready": ready}, status=200 if ready else 400)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    return _ready(context.serving and not context.loading and not context.draining)


async def model_ready(request: web.Request) -> web.Response:
    """Ready when the version (or the serving one) can compute; 404 for an unknown model."""
    name = request.match_info["model"]
    return _ready(request.app[CONTEXT].oip.ready(name, _version(request)), name=name)


async def server_metadata(request: web.Request) -> web.Response:
    info = request.app[CONTEXT].server_info()
    return web.json_response({"name": "classifyd", "version": info["version"],
                              "extensions": ["classification", "binary_tensor_data", *REPOSITORY_EXTENSIONS]})


async def model_metadata(request: web.Request) -> web.Response:
    """The model's name, ready versions, and its input and output tensors."""
    described = request.app[CONTEXT].oip.metadata(request.match_info["model"], _version(request))
    return web.json_response(dataclasses.asdict(described), dumps=dumps)


def add_oip_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v2/health/live", live)
    router.add_get("/v2/health/ready", server_ready)
    router.add_get("/v2", server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_get(prefix, model_metadata)
        router.add_get(f"{prefix}/ready", model_ready)
        router.add_post(f"{prefix}/infer", infer)
