"""The Open Inference Protocol (inference.GRPCInferenceService) on a real daemon.

tritonclient's own checks run in a subprocess (tests/support/tritonclient_probe.py: its stubs and ours
cannot share one process); the rest use classifyd's generated stubs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc

from server.edges.common.oip_codec import join_bytes_elements
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import GATE, REPO, DaemonThread, encode
from tests.support.repository import DIGIT_LABELS

Input = oip.ModelInferRequest.InferInputTensor
Output = oip.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def digits() -> tuple[list[np.ndarray], list[int]]:
    images, labels = held_out_digits()
    return images[:24], labels[:24]


@pytest.fixture
def stub(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def probe(daemon: DaemonThread) -> dict[str, Any]:
    """What tritonclient saw, from its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    script = REPO / "tests" / "support" / "tritonclient_probe.py"
    done = subprocess.run([sys.executable, str(script), daemon.target], env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def image_request(pngs: list[bytes], *, model: str = "digits", raw: bool = True, class_count: int = 0,
                  version: str = "") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(pngs)])
    if raw:
        request.raw_input_contents.append(join_bytes_elements(pngs))
    else:
        tensor.contents.bytes_contents.extend(pngs)
    if class_count:
        request.outputs.add(name="probabilities").parameters["classification"].int64_param = class_count
    return request


def pixels_request(array: np.ndarray, datatype: str, *, model: str = "digits") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def probabilities(response: oip.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("probabilities", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(output.shape))


def classify_top(channel: grpc.Channel, png: bytes, k: int) -> list[str]:
    """The same image through classifier.v1, formatted as OIP classification strings."""
    response = pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(model="digits", image=png, top_k=k))
    return [f"{p.score:f}:{p.index}:{p.label}" for p in response.predictions]


# ----- tritonclient


def test_tritonclient_sees_a_live_ready_server_and_model_metadata(probe: dict[str, Any]) -> None:
    assert probe["live"] and probe["ready"]
    assert probe["model_ready"] and probe["model_ready_v1"]
    assert probe["unknown_model_ready"] is False
    assert probe["server_metadata"]["name"] == "classifyd"
    assert "classification" in probe["server_metadata"]["extensions"]
    metadata = probe["metadata"]
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("image", "BYTES", ["-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("probabilities", "FP32", ["-1", "10"])]


def test_tritonclient_gets_the_right_top_k_chinese_labels(probe: dict[str, Any], channel: grpc.Channel,
                                                          digits: tuple[list[np.ndarray], list[int]]) -> None:
    images, labels = digits
    assert probe["labels"] == labels
    rows = probe["top3"]
    assert len(rows) == len(images) and all(len(row) == 3 for row in rows)
    top_labels = [row[0].split(":")[2] for row in rows]
    correct = sum(got == DIGIT_LABELS[want] for got, want in zip(top_labels, labels, strict=True))
    assert correct >= 0.9 * len(labels), (top_labels, labels)
    for row, image in zip(rows[:4], images[:4], strict=True):  # the same answer as classifier.v1 gives
        assert row == classify_top(channel, png_bytes(image), 3)
    for row in rows:
        scores = [float(cell.split(":")[0]) for cell in row]
        assert scores == sorted(scores, reverse=True)
        assert all(DIGIT_LABELS[int(cell.split(":")[1])] == cell.split(":")[2] for cell in row)


def test_tritonclient_gets_probabilities_for_a_pixel_batch(probe: dict[str, Any],
                                                           digits: tuple[list[np.ndarray], list[int]]) -> None:
    table = np.array(probe["probabilities"])
    assert table.shape == (len(digits[1]), 10)
    assert np.allclose(table.sum(axis=1), 1.0, atol=1e-4)
    assert (table.argmax(axis=1) == np.array(digits[1])).mean() >= 0.9
    assert probe["probabilities_version"] == "1"


def test_tritonclient_gets_the_right_errors(probe: dict[str, Any]) -> None:
    errors = probe["errors"]
    expected = {
        "unknown_model": ("StatusCode.NOT_FOUND", "unknown model 'no-such-model'"),
        "unknown_version": ("StatusCode.NOT_FOUND", "version 7"),
        "bad_image": ("StatusCode.INVALID_ARGUMENT", "cannot decode image"),
        "bad_shape": ("StatusCode.INVALID_ARGUMENT", "must have shape [N, H, W, C], [H, W, C] or [H, W]"),
        "bad_datatype": ("StatusCode.INVALID_ARGUMENT", "must be BYTES (encoded images), UINT8 or FP32, got 'INT32'"),
        "too_many_classes": ("StatusCode.INVALID_ARGUMENT", "must be an integer from 1 to the 10 labels"),
        "unknown_metadata": ("StatusCode.NOT_FOUND", "unknown model 'no-such-model'"),
    }
    for case, (status, words) in expected.items():
        assert errors[case]["status"] == status, (case, errors[case])
        assert words in errors[case]["message"], (case, errors[case])


def test_tritonclient_stream_reports_a_bad_request_and_carries_on(probe: dict[str, Any]) -> None:
    seen = probe["stream"]
    assert sorted(seen["results"]) == ["a", "c"]
    assert len(seen["errors"]) == 1 and seen["errors"][0].startswith("INVALID_ARGUMENT: cannot decode image")


# ----- classifyd's stubs: layouts, versions, errors, deadlines


def test_bytes_contents_and_raw_contents_agree(stub: oip_grpc.GRPCInferenceServiceStub,
                                               digits: tuple[list[np.ndarray], list[int]]) -> None:
    pngs = [png_bytes(image) for image in digits[0][:5]]
    raw = stub.ModelInfer(image_request(pngs, raw=True))
    typed = stub.ModelInfer(image_request(pngs, raw=False))
    assert (raw.model_name, raw.model_version, raw.id) == ("digits", "1", "req-1")
    assert np.allclose(probabilities(raw), probabilities(typed), atol=1e-6)  # batches may differ
    assert list(probabilities(raw).argmax(axis=1)) == digits[1][:5]


def test_every_pixel_layout_gives_the_same_answer(stub: oip_grpc.GRPCInferenceServiceStub,
                                                  digits: tuple[list[np.ndarray], list[int]]) -> None:
    batch = np.stack(digits[0][:6])
    nhwc = probabilities(stub.ModelInfer(pixels_request(batch[..., None], "UINT8")))
    floats = probabilities(stub.ModelInfer(pixels_request((batch[..., None] / 255.0).astype("<f4"), "FP32")))
    one_hwc = probabilities(stub.ModelInfer(pixels_request(batch[2][..., None], "UINT8")))
    one_hw = probabilities(stub.ModelInfer(pixels_request(batch[2], "UINT8")))
    typed = oip.ModelInferRequest(model_name="digits")
    # any input name is accepted: the datatype says what the tensor holds
    typed.inputs.add(name="pixels", datatype="UINT8", shape=[8, 8]).contents.uint_contents.extend(
        batch[2].ravel().tolist())
    assert nhwc.shape == floats.shape == (6, 10)
    assert np.allclose(nhwc, floats, atol=1e-5)
    assert one_hwc.shape == one_hw.shape == (10,)  # no batch dimension in, none out
    assert np.allclose(one_hwc, nhwc[2], atol=1e-6) and np.allclose(one_hw, one_hwc)
    assert np.allclose(probabilities(stub.ModelInfer(typed)), one_hwc)


def test_an_rgb_model_takes_encoded_colour_images(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    png = encode(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    response = stub.ModelInfer(image_request([png, png], model="wide", class_count=2))
    (output,) = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [2, 2])
    assert response.model_name == "wide"


def test_versions_are_strings(stub: oip_grpc.GRPCInferenceServiceStub,
                              digits: tuple[list[np.ndarray], list[int]]) -> None:
    png = png_bytes(digits[0][0])
    assert stub.ModelInfer(image_request([png], version="1")).model_version == "1"
    assert stub.ModelReady(oip.ModelReadyRequest(name="digits", version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="digits", version="2")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="broken")).ready
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(image_request([png], version="v1"))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_version must be a version number" in failed.value.details()
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelMetadata(oip.ModelMetadataRequest(name="digits", version="3"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(image_request([png], model="broken"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda r: r.inputs.add(name="image", datatype="UINT8", shape=[8, 8]), "expected exactly one input tensor"),
    (lambda r: setattr(r.inputs[0], "datatype", "INT8"), "input datatype must be BYTES (encoded images), UINT8 or"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP32"), "FP32 input must have shape [N, H, W, C], [H, W, C] or"),
    (lambda r: r.inputs[0].shape.append(2), "BYTES input must have shape [N] (or [N, 1])"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 3), "needs 3 element(s), got 2"),
    (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-3]), "raw BYTES tensor is truncated"),
    (lambda r: r.raw_input_contents.append(b"x"), "raw_input_contents has 2 entries for 1 input(s)"),
    (lambda r: r.outputs.add(name="LOGITS"), "the model's only output is 'probabilities'"),
    (lambda r: r.outputs.add(name="probabilities").parameters["classification"].MergeFrom(
        oip.InferParameter(string_param="3")), "'classification' must be an integer from 1 to the 10 labels"),
    (lambda r: r.outputs.add(name="probabilities").parameters["classification"].MergeFrom(
        oip.InferParameter(int64_param=0)), "'classification' must be an integer from 1 to the 10 labels"),
])
def test_malformed_requests_are_invalid_argument(stub: oip_grpc.GRPCInferenceServiceStub, mutate: Any,
                                                 words: str, digits: tuple[list[np.ndarray], list[int]]) -> None:
    request = image_request([png_bytes(digits[0][0]), png_bytes(digits[0][1])])
    mutate(request)
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(request)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in failed.value.details()


def test_a_bad_image_in_a_batch_is_named(stub: oip_grpc.GRPCInferenceServiceStub,
                                         digits: tuple[list[np.ndarray], list[int]]) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(image_request([png_bytes(digits[0][0]), b"junk", png_bytes(digits[0][1])]))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details().startswith("image 1 of the batch of 3: cannot decode image")


def test_pixel_tensors_of_the_wrong_size_are_rejected(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = pixels_request(np.zeros((2, 8, 8, 1), np.uint8), "UINT8")
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(request)
    assert "needs 128 bytes, got 127" in failed.value.details()
    typed = oip.ModelInferRequest(model_name="digits")
    typed.inputs.add(name="image", datatype="UINT8", shape=[1, 1]).contents.uint_contents.append(300)
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(typed)
    assert "values outside 0..255" in failed.value.details()


def test_images_of_one_request_share_a_batch(stub: oip_grpc.GRPCInferenceServiceStub, daemon: DaemonThread) -> None:
    GATE.close()
    try:
        future = stub.ModelInfer.future(pixels_request(np.zeros((4, 8, 8, 1), np.uint8), "UINT8", model="gated"),
                                        timeout=30)
        assert GATE.entered.acquire(timeout=20)
        deadline = time.monotonic() + 20
        while sum(GATE.batches) + daemon.daemon.service.batcher_depth("gated") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        GATE.open.set()
    assert probabilities(future.result()).shape == (4, 4)
    # the first image may start a batch on its own while the others are decoded; the rest wait for it together
    assert sum(GATE.batches) == 4 and len(GATE.batches) <= 2, GATE.batches


def test_the_deadline_is_honoured(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    GATE.close()
    try:
        blocker = stub.ModelInfer.future(pixels_request(np.zeros((8, 8), np.uint8), "UINT8", model="gated"),
                                         timeout=30)
        assert GATE.entered.acquire(timeout=20)
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(pixels_request(np.zeros((8, 8), np.uint8), "UINT8", model="gated"), timeout=0.5)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        GATE.open.set()
    assert blocker.result().model_name == "gated"


def test_stream_answers_each_request_by_id(stub: oip_grpc.GRPCInferenceServiceStub,
                                           digits: tuple[list[np.ndarray], list[int]]) -> None:
    def requests() -> Iterator[oip.ModelInferRequest]:
        for i, image in enumerate(digits[0][:4]):
            request = image_request([png_bytes(image)], class_count=1)
            request.id = f"r{i}"
            yield request
        bad = image_request([b"junk"])
        bad.id = "bad"
        yield bad
        yield oip.ModelInferRequest(model_name="nope", id="unknown")

    answers = list(stub.ModelStreamInfer(requests(), timeout=60))
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["bad", "r0", "r1", "r2", "r3", "unknown"]
    for i in range(4):
        answer = by_id[f"r{i}"]
        assert answer.error_message == ""
        label = answer.infer_response.raw_output_contents[0][4:].decode().split(":")[2]
        assert label == DIGIT_LABELS[digits[1][i]]
    assert by_id["bad"].error_message.startswith("INVALID_ARGUMENT: cannot decode image")
    assert by_id["unknown"].error_message.startswith("NOT_FOUND: unknown model 'nope'")


def test_server_metadata_liveness_and_reflection(stub: oip_grpc.GRPCInferenceServiceStub,
                                                 channel: grpc.Channel) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "classifyd" and list(metadata.extensions) == [
        "classification", "model_repository", "model_configuration", "statistics"]
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for a in answers for s in a.list_services_response.service}
    assert "inference.GRPCInferenceService" in services


def test_model_infer_reports_the_serving_process(stub: oip_grpc.GRPCInferenceServiceStub,
                                                 digits: tuple[list[np.ndarray], list[int]]) -> None:
    _, call = stub.ModelInfer.with_call(image_request([png_bytes(digits[0][0])]))
    assert dict(call.trailing_metadata())["classifyd-pid"] == str(os.getpid())
