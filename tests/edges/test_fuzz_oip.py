"""Fuzzing the Open Inference Protocol's gRPC binding (ModelInfer, ModelStreamInfer) against a real in-thread daemon:
a well-formed request with one thing about it made wrong (version, model, datatype, shape across int64, typed or
raw contents, outputs, parameters of every kind, inputs).

Property (tests/edges/fuzzing.py): every case is OK or INVALID_ARGUMENT / NOT_FOUND with a message, never
INTERNAL, UNKNOWN or another server-side status, and nothing is logged at ERROR. Cases are derandomized.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.edges.common.oip_codec import join_bytes_elements
from tests.edges.fuzzing import (
    FUZZ_SETTINGS,
    HARD_VERSIONS,
    PNGS,
    ErrorLog,
    fuzz_daemon,
    raw_bytes_elements,
    versions,
    watching_errors,
)
from tests.support.kit import DaemonThread

pytestmark = pytest.mark.timeout(120)

INT64 = st.integers(-(2**63), 2**63 - 1)
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
"""What a client's mistake may get (no case names the broken model or a timeout that can expire)."""
MUTATIONS = ["none", "version", "model", "datatype", "shape", "contents", "raw", "outputs", "parameters", "inputs",
             "id"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    with fuzz_daemon(tmp_path_factory.mktemp("models")) as running:
        yield running


@pytest.fixture(scope="module")
def stub(daemon: DaemonThread) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    with watching_errors() as handler:
        yield handler


def parameter_values() -> st.SearchStrategy[oip.InferParameter]:
    """An InferParameter of any kind, or with none set."""
    return st.one_of(st.just(oip.InferParameter()), st.booleans().map(lambda v: oip.InferParameter(bool_param=v)),
                     INT64.map(lambda v: oip.InferParameter(int64_param=v)),
                     st.text(max_size=10).map(lambda v: oip.InferParameter(string_param=v)),
                     st.floats().map(lambda v: oip.InferParameter(double_param=v)),
                     st.integers(0, 2**64 - 1).map(lambda v: oip.InferParameter(uint64_param=v)))


@st.composite
def good_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    """A request the daemon answers: encoded images or pixels, typed contents or raw."""
    request = oip.ModelInferRequest(model_name="digits", model_version=draw(st.sampled_from(["", "1"])),
                                    id=draw(st.text(max_size=8)))
    kind, count, raw = draw(st.sampled_from(["BYTES", "UINT8", "FP32"])), draw(st.integers(1, 3)), draw(st.booleans())
    if kind == "BYTES":
        images = draw(st.lists(st.sampled_from(PNGS), min_size=count, max_size=count))
        tensor = request.inputs.add(name="image", datatype=kind, shape=[count])
        if raw:
            request.raw_input_contents.append(join_bytes_elements(images))
        else:
            tensor.contents.bytes_contents.extend(images)
    else:
        shape = [count, 8, 8, 1] if draw(st.booleans()) else [8, 8]
        pixels = np.full(shape, draw(st.integers(0, 255)), np.uint8)
        values = pixels if kind == "UINT8" else (pixels / 255.0).astype("<f4")
        tensor = request.inputs.add(name="image", datatype=kind, shape=shape)
        if raw:
            request.raw_input_contents.append(values.tobytes())
        elif kind == "UINT8":
            tensor.contents.uint_contents.extend(values.ravel().tolist())
        else:
            tensor.contents.fp32_contents.extend(values.ravel().tolist())
    if draw(st.booleans()):
        output = request.outputs.add(name="probabilities")
        output.parameters["classification"].int64_param = draw(st.integers(1, 10))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = 60_000_000
    return request


@st.composite
def requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    """A well-formed request with one thing about it wrong."""
    request = draw(good_requests())
    mutation, tensor = draw(st.sampled_from(MUTATIONS)), request.inputs[0]
    if mutation == "version":
        request.model_version = draw(versions())
    elif mutation == "model":
        request.model_name = draw(st.sampled_from(["nope", "", "DIGITS"]) | st.text(max_size=300))
    elif mutation == "datatype":
        tensor.datatype = draw(st.sampled_from(["INT32", "BOOL", "", "bytes", "UINT16", "FP64"]) | st.text(max_size=8))
    elif mutation == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.integers(-2, 9) | INT64, max_size=6)))
    elif mutation == "contents":
        _contents(draw, request)
    elif mutation == "raw":
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(draw(st.lists(raw_bytes_elements() | st.binary(max_size=300), max_size=3)))
    elif mutation == "outputs":
        for _ in range(draw(st.integers(0, 4))):
            output = request.outputs.add(name=draw(st.sampled_from(["probabilities", "scores", ""])))
            for key in draw(st.lists(st.sampled_from(["classification", "binary_data", "x"]), max_size=2)):
                output.parameters[key].CopyFrom(draw(parameter_values()))
    elif mutation == "parameters":
        for key in draw(st.lists(st.sampled_from(["timeout", "priority", "sequence_id", ""]), max_size=3)):
            value = draw(parameter_values())
            which = value.WhichOneof("parameter_choice")
            if key == "timeout" and which in ("int64_param", "uint64_param") and 0 < getattr(value, which) < 60_000_000:
                value = oip.InferParameter(int64_param=60_000_000)  # one that can expire is a DEADLINE_EXCEEDED
            request.parameters[key].CopyFrom(value)
    elif mutation == "inputs":
        _inputs(draw, request)
    elif mutation == "id":
        request.id = draw(st.text(max_size=2000))
    return request


def _contents(draw: st.DrawFn, request: oip.ModelInferRequest) -> None:
    """Typed contents instead of (or besides) raw data: another field, too few or too many elements, odd values."""
    contents = request.inputs[0].contents
    if draw(st.booleans()):
        del request.raw_input_contents[:]
    which = draw(st.sampled_from(["bytes", "uint", "fp32", "int", "int64"]))
    count = draw(st.integers(0, 70))
    if which == "bytes":
        contents.bytes_contents.extend(draw(st.lists(st.sampled_from([*PNGS, b"", b"x"]), max_size=count)))
    elif which == "uint":
        contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), min_size=count, max_size=count)))
    elif which == "fp32":
        contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), min_size=count, max_size=count)))
    elif which == "int":
        contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=count)))
    else:
        contents.int64_contents.extend(draw(st.lists(INT64, max_size=count)))


def _inputs(draw: st.DrawFn, request: oip.ModelInferRequest) -> None:
    """No input, or a second one (with or without its raw data)."""
    if draw(st.booleans()):
        del request.inputs[:]
        return
    request.inputs.add(name=draw(st.sampled_from(["image", "other"])), datatype="BYTES", shape=[1])
    if request.raw_input_contents and draw(st.booleans()):
        request.raw_input_contents.append(join_bytes_elements(PNGS[:1]))


def _outcome(stub: oip_grpc.GRPCInferenceServiceStub, request: oip.ModelInferRequest) -> tuple[str, str]:
    try:
        stub.ModelInfer(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _checked(code: str, message: str, errors: ErrorLog, request: Any) -> None:
    what = f"{str(request)[:600]} → {code}: {message[:300]}"
    assert code in ALLOWED, what
    assert code == "OK" or message.strip(), what
    logged = errors.take()
    assert not logged, f"{what} logged at ERROR:\n" + "\n".join(logged)


@FUZZ_SETTINGS
@given(requests())
def test_model_infer_bad_input_is_invalid_argument_with_a_message(stub: oip_grpc.GRPCInferenceServiceStub,
                                                                  errors: ErrorLog,
                                                                  case: oip.ModelInferRequest) -> None:
    _checked(*_outcome(stub, case), errors, case)


@FUZZ_SETTINGS
@given(st.lists(requests(), min_size=1, max_size=8))
def test_model_stream_infer_answers_every_request_in_band(stub: oip_grpc.GRPCInferenceServiceStub, errors: ErrorLog,
                                                          cases: list[oip.ModelInferRequest]) -> None:
    for n, case in enumerate(cases):
        case.id = f"s{n}"
    answers = list(stub.ModelStreamInfer(iter(cases), timeout=60))
    assert sorted(a.infer_response.id for a in answers) == sorted(c.id for c in cases)
    for answer in answers:
        code, _, message = answer.error_message.partition(": ")
        _checked(code or "OK", message, errors, answer)


# ----- the known-hard inputs, every one of them


def _images(shape: list[int], raw: bytes | None = None, version: str = "", datatype: str = "UINT8",
            model: str = "digits") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="image", datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def _empty_elements(count: int, shape: list[int]) -> oip.ModelInferRequest:
    request = _images(shape, datatype="BYTES")
    request.inputs[0].contents.bytes_contents.extend([b""] * count)
    return request


HARD = {
    **{f"version-{n}": _images([8, 8], bytes(64), version) for n, version in enumerate(HARD_VERSIONS)},
    "int64-wrap": _images([2**63 - 1, 2**63 - 1, 1, 1], b"\x00"),
    "int64-wrap-empty": _images([2**32, 2**32, 1], b""),
    "zero-dim": _images([10**12, 0, 1, 1], b""),
    "negative-dim": _images([-1, 8, 8, 1], bytes(64)),
    "many-tiny-images": _images([200_000, 1, 1, 1], bytes(200_000)),
    "many-empty-elements": _empty_elements(100_000, [100_000]),
    "many-empty-elements-one-claimed": _empty_elements(100_000, [1]),
    "raw-empty-elements": _images([1], b"\x00" * 200_000, datatype="BYTES"),
    "long-model-name": _images([8, 8], bytes(64), model="m" * 5000),
}


@pytest.mark.parametrize("name", list(HARD))
def test_hard_inputs_are_invalid_argument_or_not_found(stub: oip_grpc.GRPCInferenceServiceStub, errors: ErrorLog,
                                                       name: str) -> None:
    code, message = _outcome(stub, HARD[name])
    _checked(code, message, errors, name)
    assert code != "OK" or name == "version-0"  # "01" is version 1
