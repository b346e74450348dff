"""Open Inference Protocol tensors <-> classifyd inputs and results.

Pure translation, no gRPC and no torch: a ``ModelInferRequest``'s one input
tensor becomes one payload per image (encoded bytes or a :class:`RawTensor`),
and the results of those images become the response's output tensors. Every
malformed tensor raises :class:`server.errors.InvalidInput` saying what was
wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from inference import grpc_service_pb2 as oip

from server.errors import InvalidInput, ModelUnavailable
from server.preprocess import RawTensor
from server.service import ClassifyResult

INPUT_IMAGE = "IMAGE"  # BYTES [N]: encoded images (JPEG, PNG, ...)
INPUT_PIXELS = "PIXELS"  # UINT8 or FP32 [H, W], [H, W, C] or [N, H, W, C]
OUTPUT = "PROBABILITIES"  # FP32 [N, labels]; BYTES [N, k] "score:index:label" with the classification parameter
CLASSIFICATION = "classification"
_PIXEL_DTYPES = {"UINT8": ("uint8", np.dtype("<u1")), "FP32": ("float32", np.dtype("<f4"))}


@dataclass(frozen=True)
class OutputRequest:
    """What the caller wants back: the probabilities, or the top ``class_count`` labels as strings."""

    class_count: int = 0


def parse_version(text: str) -> int:
    """``model_version`` as classifyd's version number ('' = 0, the newest). Raises InvalidInput."""
    if not text:
        return 0
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(f"model_version must be a version number or empty, got {text!r}")
    return int(text)


def decode_payloads(request: oip.ModelInferRequest) -> list[bytes | RawTensor]:
    """One payload per image of the request's single input tensor. Raises InvalidInput."""
    if len(request.inputs) != 1:
        names = [t.name for t in request.inputs]
        raise InvalidInput(f"expected exactly one input tensor, {INPUT_IMAGE} (BYTES) or {INPUT_PIXELS} "
                           f"(UINT8/FP32); got {len(names)}: {names}")
    tensor = request.inputs[0]
    raw = _raw_contents(request)
    if tensor.name == INPUT_IMAGE:
        return _images(tensor, raw)
    if tensor.name == INPUT_PIXELS:
        return _pixels(tensor, raw)
    raise InvalidInput(f"unknown input {tensor.name!r}; inputs are {INPUT_IMAGE} (BYTES, encoded images) and "
                       f"{INPUT_PIXELS} (UINT8 or FP32 pixels)")


def _raw_contents(request: oip.ModelInferRequest) -> bytes | None:
    if not request.raw_input_contents:
        return None
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                           f"{len(request.inputs)} input(s)")
    return request.raw_input_contents[0]


def _images(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[bytes | RawTensor]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {INPUT_IMAGE} must be BYTES (encoded images), got {tensor.datatype or 'none'}")
    shape = list(tensor.shape)
    if not shape or shape[0] < 1 or any(d != 1 for d in shape[1:]):
        raise InvalidInput(f"input {INPUT_IMAGE} must have shape [N] (or [N, 1]) with N >= 1, got {shape}")
    elements = split_bytes_elements(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise InvalidInput(f"input {INPUT_IMAGE} of shape {shape} needs {shape[0]} element(s), got {len(elements)}")
    return list(elements)


def _pixels(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[bytes | RawTensor]:
    if tensor.datatype not in _PIXEL_DTYPES:
        raise InvalidInput(f"input {INPUT_PIXELS} must be UINT8 or FP32, got {tensor.datatype or 'none'}")
    name, dtype = _PIXEL_DTYPES[tensor.datatype]
    shape = tuple(tensor.shape)
    if len(shape) not in (2, 3, 4) or any(d < 1 for d in shape):
        raise InvalidInput(f"input {INPUT_PIXELS} must have shape [H, W], [H, W, C] or [N, H, W, C], "
                           f"got {list(shape)}")
    data = raw if raw is not None else _typed_contents(tensor, dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"input {INPUT_PIXELS} of shape {list(shape)} and datatype {tensor.datatype} needs "
                           f"{count * dtype.itemsize} bytes, got {len(data)}")
    if len(shape) < 4:
        return [RawTensor(name, shape, data)]
    size = len(data) // shape[0]
    return [RawTensor(name, shape[1:], data[i * size:(i + 1) * size]) for i in range(shape[0])]


def _typed_contents(tensor: oip.ModelInferRequest.InferInputTensor, dtype: np.dtype) -> bytes:
    if dtype.kind == "f":
        return np.asarray(tensor.contents.fp32_contents, dtype=dtype).tobytes()
    values = np.asarray(tensor.contents.uint_contents, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput(f"input {INPUT_PIXELS} is UINT8 but uint_contents holds values outside 0..255")
    return values.astype(dtype).tobytes()


def split_bytes_elements(raw: bytes) -> list[bytes]:
    """Elements of a raw BYTES tensor: each is a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput("raw BYTES tensor is truncated: an element's 4-byte length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"raw BYTES tensor is truncated: an element of {length} bytes has only "
                               f"{len(raw) - offset}")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def join_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """The raw encoding of a BYTES tensor (see :func:`split_bytes_elements`)."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def parse_outputs(request: oip.ModelInferRequest) -> OutputRequest:
    """The requested outputs (none = the probabilities). Raises InvalidInput."""
    if not request.outputs:
        return OutputRequest()
    if len(request.outputs) > 1 or request.outputs[0].name != OUTPUT:
        names = [o.name for o in request.outputs]
        raise InvalidInput(f"the only output is {OUTPUT}; requested {names}")
    parameters = request.outputs[0].parameters
    if CLASSIFICATION not in parameters:
        return OutputRequest()
    value = parameters[CLASSIFICATION]
    which = value.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param") or getattr(value, which) < 1:
        raise InvalidInput(f"output parameter {CLASSIFICATION!r} must be an integer >= 1 (how many labels), "
                           f"got {value}".strip())
    return OutputRequest(class_count=getattr(value, which))


def build_response(request: oip.ModelInferRequest, results: Sequence[ClassifyResult],
                   wanted: OutputRequest) -> oip.ModelInferResponse:
    """The response for the results of the request's images, in the images' order."""
    response = oip.ModelInferResponse(model_name=results[0].model, id=request.id,
                                      model_version=str(max(r.version for r in results)))
    output = response.outputs.add(name=OUTPUT)
    if wanted.class_count:
        if any(len(r.predictions) != wanted.class_count for r in results):
            raise ModelUnavailable("the model's labels changed while this request was computed; send it again")
        output.datatype = "BYTES"
        output.shape.extend([len(results), wanted.class_count])
        strings = [f"{p.score:f}:{p.index}:{p.label}".encode() for r in results for p in r.predictions]
        response.raw_output_contents.append(join_bytes_elements(strings))
    else:
        rows = [r.probabilities for r in results]
        if any(row is None or len(row) != len(rows[0]) for row in rows):
            raise ModelUnavailable("the model's labels changed while this request was computed; send it again")
        output.datatype = "FP32"
        output.shape.extend([len(rows), len(rows[0])])
        response.raw_output_contents.append(np.stack(rows).astype("<f4").tobytes())
    return response
