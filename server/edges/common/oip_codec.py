"""The Open Inference Protocol's tensors, for both bindings: neutral requests in, payloads and outputs out.

The gRPC binding (:mod:`server.edges.grpc.oip`) and the REST binding (:mod:`server.edges.http.oip`) only turn their
wire form into the dataclasses below (:class:`InferTensor`, :class:`RequestedOutput`, :class:`InferRequest`) and
render :class:`OutputTensor` back; every rule about what a request may hold is here, once, so both accept and refuse
exactly the same tensors with the same messages. No gRPC, protobuf or HTTP; numpy only.

Every model has one input and one output:

- input ``image`` (any name is accepted; the datatype decides): ``BYTES`` of shape ``[N]`` (or ``[N, 1]``) holding
  encoded images, or ``UINT8`` / ``FP32`` pixels of shape ``[N, H, W, C]``, or ``[H, W, C]`` / ``[H, W]`` for one
  image. Every dimension is at least 1.
- at most ``max_images`` images (``--max-images-per-request``), counted from the shape and the number of elements
  before any element is copied: a request of millions of empty elements costs a comparison, not millions of calls.
- output ``probabilities``: ``FP32`` ``[N, labels]``; with the ``classification`` parameter ``k``, ``BYTES``
  ``[N, k]`` of ``"score:index:label"`` strings, best first. A single unbatched image gives ``[labels]`` / ``[k]``.

Every malformed request raises :class:`server.core.errors.InvalidInput` saying what was wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from server.core.errors import InvalidInput, ModelNotFound, ModelUnavailable
from server.core.types import FLOAT32, TENSOR_DTYPES, UINT8, ClassifyResult, RawTensor
from server.edges.common.describe import ModelDescription

INPUT = "image"
OUTPUT = "probabilities"
CLASSIFICATION = "classification"
TIMEOUT = "timeout"
CACHE_HIT = "cache_hit"  # response parameter, set (true) when every image was answered from the response cache
COLD_START = "cold_start"  # response parameter, set (true) when the model was loaded for the request (--lazy-load)
BYTES = "BYTES"
PLATFORM = "pytorch"
PIXEL_DATATYPES = {"UINT8": UINT8, "FP32": FLOAT32}
"""OIP datatype -> the :class:`RawTensor` dtype name of its pixels."""
MAX_VERSION_DIGITS = 18
"""Longer version strings are refused before ``int()`` sees them (any 18 digits fit an int64)."""
INLINE_ELEMENTS = 1 << 16
"""Inputs with more elements (or raw bytes) than this are converted off the event loop (:func:`is_large`)."""
Payload = bytes | RawTensor


# ----- the neutral request, as the bindings build it


@dataclass(frozen=True)
class InferTensor:
    """One input tensor: its elements either as ``contents`` (typed contents, or the JSON data flattened; BYTES
    elements as bytes) or as ``raw`` bytes (``raw_input_contents``, the binary tensor extension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    contents: Sequence[Any] | None = None
    raw: bytes | None = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output the caller asked for, with its parameters (a parameter without a value is left out)."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """An inference request, free of its wire form. ``outputs`` empty: every output, as probabilities."""

    inputs: Sequence[InferTensor]
    outputs: Sequence[RequestedOutput] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    id: Any = None
    """The caller's ``id``, echoed in the answer; a non-empty string also names the request in the request log."""


@dataclass(frozen=True)
class Payloads:
    """The images of a request, and whether its input had a batch dimension."""

    images: list[Payload]
    batched: bool


# ----- reading


def parse_version(text: str) -> int:
    """``model_version`` as classifyd's version number: '' = 0 (the serving version), else a positive decimal
    integer of ASCII digits. Raises InvalidInput for anything else (never calls ``int()`` on it)."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_VERSION_DIGITS or not int(text):
        raise InvalidInput(f"model_version must be a version number (a positive integer) or empty, "
                           f"got {shown(text)}")
    return int(text)


def checked_input(inputs: Sequence[InferTensor], max_images: int) -> InferTensor:
    """The request's single input tensor once its datatype, shape and element count are right and it holds at most
    ``max_images`` images. Costs O(1) per dimension: nothing is copied. Raises InvalidInput."""
    require_one_input([t.name for t in inputs])
    tensor = inputs[0]
    if tensor.datatype == BYTES:
        _check_bytes_shape(tensor.shape)
    elif tensor.datatype in PIXEL_DATATYPES:
        _check_pixels_shape(tensor)
    else:
        raise InvalidInput(f"input datatype must be BYTES (encoded images), UINT8 or FP32, "
                           f"got {str(tensor.datatype)[:40] or 'none'!r}")
    count = image_count(tensor)
    if count > max_images:
        raise InvalidInput(f"the request holds {count} images, more than the limit of {max_images} per request; "
                           "send them in several requests")
    _require_data(tensor)
    return tensor


def image_count(tensor: InferTensor) -> int:
    """How many images a tensor that passed its shape check holds (BYTES ``[N]``, pixels ``[N, H, W, C]``: N)."""
    return tensor.shape[0] if tensor.datatype == BYTES or len(tensor.shape) == 4 else 1


@runtime_checkable
class EncodedElements(Protocol):
    """Elements still encoded on the wire (REST's base64 ``BYTES``): what reading them costs is their encoded
    length, not their count (one element can be 16 MiB of base64)."""

    def encoded_bytes(self) -> int: ...


def is_large(tensor: InferTensor) -> bool:
    """Whether converting the tensor's elements takes long enough to belong off the event loop."""
    if tensor.raw is not None:
        size = len(tensor.raw)
    elif isinstance(tensor.contents, EncodedElements):
        size = tensor.contents.encoded_bytes()
    else:
        size = len(tensor.contents or ())
    return size > INLINE_ELEMENTS


def decode_input(tensor: InferTensor) -> Payloads:
    """One payload per image of a tensor that passed :func:`checked_input`. Copies every element: for a large
    tensor (:func:`is_large`), call it off the event loop. Raises InvalidInput."""
    if tensor.datatype == BYTES:
        return Payloads(_images(tensor), batched=True)
    return _pixels(tensor)


def require_one_input(names: Sequence[str]) -> None:
    """Raises InvalidInput unless the request has exactly one input tensor (a binding checks this before the
    wire details of its inputs, so both bindings name this mistake first)."""
    if len(names) != 1:
        raise InvalidInput(f"expected exactly one input tensor (the images, named {INPUT!r}); "
                           f"got {len(names)}: {[str(n)[:40] for n in names][:8]}")


def _check_bytes_shape(shape: Sequence[int]) -> None:
    if not shape or len(shape) > 2 or shape[0] < 1 or any(d != 1 for d in shape[1:]):
        raise InvalidInput(f"BYTES input must have shape [N] (or [N, 1]) with N >= 1, got {_dims(shape)}")


def _check_pixels_shape(tensor: InferTensor) -> None:
    shape = tensor.shape
    if len(shape) not in (2, 3, 4) or any(d < 1 for d in shape):
        raise InvalidInput(f"{tensor.datatype} input must have shape [N, H, W, C], [H, W, C] or [H, W], every "
                           f"dimension at least 1; got {_dims(shape)}")


def _dims(shape: Sequence[int]) -> str:
    """A shape for a message: at most 8 dimensions shown."""
    dims = ", ".join(str(d) for d in list(shape[:8]))
    return f"[{dims}{', …' if len(shape) > 8 else ''}]"


def _images(tensor: InferTensor) -> list[Payload]:
    shape = list(tensor.shape)
    count = shape[0]
    # Raw: at most one element past the count is split off; the rest of the bytes is never looked at.
    found = split_bytes_elements(tensor.raw, stop=count + 1) if tensor.raw is not None else tensor.contents or ()
    if len(found) != count:
        more = " or more" if tensor.raw is not None and len(found) > count else ""
        raise InvalidInput(f"input of shape {shape} needs {count} element(s), got {len(found)}{more}")
    elements = list(found)
    if not all(isinstance(e, bytes) for e in elements):
        raise InvalidInput("BYTES input elements must be bytes")
    return elements


def _pixels(tensor: InferTensor) -> Payloads:
    name = PIXEL_DATATYPES[tensor.datatype]
    dtype = TENSOR_DTYPES[name]
    shape = tuple(tensor.shape)
    count = math.prod(shape)  # Python ints: huge dimensions must not wrap around
    have = len(tensor.raw) if tensor.raw is not None else len(tensor.contents or ()) * dtype.itemsize
    if have != count * dtype.itemsize:
        raise InvalidInput(f"{tensor.datatype} input of shape {list(shape)} needs {count * dtype.itemsize} bytes, "
                           f"got {have}")
    data = tensor.raw if tensor.raw is not None else _typed_bytes(tensor.datatype, tensor.contents or (), dtype)
    if len(shape) < 4:
        return Payloads([RawTensor(name, shape, data)], batched=False)
    size = len(data) // shape[0]
    return Payloads([RawTensor(name, shape[1:], data[i * size:(i + 1) * size]) for i in range(shape[0])], True)


def _require_data(tensor: InferTensor) -> None:
    if tensor.raw is None and not tensor.contents:
        raise InvalidInput(f"input {str(tensor.name)[:100]!r} holds no data: send its elements as contents "
                           "(JSON 'data') or as raw bytes")


def _typed_bytes(datatype: str, contents: Sequence[Any], dtype: np.dtype) -> bytes:
    """Typed contents (or JSON numbers) as the little-endian bytes of ``dtype``. Raises InvalidInput."""
    if isinstance(contents, list) and any(isinstance(v, bool) for v in contents):  # only JSON has true/false
        raise InvalidInput(f"{datatype} input data must be numbers, not true/false")
    values = np.asarray(contents)
    if dtype.kind == "f":
        if values.dtype.kind not in "iuf":
            raise InvalidInput(f"{datatype} input data must be numbers")
        return values.astype(dtype).tobytes()
    if values.dtype.kind not in "iu":
        raise InvalidInput(f"{datatype} input data must be integers from 0 to 255")
    if values.min() < 0 or values.max() > 255:
        raise InvalidInput(f"{datatype} input has values outside 0..255")
    return values.astype(dtype).tobytes()


def split_bytes_elements(raw: bytes, stop: int | None = None) -> list[bytes]:
    """Elements of a raw BYTES tensor: each is a 4-byte little-endian length, then that many bytes; only the first
    ``stop`` when given (millions of empty elements then cost ``stop`` steps). Raises InvalidInput for a
    truncated element."""
    elements, offset = [], 0
    while offset < len(raw) and (stop is None or len(elements) < stop):
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


def parse_classification(outputs: Sequence[RequestedOutput], labels: int) -> int:
    """How many labels the caller wants as strings (0: the probabilities). Raises InvalidInput for an unknown
    output, one named twice, or a ``classification`` that is not an integer from 1 to ``labels``."""
    for output in outputs:
        if output.name != OUTPUT:
            raise InvalidInput(f"unknown output {str(output.name)[:100]!r}; the model's only output is {OUTPUT!r}")
    if len(outputs) > 1:
        raise InvalidInput(f"output {OUTPUT!r} is requested {len(outputs)} times; request each output at most once")
    if not outputs or outputs[0].parameters.get(CLASSIFICATION) is None:
        return 0
    k = outputs[0].parameters[CLASSIFICATION]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= labels:
        raise InvalidInput(f"output parameter {CLASSIFICATION!r} must be an integer from 1 to the {labels} labels, "
                           f"got {shown(k)}")
    return k


INT64_MAX = 2**63 - 1


def parse_timeout(parameters: Mapping[str, Any]) -> float | None:
    """The request's ``timeout`` parameter (whole microseconds, Triton's unit) in seconds; None when absent.
    Raises InvalidInput unless it is a positive integer."""
    value = parameters.get(TIMEOUT)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT64_MAX:
        raise InvalidInput(f"parameter {TIMEOUT!r} must be a positive 64-bit integer (microseconds), "
                           f"got {shown(value)}")
    return value * 1e-6


def shown(value: Any) -> str:
    """A client's value for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


# ----- answering


@dataclass(frozen=True)
class OutputTensor:
    """One output: FP32 ``data`` as a flat little-endian float32 array, BYTES ``data`` as strings."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[str]


def build_output(results: Sequence[ClassifyResult], classification: int, labels: int, batched: bool,
                 multi_label: bool = False) -> OutputTensor:
    """The output for the results of the request's images, in the images' order.

    Each result holds the top ``classification`` (or all ``labels``) predictions; a multi-label (sigmoid) model
    lists only the labels at or above their threshold, so its rows may be shorter (zeros in probabilities, empty
    strings in classification rows). Raises ModelUnavailable when a swap changed the model's labels while the
    request was computed.
    """
    width = classification or labels
    for result in results:
        predictions = result.predictions
        if len(predictions) > width or (not multi_label and len(predictions) != width) or \
                any(p.index >= labels for p in predictions):
            raise ModelUnavailable("the model's labels changed while this request was computed; send it again")
    shape = [len(results), width] if batched else [width]
    if classification:
        strings = []
        for result in results:
            row = [f"{p.score:f}:{p.index}:{p.label}" for p in result.predictions]
            strings += row + [""] * (width - len(row))
        return OutputTensor(OUTPUT, BYTES, shape, strings)
    rows = np.zeros((len(results), labels), dtype="<f4")
    for row, result in zip(rows, results, strict=True):
        for p in result.predictions:
            row[p.index] = p.score
    return OutputTensor(OUTPUT, "FP32", shape, rows.ravel())


# ----- model metadata


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """What ``ModelMetadata`` / ``GET /v2/models/{m}`` answer."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


def model_metadata(model: ModelDescription, version: int) -> ModelMetadata:
    """Versions (the ready ones, newest first, or only ``version`` when named), input and output of a model.

    Raises ModelNotFound for an unknown version, ModelUnavailable when its labels are unknown (no manifest parsed).
    """
    if version:
        entry = model.version(version)
        if entry is None:
            raise ModelNotFound(f"model {model.name} has no version {version}")
        labels = entry.num_labels
    else:
        labels = model.manifest.num_classes if model.manifest else None
    if labels is None:
        raise ModelUnavailable(f"model {model.name}: no manifest parsed, so its labels are unknown")
    return ModelMetadata(name=model.name, versions=[str(v) for v in ([version] if version else model.ready_versions)],
                         platform=PLATFORM, inputs=[TensorMetadata(INPUT, BYTES, [-1])],
                         outputs=[TensorMetadata(OUTPUT, "FP32", [-1, labels])])
