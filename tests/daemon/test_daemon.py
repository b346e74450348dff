"""The daemon end to end: a real server on port 0, real channels, real model files."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import image_request, tensor_request
from server.core.config import MAX_STREAM_IN_FLIGHT
from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import GATE, DaemonThread, encode
from tests.support.repository import DIGIT_LABELS

pytestmark = pytest.mark.timeout(120)


async def classify_all(target: str, requests: list[pb.ClassifyRequest]) -> list[pb.ClassifyResponse]:
    """Send every request at once over one channel."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        return list(await asyncio.gather(*(stub.Classify(r, timeout=60) for r in requests)))


def accuracy(responses: list[pb.ClassifyResponse], truth: list[int]) -> float:
    return float(np.mean([r.predictions[0].index == t for r, t in zip(responses, truth, strict=True)]))


def test_held_out_digits_as_png_reach_95_percent_with_chinese_labels(daemon: DaemonThread) -> None:
    images, truth = held_out_digits()
    responses = asyncio.run(classify_all(daemon.target, [image_request(png_bytes(i)) for i in images]))
    assert accuracy(responses, truth) >= 0.95
    for response, label in zip(responses, truth, strict=True):
        assert response.model == "digits"
        assert response.version == 1
        assert len(response.predictions) == 3  # the manifest's top_k
        top = response.predictions[0]
        if top.index == label:
            assert top.label == DIGIT_LABELS[label]
    assert {p.label for r in responses for p in r.predictions} <= set(DIGIT_LABELS)


def test_held_out_digits_as_uint8_tensors_match_png_results(daemon: DaemonThread) -> None:
    images, truth = held_out_digits()
    requests = [tensor_request(i, top_k=10) for i in images]
    assert list(requests[0].tensor.shape) == [8, 8]
    tensors = asyncio.run(classify_all(daemon.target, requests))
    pngs = asyncio.run(classify_all(daemon.target, [image_request(png_bytes(i), top_k=10) for i in images]))
    assert accuracy(tensors, truth) >= 0.95
    assert [r.predictions[0].index for r in tensors] == [r.predictions[0].index for r in pngs]
    assert sorted(p.label for p in tensors[0].predictions) == sorted(DIGIT_LABELS)


def test_concurrent_requests_are_batched_and_match_single_results(daemon: DaemonThread) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(64)]
    requests = [image_request(encode(i), model="wide", top_k=4, request_id=str(n)) for n, i in enumerate(images)]
    together = asyncio.run(classify_all(daemon.target, requests))
    assert max(r.batch_size for r in together) > 1
    assert [r.request_id for r in together] == [str(n) for n in range(64)]
    for request, batched in zip(requests, together, strict=True):
        alone = asyncio.run(classify_all(daemon.target, [request]))[0]
        assert alone.batch_size == 1
        assert [p.index for p in batched.predictions] == [p.index for p in alone.predictions]
        np.testing.assert_allclose([p.score for p in batched.predictions], [p.score for p in alone.predictions],
                                   rtol=1e-4, atol=1e-6)


def test_lone_request_is_not_held_back_by_a_batching_timer(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    digit = png_bytes(held_out_digits()[0][0])
    # "digits" has max_delay_ms = 0: answered at once, well inside a 20 s deadline.
    response = stub.Classify(image_request(digit), timeout=20)
    assert response.batch_size == 1
    assert response.queue_us < 20_000_000
    # "patient" waits up to 600 s for a fuller batch: the same lone request misses a 1 s deadline.
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(image_request(digit, model="patient"), timeout=1)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def _bad(code: grpc.StatusCode, words: str, **fields: object) -> tuple[grpc.StatusCode, str, pb.ClassifyRequest]:
    return code, words, pb.ClassifyRequest(**fields)


def _tensor(dtype: int, shape: list[int], nbytes: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(nbytes))


BAD_REQUESTS = [
    _bad(grpc.StatusCode.NOT_FOUND, "unknown model 'nope'", model="nope", image=b"x"),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode image", image=b"\x89PNG\r\n\x1a\n garbage"),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "unsupported image format",
         image=encode(np.zeros((8, 8, 3), np.uint8), "PPM")),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "empty input"),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "empty image", image=b""),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "dtype must be UINT8 or FLOAT32",
         tensor=_tensor(pb.Tensor.DTYPE_UNSPECIFIED, [8, 8], 64)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "shape must be", tensor=_tensor(pb.Tensor.UINT8, [1, 8, 8, 1], 64)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "needs 64 bytes, got 63", tensor=_tensor(pb.Tensor.UINT8, [8, 8], 63)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "needs 256 bytes", tensor=_tensor(pb.Tensor.FLOAT32, [8, 8], 64)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "2 channel(s)", tensor=_tensor(pb.Tensor.UINT8, [8, 8, 2], 128)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "top_k = 11 is larger than the 10 labels", top_k=11,
         tensor=_tensor(pb.Tensor.UINT8, [8, 8], 64)),
    _bad(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= 0", top_k=-1, tensor=_tensor(pb.Tensor.UINT8, [8, 8], 64)),
    _bad(grpc.StatusCode.UNAVAILABLE, "model broken: no version is ready", model="broken",
         tensor=_tensor(pb.Tensor.UINT8, [8, 8], 64)),
    _bad(grpc.StatusCode.NOT_FOUND, "has no loaded version 7", version=7, tensor=_tensor(pb.Tensor.UINT8, [8, 8], 64)),
]


@pytest.mark.parametrize(("code", "words", "request_"), BAD_REQUESTS, ids=[b[1] for b in BAD_REQUESTS])
def test_bad_requests_get_precise_status_and_the_server_still_serves(
    channel: grpc.Channel, code: grpc.StatusCode, words: str, request_: pb.ClassifyRequest
) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request_, timeout=20)
    assert caught.value.code() is code
    assert words in caught.value.details()
    assert stub.Classify(tensor_request(np.zeros((8, 8), np.uint8)), timeout=20).predictions


def test_deadline_passed_while_queued_is_deadline_exceeded_and_never_computed(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    request = tensor_request(np.zeros((8, 8), np.uint8), model="gated")
    GATE.close()
    try:
        blocker = stub.Classify.future(request, timeout=60)
        assert GATE.entered.acquire(timeout=20)  # the first batch is now computing and holds the model
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(request, timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        GATE.open.set()
    assert blocker.result().batch_size == 1
    assert stub.Classify(request, timeout=20).batch_size == 1  # the worker has certainly passed the expired one
    assert GATE.batches == [1, 1]  # the blocker and the last request: the expired one never reached the model


def test_stream_echoes_request_ids_and_isolates_a_bad_request(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    images, truth = held_out_digits()
    requests = [image_request(png_bytes(images[n]), request_id=f"r{n}") for n in range(20)]
    requests.insert(7, pb.ClassifyRequest(request_id="bad", image=b"not an image"))
    requests.insert(9, pb.ClassifyRequest(request_id="nomodel", model="nope", image=b"x"))
    responses = {r.request_id: r for r in stub.ClassifyStream(iter(requests), timeout=60)}
    assert set(responses) == {r.request_id for r in requests}
    assert responses["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "cannot decode image" in responses["bad"].error.message
    assert responses["nomodel"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    good = [responses[f"r{n}"] for n in range(20)]
    assert all(not r.HasField("error") for r in good)
    assert accuracy(good, truth[:20]) >= 0.9


def test_a_stream_longer_than_its_in_flight_limit_is_answered_in_full(channel: grpc.Channel) -> None:
    images, truth = held_out_digits()
    count = MAX_STREAM_IN_FLIGHT + 44  # past the limit the server reads as the answers are read: none is lost
    requests = [tensor_request(images[n % len(images)], request_id=f"s{n}") for n in range(count)]
    responses = {r.request_id: r for r in pb_grpc.ClassifierStub(channel).ClassifyStream(iter(requests), timeout=60)}
    assert set(responses) == {f"s{n}" for n in range(count)}
    assert not any(r.HasField("error") for r in responses.values())
    assert accuracy([responses[f"s{n}"] for n in range(count)], [truth[n % len(truth)] for n in range(count)]) >= 0.95


def test_list_and_get_model_describe_versions_and_failures(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert list(models) == sorted(models)
    digits = stub.GetModel(pb.GetModelRequest(), timeout=10)
    assert digits.name == "digits" and digits.is_default
    assert digits.num_labels == 10 and digits.device == "cpu" and digits.max_batch_size == 64
    assert (digits.input.height, digits.input.width, digits.input.channels, digits.input.color) == (8, 8, 1, "L")
    assert [(v.version, v.state) for v in digits.versions] == [(1, pb.VersionInfo.READY)]
    broken = models["broken"].versions[0]
    assert broken.state == pb.VersionInfo.FAILED
    assert "cannot read weights" in broken.error
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(model="nope"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_health_reports_server_and_each_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "digits", "wide"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == serving
    broken = health.Check(health_pb2.HealthCheckRequest(service="broken"), timeout=10)
    assert broken.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_classifier_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert {"classifier.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_health_answers_while_the_model_is_saturated(daemon: DaemonThread, channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    request = tensor_request(np.zeros((8, 8), np.uint8), model="gated")
    GATE.close()
    try:
        pending = [stub.Classify.future(request, timeout=60) for _ in range(40)]
        assert GATE.entered.acquire(timeout=20)  # the inference thread is busy, 39 requests queue behind it
        for _ in range(20):
            status = health.Check(health_pb2.HealthCheckRequest(service="gated"), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert stub.ListModels(pb.ListModelsRequest(), timeout=2).models
    finally:
        GATE.open.set()
    sizes = [f.result().batch_size for f in pending]
    assert max(sizes) == 4  # the queue drained in full batches of the manifest's max_batch_size


def test_server_keeps_serving_while_requests_are_cancelled(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    request = tensor_request(np.zeros((8, 8), np.uint8), model="gated")
    GATE.close()
    try:
        calls = [stub.Classify.future(request, timeout=60) for _ in range(8)]
        assert GATE.entered.acquire(timeout=20)
        for call in calls[1:]:
            call.cancel()
    finally:
        GATE.open.set()
    assert calls[0].result().predictions
    assert stub.Classify(request, timeout=20).predictions


def test_full_queue_is_resource_exhausted_at_once(channel: grpc.Channel) -> None:
    stub = pb_grpc.ClassifierStub(channel)
    request = tensor_request(np.zeros((8, 8), np.uint8), model="narrow")
    GATE.close()
    try:
        computing = stub.Classify.future(request, timeout=60)
        assert GATE.entered.acquire(timeout=20)
        queued = [stub.Classify.future(request, timeout=60) for _ in range(2)]
        rejected = None
        while rejected is None:  # an earlier request may still be preprocessing, so the queue fills a bit later
            extra = stub.Classify.future(request, timeout=60)
            try:
                rejected = extra.exception(timeout=2)
            except grpc.FutureTimeoutError:
                queued.append(extra)
        assert len(queued) <= 4
        assert rejected.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model narrow" in rejected.details() and "max_queue=2" in rejected.details()
    finally:
        GATE.open.set()
    assert computing.result().predictions and all(f.result().predictions for f in queued)
