"""The Open Inference Protocol's REST endpoints, called with Triton's own HTTP client against a real daemon."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.digits_data import held_out_digits, png_bytes
from tests.support.kit import GATE, DaemonThread, running_daemon
from tests.support.repository import DIGIT_LABELS, build_test_repository

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon_with_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = build_test_repository(tmp_path_factory.mktemp("models"))
    with running_daemon(root, http_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def oip(daemon_with_http: DaemonThread) -> Iterator[triton.InferenceServerClient]:
    client = client_for(daemon_with_http)
    yield client
    client.close()


def client_for(daemon: DaemonThread) -> triton.InferenceServerClient:
    assert daemon.daemon is not None
    return triton.InferenceServerClient(url=f"127.0.0.1:{daemon.daemon.http_port}", network_timeout=60.0)


def base64_images(images: list[np.ndarray]) -> triton.InferInput:
    """Triton's JSON convention for BYTES: each element a UTF-8 string, so the PNGs travel base64-encoded."""
    encoded = np.array([base64.b64encode(png_bytes(i)) for i in images], dtype=np.object_)
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(encoded, binary_data=False)
    return tensor


def top(k: int) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput("probabilities", binary_data=False, class_count=k)]


def failure(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_health_and_metadata(oip: triton.InferenceServerClient) -> None:
    assert oip.is_server_live() and oip.is_server_ready()
    assert oip.is_model_ready("digits") and oip.is_model_ready("digits", "1")
    assert not oip.is_model_ready("broken")
    assert not oip.is_model_ready("digits", "7")
    server = oip.get_server_metadata()
    assert server["name"] == "classifyd" and "classification" in server["extensions"]
    model = oip.get_model_metadata("digits")
    assert model["name"] == "digits" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert oip.get_model_metadata("digits", "1")["versions"] == ["1"]
    missing = failure(oip.get_model_metadata, "nope")
    assert missing.status() == "404" and "unknown model 'nope'" in missing.message()
    assert failure(oip.get_model_metadata, "digits", "7").status() == "404"


def test_base64_images_with_classification_give_chinese_top_k(oip: triton.InferenceServerClient) -> None:
    images, truth = held_out_digits()
    result = oip.infer("digits", [base64_images(images[:40])], outputs=top(3), request_id="r1")
    rows = result.as_numpy("probabilities")
    assert rows.shape == (40, 3)
    assert result.get_response()["id"] == "r1" and result.get_response()["model_version"] == "1"
    best = [str(row[0]).split(":") for row in rows]
    assert all(len(parts) == 3 and parts[2] == DIGIT_LABELS[int(parts[1])] for parts in best)
    assert np.mean([int(parts[1]) == t for parts, t in zip(best, truth[:40], strict=True)]) >= 0.9
    scores = [[float(str(entry).split(":")[0]) for entry in row] for row in rows]
    assert all(s == sorted(s, reverse=True) for s in scores)


def test_uint8_tensor_batch_over_binary_data_gives_probabilities(oip: triton.InferenceServerClient) -> None:
    images, truth = held_out_digits()
    batch = np.stack(images[:64])[:, :, :, None]  # [N, H, W, C]
    tensor = triton.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=True)  # Triton's binary tensor extension
    probabilities = oip.infer("digits", [tensor]).as_numpy("probabilities")
    assert probabilities.shape == (64, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert np.mean(probabilities.argmax(axis=1) == np.array(truth[:64])) >= 0.9
    as_png = oip.infer("digits", [base64_images(images[:64])], outputs=top(1)).as_numpy("probabilities")
    assert [int(str(r[0]).split(":")[1]) for r in as_png] == probabilities.argmax(axis=1).tolist()


def test_single_float_image_and_raw_bytes_and_pinned_version(oip: triton.InferenceServerClient) -> None:
    image = held_out_digits()[0][0]
    single = triton.InferInput("pixels", [8, 8, 1], "FP32")
    single.set_data_from_numpy((image / 255.0).astype(np.float32)[:, :, None], binary_data=False)
    probabilities = oip.infer("digits", [single], model_version="1").as_numpy("probabilities")
    assert probabilities.shape == (10,)  # no batch dimension in, none out
    raw = triton.InferInput("image", [1], "BYTES")
    raw.set_data_from_numpy(np.array([png_bytes(image)], dtype=np.object_), binary_data=True)
    from_png = oip.infer("digits", [raw]).as_numpy("probabilities")
    assert from_png.shape == (1, 10) and from_png[0].argmax() == probabilities.argmax()


def test_errors_have_the_grpc_consistent_status(oip: triton.InferenceServerClient) -> None:
    pixels = triton.InferInput("image", [1, 8, 8, 1], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.uint8), binary_data=False)
    cases = [
        ("404", "unknown model 'nope'", lambda: oip.infer("nope", [pixels])),
        ("404", "has no loaded version 7", lambda: oip.infer("digits", [pixels], model_version="7")),
        ("503", "model broken: no version is ready", lambda: oip.infer("broken", [pixels])),
        ("400", "'classification' must be an integer from 1 to the 10 labels",
         lambda: oip.infer("digits", [pixels], outputs=top(11))),
        ("400", "unknown output 'scores'",
         lambda: oip.infer("digits", [pixels], outputs=[triton.InferRequestedOutput("scores", binary_data=False)])),
    ]
    wrong_type = triton.InferInput("image", [1, 8, 8, 1], "INT32")
    wrong_type.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.int32), binary_data=False)
    cases.append(("400", "datatype must be BYTES (encoded images), UINT8 or FP32",
                  lambda: oip.infer("digits", [wrong_type])))
    not_png = triton.InferInput("image", [1], "BYTES")
    not_png.set_data_from_numpy(np.array([base64.b64encode(b"not an image")], dtype=np.object_), binary_data=False)
    cases.append(("400", "cannot decode image", lambda: oip.infer("digits", [not_png])))
    for status, words, call in cases:
        error = failure(call)
        assert (error.status(), words in error.message()) == (status, True), error.message()
    assert oip.infer("digits", [pixels]).as_numpy("probabilities").shape == (1, 10)


def test_triton_timeout_while_queued_is_504(daemon_with_http: DaemonThread,
                                           oip: triton.InferenceServerClient) -> None:
    pixels = triton.InferInput("image", [1, 8, 8, 1], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.uint8), binary_data=False)

    def blocking_call() -> np.ndarray:
        client = client_for(daemon_with_http)  # one client per thread: it runs on gevent
        try:
            return client.infer("gated", [pixels]).as_numpy("probabilities")
        finally:
            client.close()

    with ThreadPoolExecutor(1) as pool:
        GATE.close()
        try:
            blocker = pool.submit(blocking_call)
            assert GATE.entered.acquire(timeout=20)
            started = time.monotonic()
            late = failure(oip.infer, "gated", [pixels], timeout=300_000)  # microseconds, Triton's unit
            waited = time.monotonic() - started
        finally:
            GATE.open.set()
        assert late.status() == "504" and "timeout of 300 ms passed" in late.message()
        assert waited < 15
        assert blocker.result().shape == (1, 4)  # model gated has 4 labels
