"""OIP parity: one corpus of requests through the gRPC binding and the REST binding of one daemon.

Every case is written once, neutrally, and sent both ways (classifyd's own ``inference`` stubs; JSON or the binary
tensor extension over urllib). Both must give the same answer: the same outputs with scores equal within float32
rounding, or the same error: the gRPC code's name is the REST body's ``code``, the HTTP status is that code's
(:mod:`server.edges.common.status`), and the messages are the same. Each case also names the outcome it expects,
so the two cannot agree on a wrong answer.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.core.errors import Status
from server.edges.common.oip_codec import join_bytes_elements, split_bytes_elements
from server.edges.common.status import http_status
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import DaemonThread, encode, running_daemon
from tests.support.repository import build_test_repository

pytestmark = pytest.mark.timeout(180)

IMAGES = held_out_digits()[0][:8]
PNGS = [png_bytes(image) for image in IMAGES]
PIXELS = np.stack(IMAGES)[..., None]  # [8, 8, 8, 1] uint8
FLOATS = (PIXELS / 255.0).astype("<f4")


@dataclass(frozen=True)
class Tensor:
    """One input: ``values`` (list of bytes for BYTES, an array for pixels; None: no data), sent raw or typed."""

    datatype: str
    shape: tuple[int, ...]
    values: Any = None
    raw: bool = True
    name: str = "image"
    raw_bytes: bytes | None = None
    """Sent as the raw data instead of the encoding of ``values`` (malformed data)."""

    def raw_data(self) -> bytes:
        if self.raw_bytes is not None:
            return self.raw_bytes
        if self.datatype == "BYTES":
            return join_bytes_elements(self.values)
        return np.ascontiguousarray(self.values).tobytes()


@dataclass(frozen=True)
class Case:
    id: str
    expect: str
    """The status name both bindings must give."""
    inputs: tuple[Tensor, ...] = ()
    model: str = "digits"
    version: str = ""
    outputs: tuple[tuple[str, dict[str, Any]], ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)


def png(count: int = 1, raw: bool = True, shape: tuple[int, ...] | None = None) -> Tensor:
    return Tensor("BYTES", shape or (count,), PNGS[:count], raw)


def pixels(array: np.ndarray, datatype: str = "UINT8", raw: bool = True, **kwargs: Any) -> Tensor:
    return Tensor(datatype, kwargs.pop("shape", array.shape), array, raw, **kwargs)


def top(k: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    return (("probabilities", {"classification": k}),)


BAD = "INVALID_ARGUMENT"
CASES = [
    # ----- good requests: every layout, typed and raw, outputs and parameters
    Case("bytes-raw-one", "OK", (png(1),)),
    Case("bytes-contents-three", "OK", (png(3, raw=False),)),
    Case("bytes-shape-n-by-1", "OK", (png(2, shape=(2, 1)),)),
    Case("uint8-nhwc-raw", "OK", (pixels(PIXELS[:4]),)),
    Case("uint8-nhwc-contents", "OK", (pixels(PIXELS[:2], raw=False),)),
    Case("uint8-hwc-raw-unbatched", "OK", (pixels(PIXELS[0]),)),
    Case("uint8-hw-contents-unbatched", "OK", (pixels(PIXELS[0, :, :, 0], raw=False),)),
    Case("uint8-other-size-resized", "OK", (pixels(np.kron(PIXELS[1, :, :, 0], np.ones((2, 2), np.uint8))),)),
    Case("fp32-nhwc-contents", "OK", (pixels(FLOATS[:3], "FP32", raw=False),)),
    Case("fp32-hw-raw-unbatched", "OK", (pixels(FLOATS[2, :, :, 0], "FP32"),)),
    Case("fp32-other-size", "OK", (pixels(np.full((16, 16), 0.5, "<f4"), "FP32"),)),
    Case("any-input-name", "OK", (pixels(PIXELS[:2], name="pixels"),)),
    Case("rgb-model-bytes", "OK", (Tensor("BYTES", (2,), [encode(np.full((40, 30, 3), 90, np.uint8))] * 2),),
         model="wide"),
    Case("classification-3", "OK", (png(4),), outputs=top(3)),
    Case("classification-all-labels", "OK", (png(2, raw=False),), outputs=top(10)),
    Case("classification-unbatched", "OK", (pixels(PIXELS[3]),), outputs=top(2)),
    Case("probabilities-named", "OK", (png(2),), outputs=(("probabilities", {}),)),
    Case("output-parameter-ignored", "OK", (png(1),), outputs=(("probabilities", {"binary_data": False}),)),
    Case("version-1", "OK", (png(1),), version="1"),
    Case("version-01", "OK", (png(1),), version="01"),
    Case("timeout-generous", "OK", (png(2),), parameters={"timeout": 60_000_000}),
    Case("request-parameter-ignored", "OK", (png(1),), parameters={"priority": 1}),
    # ----- shapes
    Case("bytes-zero-dim", BAD, (Tensor("BYTES", (0,), []),)),
    Case("bytes-negative-dim", BAD, (Tensor("BYTES", (-1,), PNGS[:1]),)),
    Case("bytes-no-dims", BAD, (Tensor("BYTES", (), PNGS[:1]),)),
    Case("bytes-n-by-2", BAD, (png(2, shape=(1, 2)),)),
    Case("bytes-three-dims", BAD, (png(1, shape=(1, 1, 1)),)),
    Case("bytes-count-mismatch", BAD, (png(2, shape=(3,)),)),
    Case("bytes-raw-truncated", BAD, (Tensor("BYTES", (1,), PNGS[:1], raw_bytes=join_bytes_elements(PNGS[:1])[:-5]),)),
    Case("bytes-no-data", BAD, (Tensor("BYTES", (1,), None),)),
    Case("uint8-zero-batch", BAD, (pixels(PIXELS[:0]),)),
    Case("uint8-zero-height", BAD, (pixels(PIXELS[:1], shape=(1, 0, 8, 1), raw_bytes=b""),)),
    Case("uint8-negative-dims", BAD, (pixels(PIXELS[0], shape=(-8, -8, 1)),)),
    Case("uint8-huge-dims-int64-wrap", BAD, (pixels(PIXELS[0], shape=(2**32, 2**32, 1)),)),
    Case("uint8-huge-dims-raw-empty", BAD, (pixels(PIXELS[0], shape=(2**40, 2**30, 4, 1), raw_bytes=b""),)),
    Case("uint8-one-dim", BAD, (pixels(PIXELS[0].ravel()),)),
    Case("uint8-five-dims", BAD, (pixels(PIXELS[:2][None]),)),
    Case("uint8-byte-count-mismatch", BAD, (pixels(PIXELS[:2], raw_bytes=PIXELS[:2].tobytes()[:-1]),)),
    Case("uint8-contents-count-mismatch", BAD, (pixels(PIXELS[0, :7, :, 0], raw=False, shape=(8, 8)),)),
    Case("uint8-contents-out-of-range", BAD, (pixels(np.full((8, 8), 300, np.int64), raw=False),)),
    Case("fp32-not-finite", BAD, (pixels(np.full((8, 8), np.nan, "<f4"), "FP32"),)),
    # ----- datatypes and inputs
    Case("datatype-int32", BAD, (Tensor("INT32", (1, 8, 8, 1), PIXELS[:1].astype(np.int32)),)),
    Case("datatype-empty", BAD, (Tensor("", (1,), PNGS[:1]),)),
    Case("bytes-datatype-for-pixels", BAD, (Tensor("BYTES", (8, 8), None, raw_bytes=PIXELS[0].tobytes()),)),
    Case("uint8-datatype-for-a-png", BAD, (Tensor("UINT8", (1,), None, raw_bytes=join_bytes_elements(PNGS[:1])),)),
    Case("two-inputs", BAD, (png(1), png(1))),
    Case("no-inputs", BAD, ()),
    Case("undecodable-image-in-a-batch", BAD, (Tensor("BYTES", (3,), [PNGS[0], b"junk", PNGS[1]]),)),
    # ----- versions
    Case("version-0", BAD, (png(1),), version="0"),
    Case("version-minus-1", BAD, (png(1),), version="-1"),
    Case("version-plus-1", BAD, (png(1),), version="+1"),
    Case("version-superscript-two", BAD, (png(1),), version="²"),
    Case("version-arabic-indic-digit", BAD, (png(1),), version="١"),
    Case("version-letters", BAD, (png(1),), version="x"),
    Case("version-decimal", BAD, (png(1),), version="1.0"),
    Case("version-19-digits", BAD, (png(1),), version="1" * 19),
    Case("version-5000-digits", BAD, (png(1),), version="9" * 5000),
    Case("version-not-loaded", "NOT_FOUND", (png(1),), version="7"),
    # ----- outputs
    Case("output-repeated", BAD, (png(1),), outputs=(("probabilities", {}), ("probabilities", {}))),
    Case("output-repeated-with-classification", BAD, (png(1),), outputs=top(2) + top(3)),
    Case("output-unknown", BAD, (png(1),), outputs=(("scores", {}),)),
    Case("output-unknown-and-known", BAD, (png(1),), outputs=(("probabilities", {}), ("scores", {}))),
    Case("classification-0", BAD, (png(1),), outputs=top(0)),
    Case("classification-11", BAD, (png(1),), outputs=top(11)),
    Case("classification-negative", BAD, (png(1),), outputs=top(-3)),
    Case("classification-string", BAD, (png(1),), outputs=top("3")),
    Case("classification-float", BAD, (png(1),), outputs=top(3.0)),
    Case("classification-bool", BAD, (png(1),), outputs=top(True)),
    # ----- request parameters
    Case("timeout-zero", BAD, (png(1),), parameters={"timeout": 0}),
    Case("timeout-negative", BAD, (png(1),), parameters={"timeout": -5}),
    Case("timeout-string", BAD, (png(1),), parameters={"timeout": "1000"}),
    Case("timeout-float", BAD, (png(1),), parameters={"timeout": 1.5}),
    Case("timeout-bool", BAD, (png(1),), parameters={"timeout": True}),
    Case("timeout-one-microsecond", "DEADLINE_EXCEEDED", (png(1),), model="patient", parameters={"timeout": 1}),
    # ----- the model before its tensors
    Case("missing-model-bad-tensor", "NOT_FOUND", (Tensor("INT32", (0, -1), None),), model="nope"),
    Case("missing-model-good-tensor", "NOT_FOUND", (png(1),), model="nope"),
    Case("missing-version-bad-tensor", "NOT_FOUND", (Tensor("BYTES", (0,), []),), version="7"),
    Case("broken-model-bad-output", "UNAVAILABLE", (png(1),), model="broken", outputs=(("scores", {}),)),
    Case("missing-model-bad-version", BAD, (png(1),), model="nope", version="²"),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = build_test_repository(tmp_path_factory.mktemp("models"))
    with running_daemon(root, http_port=0, watch=False) as running:
        yield running


@pytest.fixture(scope="module")
def stub(daemon: DaemonThread) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


# ----- one case, two wire forms


def _parameter(value: Any) -> oip.InferParameter:
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    if isinstance(value, int):
        return oip.InferParameter(int64_param=value)
    if isinstance(value, float):
        return oip.InferParameter(double_param=value)
    return oip.InferParameter(string_param=value)


def grpc_request(case: Case) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=case.model, model_version=case.version, id=case.id)
    raw = any(t.raw and (t.values is not None or t.raw_bytes is not None) for t in case.inputs)
    for tensor in case.inputs:
        message = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            request.raw_input_contents.append(tensor.raw_data() if tensor.values is not None
                                              or tensor.raw_bytes is not None else b"")
        elif tensor.values is not None:
            if tensor.datatype == "BYTES":
                message.contents.bytes_contents.extend(tensor.values)
            elif tensor.datatype == "FP32":
                message.contents.fp32_contents.extend(np.ravel(tensor.values).tolist())
            else:
                message.contents.uint_contents.extend(np.ravel(tensor.values).tolist())
    for name, parameters in case.outputs:
        output = request.outputs.add(name=name)
        for key, value in parameters.items():
            output.parameters[key].CopyFrom(_parameter(value))
    for key, value in case.parameters.items():
        request.parameters[key].CopyFrom(_parameter(value))
    return request


def rest_request(case: Case) -> tuple[str, bytes, dict[str, str]]:
    """The path, body and headers of the case as JSON, with the binary extension for raw tensors."""
    inputs, binary = [], b""
    for tensor in case.inputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.raw and (tensor.values is not None or tensor.raw_bytes is not None):
            data = tensor.raw_data()
            entry["parameters"] = {"binary_data_size": len(data)}
            binary += data
        elif tensor.values is not None:
            entry["data"] = ([base64.b64encode(v).decode() for v in tensor.values] if tensor.datatype == "BYTES"
                             else np.asarray(tensor.values).tolist())
        inputs.append(entry)
    document: dict[str, Any] = {"id": case.id, "inputs": inputs}
    if case.outputs:
        document["outputs"] = [{"name": name, "parameters": parameters} for name, parameters in case.outputs]
    if case.parameters:
        document["parameters"] = case.parameters
    header = json.dumps(document).encode()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    model = urllib.parse.quote(case.model, safe="")
    version = f"/versions/{urllib.parse.quote(case.version, safe='')}" if case.version else ""
    return f"/v2/models/{model}{version}/infer", header + binary, headers


@dataclass
class Outcome:
    """What one binding answered: ``code`` OK with outputs, or an error code with its message."""

    code: str
    message: str = ""
    version: str = ""
    outputs: list[tuple[str, str, list[int], Any]] = field(default_factory=list)
    http_status: int = 0


def via_grpc(stub: oip_grpc.GRPCInferenceServiceStub, case: Case) -> Outcome:
    try:
        response = stub.ModelInfer(grpc_request(case), timeout=60)
    except grpc.RpcError as exc:
        return Outcome(exc.code().name, exc.details())
    outputs = []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        data: Any = (np.frombuffer(raw, "<f4") if output.datatype == "FP32"
                     else [e.decode() for e in split_bytes_elements(raw)])
        outputs.append((output.name, output.datatype, list(output.shape), data))
    assert response.id == case.id
    return Outcome("OK", version=response.model_version, outputs=outputs)


def via_rest(daemon: DaemonThread, case: Case) -> Outcome:
    path, body, headers = rest_request(case)
    assert daemon.daemon is not None
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.daemon.http_port}{path}", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        error = json.loads(exc.read())
        return Outcome(error["code"], error["error"], http_status=exc.code)
    outputs = [(o["name"], o["datatype"], o["shape"],
                np.asarray(o["data"], "<f4") if o["datatype"] == "FP32" else o["data"]) for o in answer["outputs"]]
    assert answer["id"] == case.id
    return Outcome("OK", version=answer["model_version"], outputs=outputs, http_status=200)


def assert_same_outputs(by_grpc: Outcome, by_rest: Outcome) -> None:
    assert by_grpc.version == by_rest.version
    assert [o[:3] for o in by_grpc.outputs] == [o[:3] for o in by_rest.outputs]
    for (_, datatype, _, grpc_data), (_, _, _, rest_data) in zip(by_grpc.outputs, by_rest.outputs, strict=True):
        if datatype == "FP32":
            # float32 rounding; the images may also share a batch differently on the two calls
            np.testing.assert_allclose(grpc_data, rest_data, rtol=1e-5, atol=1e-6)
            continue
        assert len(grpc_data) == len(rest_data)
        for ours, theirs in zip(grpc_data, rest_data, strict=True):
            score, _, rest = ours.partition(":")
            other_score, _, other_rest = theirs.partition(":")
            assert rest == other_rest and abs(float(score) - float(other_score)) <= 2e-6, (ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_grpc_and_rest_give_the_same_answer(case: Case, daemon: DaemonThread,
                                            stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    by_grpc, by_rest = via_grpc(stub, case), via_rest(daemon, case)
    assert (by_grpc.code, by_rest.code) == (case.expect, case.expect), (by_grpc, by_rest)
    if case.expect == "OK":
        assert_same_outputs(by_grpc, by_rest)
    else:
        assert by_rest.http_status == http_status(Status[by_grpc.code])
        assert by_grpc.message == by_rest.message


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


# ----- what only JSON can get wrong: refused on REST as INVALID_ARGUMENT, never a 500


REST_ONLY = {
    "parameters-a-list": {"parameters": [1, 2]},
    "parameters-a-string": {"parameters": "timeout"},
    "output-parameters-a-list": {"outputs": [{"name": "probabilities", "parameters": ["classification"]}]},
    "input-parameters-a-number": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": 3,
                                              "data": [base64.b64encode(PNGS[0]).decode()]}]},
    "outputs-an-object": {"outputs": {"name": "probabilities"}},
    "inputs-an-object": {"inputs": {"name": "image"}},
    "shape-a-string": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": "1", "data": ["x"]}]},
    "shape-with-a-float": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1.0], "data": ["x"]}]},
    "shape-with-a-bool": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [True], "data": ["x"]}]},
    "bytes-not-base64": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]},
    "uint8-data-strings": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1], "data": ["7"]}]},
    "uint8-data-floats": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2], "data": [1.5, 2]}]},
    "uint8-data-bools": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1], "data": [True]}]},
    "fp32-data-objects": {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1], "data": [{}]}]},
    "binary-size-too-large": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                          "parameters": {"binary_data_size": 10**6}}]},
}


@pytest.mark.parametrize("document", list(REST_ONLY.values()), ids=list(REST_ONLY))
def test_malformed_json_is_invalid_argument(document: dict[str, Any], daemon: DaemonThread) -> None:
    assert daemon.daemon is not None
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(PNGS[0]).decode()]}], **document}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.daemon.http_port}/v2/models/digits/infer",
                                     data=body, headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=60)
    assert failed.value.code == 400, failed.value.read()
    assert json.loads(failed.value.read())["code"] == "INVALID_ARGUMENT"
