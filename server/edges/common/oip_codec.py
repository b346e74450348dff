"""Open Inference Protocol tensors <-> classifyd inputs and results (the gRPC binding).

Pure translation, no gRPC and no torch. Every model has one input and one output, named as in
the REST binding:

- input ``image`` (any name is accepted; the datatype decides): ``BYTES`` of shape ``[N]`` holding
  encoded images, or ``UINT8`` / ``FP32`` pixels of shape ``[N, H, W, C]``, or ``[H, W, C]`` /
  ``[H, W]`` for one image.
- output ``probabilities``: ``FP32`` ``[N, labels]``; with the ``classification`` parameter ``k``,
  ``BYTES`` ``[N, k]`` of ``"score:index:label"`` strings, best first. A single unbatched image
  gives ``[labels]`` / ``[k]``.

Every malformed tensor raises :class:`server.core.errors.InvalidInput` saying what was wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from inference import grpc_service_pb2 as oip

from server.core.errors import InvalidInput, ModelUnavailable
from server.core.types import ClassifyResult, RawTensor

INPUT = "image"
OUTPUT = "probabilities"
CLASSIFICATION = "classification"
_PIXEL_DTYPES = {"UINT8": ("uint8", np.dtype("<u1")), "FP32": ("float32", np.dtype("<f4"))}
Payload = bytes | RawTensor


@dataclass(frozen=True)
class Payloads:
    """The images of a request, and whether its input had a batch dimension."""

    images: list[Payload]
    batched: bool


def parse_version(text: str) -> int:
    """``model_version`` as classifyd's version number ('' = 0, the newest). Raises InvalidInput."""
    if not text:
        return 0
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(f"model_version must be a version number or empty, got {text!r}")
    return int(text)


def decode_payloads(request: oip.ModelInferRequest) -> Payloads:
    """One payload per image of the request's single input tensor. Raises InvalidInput."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly one input tensor (the images, named {INPUT!r}); "
                           f"got {len(request.inputs)}: {[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    raw = _raw_contents(request)
    if tensor.datatype == "BYTES":
        return Payloads(_images(tensor, raw), batched=True)
    if tensor.datatype in _PIXEL_DTYPES:
        return _pixels(tensor, raw)
    raise InvalidInput(f"input datatype must be BYTES (encoded images), UINT8 or FP32, "
                       f"got {tensor.datatype or 'none'!r}")


def _raw_contents(request: oip.ModelInferRequest) -> bytes | None:
    if not request.raw_input_contents:
        return None
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                           f"{len(request.inputs)} input(s)")
    return request.raw_input_contents[0]


def _images(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Payload]:
    shape = list(tensor.shape)
    if not shape or shape[0] < 1 or any(d != 1 for d in shape[1:]):
        raise InvalidInput(f"BYTES input must have shape [N] (or [N, 1]) with N >= 1, got {shape}")
    elements = split_bytes_elements(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise InvalidInput(f"input of shape {shape} needs {shape[0]} element(s), got {len(elements)}")
    return list(elements)


def _pixels(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Payloads:
    name, dtype = _PIXEL_DTYPES[tensor.datatype]
    shape = tuple(tensor.shape)
    if len(shape) not in (2, 3, 4) or any(d < 1 for d in shape):
        raise InvalidInput(f"{tensor.datatype} input must have shape [N, H, W, C], [H, W, C] or [H, W], "
                           f"got {list(shape)}")
    data = raw if raw is not None else _typed_contents(tensor, dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"{tensor.datatype} input of shape {list(shape)} needs {count * dtype.itemsize} bytes, "
                           f"got {len(data)}")
    if len(shape) < 4:
        return Payloads([RawTensor(name, shape, data)], batched=False)
    size = len(data) // shape[0]
    return Payloads([RawTensor(name, shape[1:], data[i * size:(i + 1) * size]) for i in range(shape[0])], True)


def _typed_contents(tensor: oip.ModelInferRequest.InferInputTensor, dtype: np.dtype) -> bytes:
    if dtype.kind == "f":
        return np.asarray(tensor.contents.fp32_contents, dtype=dtype).tobytes()
    values = np.asarray(tensor.contents.uint_contents, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput("UINT8 input has uint_contents values outside 0..255")
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


def parse_classification(request: oip.ModelInferRequest, labels: int) -> int:
    """How many labels the caller wants as strings (0: the probabilities). Raises InvalidInput."""
    if not request.outputs:
        return 0
    if len(request.outputs) > 1 or request.outputs[0].name != OUTPUT:
        raise InvalidInput(f"the model's only output is {OUTPUT!r}; requested {[o.name for o in request.outputs]}")
    parameters = request.outputs[0].parameters
    if CLASSIFICATION not in parameters:
        return 0
    value = parameters[CLASSIFICATION]
    which = value.WhichOneof("parameter_choice")
    k = getattr(value, which) if which in ("int64_param", "uint64_param") else 0
    if not 1 <= k <= labels:
        raise InvalidInput(f"output parameter {CLASSIFICATION!r} must be an integer from 1 to the {labels} labels, "
                           f"got {str(value).strip() or 'nothing'}")
    return k


def build_response(request: oip.ModelInferRequest, results: Sequence[ClassifyResult], classification: int,
                   labels: int, batched: bool) -> oip.ModelInferResponse:
    """The response for the results of the request's images, in the images' order.

    Each result holds the top ``classification`` (or all ``labels``) predictions. Raises ModelUnavailable when a
    swap changed the model's labels while the request was computed.
    """
    width = classification or labels
    if any(len(r.predictions) != width for r in results):
        raise ModelUnavailable("the model's labels changed while this request was computed; send it again")
    response = oip.ModelInferResponse(model_name=results[0].model, id=request.id,
                                      model_version=str(max(r.version for r in results)))
    output = response.outputs.add(name=OUTPUT)
    output.shape.extend([len(results), width] if batched else [width])
    if classification:
        output.datatype = "BYTES"
        strings = [f"{p.score:f}:{p.index}:{p.label}".encode() for r in results for p in r.predictions]
        response.raw_output_contents.append(join_bytes_elements(strings))
    else:
        output.datatype = "FP32"
        rows = np.zeros((len(results), labels), dtype="<f4")
        for row, result in zip(rows, results, strict=True):
            for p in result.predictions:
                row[p.index] = p.score
        response.raw_output_contents.append(rows.tobytes())
    return response
