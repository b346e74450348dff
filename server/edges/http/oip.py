"""The Open Inference Protocol's REST form (KServe v2, as Triton serves it), on the same service and batchers.

Each model has one input and one output:

- input ``image`` (any name is accepted): ``BYTES`` of shape ``[N]`` holding encoded images, base64 in JSON
  (Triton's convention for JSON BYTES) or raw with the binary tensor extension; or a ``UINT8`` / ``FP32`` pixel
  tensor of shape ``[N, H, W, C]``, or ``[H, W, C]`` / ``[H, W]`` for one image (FP32 in 0..1).
- output ``probabilities``: ``FP32`` ``[N, num_labels]``; with the ``classification`` parameter ``k``, ``BYTES``
  ``[N, k]`` of ``"score:index:label"`` strings, best first.

Every image of a request is classified as its own call, so they batch with all other traffic. Answers are JSON
(binary outputs are not produced; clients read JSON data whatever they asked for). Errors are
``{"error": message}`` as the protocol says, with the same HTTP codes as ``/v1``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from server.core import errors
from server.core.lifecycle import VersionState
from server.core.types import ClassifyCall, ClassifyResult, RawTensor
from server.edges.common.oip_codec import split_bytes_elements
from server.edges.http.classify import (
    CONTEXT,
    classify,
    deadline_after,
    decode_b64,
    dumps,
    parse_json,
    read_body,
    timeout_field,
)
from server.models.manager import ModelRecord, VersionRecord

INPUT = "image"
OUTPUT = "probabilities"
_NUMERIC = {"UINT8": ("uint8", np.dtype("<u1")), "FP32": ("float32", np.dtype("<f4"))}
Payload = bytes | RawTensor


# ----- reading an inference request


async def read_infer_body(request: web.Request, limit: int) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary data after it (binary tensor extension). Raises InvalidInput or 413."""
    body = await read_body(request, limit)
    header = request.headers.get("Inference-Header-Content-Length")
    size = len(body)
    if header is not None:
        if not header.isdigit() or int(header) > len(body):
            raise errors.InvalidInput(f"Inference-Header-Content-Length {header!r} does not fit a body of "
                                      f"{len(body)} bytes")
        size = int(header)
    document = parse_json(body[:size])
    if not isinstance(document, dict):
        raise errors.InvalidInput("inference request must be a JSON object with 'inputs'")
    return document, body[size:]


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [leaf for item in data for leaf in _flatten(item)]


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise errors.InvalidInput(f"input shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _image_payloads(shape: list[int], data: Any, raw: bytes | None) -> list[Payload]:
    """BYTES input: one encoded image per element, batched along the first dimension."""
    count = int(np.prod(shape, dtype=np.int64))
    if raw is not None:
        images = split_bytes_elements(raw)
    else:
        images = [decode_b64(item, f"BYTES element {n}") for n, item in enumerate(_flatten(data))]
    if len(images) != count:
        raise errors.InvalidInput(f"input of shape {shape} needs {count} element(s), got {len(images)}")
    if count == 0:
        raise errors.InvalidInput("the input holds no image")
    return list(images)


def _tensor_payloads(datatype: str, shape: list[int], data: Any, raw: bytes | None) -> tuple[list[Payload], bool]:
    """UINT8 / FP32 pixels: ``[N, H, W, C]`` is a batch, ``[H, W, C]`` or ``[H, W]`` one image."""
    if len(shape) not in (2, 3, 4):
        raise errors.InvalidInput(f"{datatype} input shape must be [N, H, W, C], [H, W, C] or [H, W], got {shape}")
    name, dtype = _NUMERIC[datatype]
    count = int(np.prod(shape, dtype=np.int64))
    if raw is None:
        try:
            raw = np.asarray(_flatten(data), dtype=dtype).tobytes()
        except (TypeError, ValueError, OverflowError) as exc:
            raise errors.InvalidInput(f"{datatype} input data is not a list of {datatype} numbers: {exc}") from None
    if len(raw) != count * dtype.itemsize:
        raise errors.InvalidInput(f"{datatype} input of shape {shape} needs {count} values "
                                  f"({count * dtype.itemsize} bytes), got {len(raw) // dtype.itemsize}")
    batched = len(shape) == 4
    item_shape = tuple(shape[1:] if batched else shape)
    items = shape[0] if batched else 1
    step = len(raw) // items if items else 0
    if items == 0:
        raise errors.InvalidInput("the input holds no image")
    return [RawTensor(name, item_shape, raw[n * step:(n + 1) * step]) for n in range(items)], batched


def parse_inputs(document: dict[str, Any], binary: bytes) -> tuple[list[Payload], bool]:
    """The request's images, and whether the input had a batch dimension. Raises InvalidInput."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise errors.InvalidInput(f"'inputs' must hold exactly one tensor (the images, named {INPUT!r})")
    tensor = inputs[0]
    shape, datatype = _shape(tensor), tensor.get("datatype")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or size != len(binary)):
        raise errors.InvalidInput(f"binary_data_size {size!r} does not match the {len(binary)} binary bytes sent")
    raw = binary if size is not None else None
    if raw is None and "data" not in tensor:
        raise errors.InvalidInput("the input has neither 'data' nor binary data (binary_data_size)")
    if datatype == "BYTES":
        return _image_payloads(shape, tensor.get("data"), raw), True
    if datatype in _NUMERIC:
        return _tensor_payloads(datatype, shape, tensor.get("data"), raw)
    raise errors.InvalidInput(f"input datatype must be BYTES (encoded images), UINT8 or FP32, got {datatype!r}")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int  # 0: the probabilities; k > 0: the top k as strings


def parse_outputs(document: dict[str, Any], num_labels: int) -> list[RequestedOutput]:
    """The outputs asked for (all of them when none is named). Raises InvalidInput."""
    outputs = document.get("outputs")
    if outputs is None:
        return [RequestedOutput(OUTPUT, 0)]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise errors.InvalidInput("'outputs' must be a list of objects")
    requested = []
    for output in outputs:
        if output.get("name") != OUTPUT:
            raise errors.InvalidInput(f"unknown output {output.get('name')!r}; the model's output is {OUTPUT!r}")
        k = (output.get("parameters") or {}).get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_labels:
            raise errors.InvalidInput(f"classification must be an integer from 1 to the {num_labels} labels, "
                                      f"got {k!r}")
        requested.append(RequestedOutput(OUTPUT, k))
    return requested


# ----- answering


def output_json(output: RequestedOutput, results: list[ClassifyResult], num_labels: int,
                batched: bool) -> dict[str, Any]:
    """One output tensor, JSON data, row-major."""
    if output.classification:
        k = output.classification
        data: list[Any] = [f"{p.score:f}:{p.index}:{p.label}" for r in results for p in r.predictions[:k]]
        datatype, width = "BYTES", k
    else:
        rows = np.zeros((len(results), num_labels), dtype=np.float32)
        for row, result in zip(rows, results, strict=True):
            for p in result.predictions:
                if p.index < num_labels:
                    row[p.index] = p.score
        data, datatype, width = rows.ravel().tolist(), "FP32", num_labels
    shape = [len(results), width] if batched else [width]
    return {"name": output.name, "datatype": datatype, "shape": shape, "data": data}


def _version(request: web.Request) -> int:
    text = request.match_info.get("version")
    if text is None:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise errors.InvalidInput(f"model version must be a positive integer, got {text!r}")
    return int(text)


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}[/versions/{version}]/infer."""
    context = request.app[CONTEXT]
    name, version = request.match_info["model"], _version(request)
    document, binary = await read_infer_body(request, context.max_body_bytes)
    payloads, batched = parse_inputs(document, binary)
    num_labels = len(context.manager.resolve(name, version).labels)  # NOT_FOUND / UNAVAILABLE before any work
    outputs = parse_outputs(document, num_labels)
    parameters = document.get("parameters") or {}
    timeout_s = timeout_field(parameters if isinstance(parameters, dict) else {}, "timeout", 1e-6)  # Triton: µs
    deadline = deadline_after(timeout_s)
    calls = [ClassifyCall(name, payload, version, num_labels, deadline) for payload in payloads]
    answers = await asyncio.gather(*(classify(context.service, c, timeout_s) for c in calls), return_exceptions=True)
    failed = [a for a in answers if isinstance(a, BaseException)]
    if failed:
        raise failed[0]
    results = [a for a in answers if isinstance(a, ClassifyResult)]
    body: dict[str, Any] = {"model_name": results[0].model, "model_version": str(max(r.version for r in results)),
                            "outputs": [output_json(o, results, num_labels, batched) for o in outputs]}
    if "id" in document:
        body["id"] = document["id"]
    return web.json_response(body, dumps=dumps)


# ----- health and metadata


def _ready(ready: bool, **fields: Any) -> web.Response:
    # The protocol: 200 means true, a 4xx means false.
    return web.json_response({**fields, "ready": ready}, status=200 if ready else 400)


def _version_record(record: ModelRecord, version: int) -> VersionRecord | None:
    return record.serving() if version == 0 else record.versions.get(version)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def server_ready(request: web.Request) -> web.Response:
    return _ready(request.app[CONTEXT].serving)


async def model_ready(request: web.Request) -> web.Response:
    record = request.app[CONTEXT].manager.get(request.match_info["model"])
    entry = _version_record(record, _version(request))
    return _ready(entry is not None and entry.state is VersionState.READY and entry.loaded is not None,
                  name=record.name)


async def server_metadata(request: web.Request) -> web.Response:
    info = request.app[CONTEXT].server_info()
    return web.json_response({"name": "classifyd", "version": info["version"],
                              "extensions": ["classification", "binary_tensor_data"]})


async def model_metadata(request: web.Request) -> web.Response:
    """The model's name, ready versions, and its input and output tensors."""
    record = request.app[CONTEXT].manager.get(request.match_info["model"])
    version = _version(request)
    entry = _version_record(record, version)
    if version and entry is None:
        raise errors.ModelNotFound(f"model {record.name} has no version {version}")
    manifest = entry.manifest if entry and entry.manifest else record.latest_manifest()
    labels = manifest.num_classes if manifest else -1
    ready = sorted((v.version for v in record.versions.values() if v.state is VersionState.READY), reverse=True)
    return web.json_response({
        "name": record.name,
        "versions": [str(v) for v in ([version] if version else ready)],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, labels]}],
    }, dumps=dumps)


def add_oip_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v2/health/live", live)
    router.add_get("/v2/health/ready", server_ready)
    router.add_get("/v2", server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_get(prefix, model_metadata)
        router.add_get(f"{prefix}/ready", model_ready)
        router.add_post(f"{prefix}/infer", infer)

