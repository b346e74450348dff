"""A model with ``[input] decode = "device"`` served by a real daemon (device cpu: torchvision decodes there).

The same weights with ``decode = "cpu"`` (Pillow) answer alongside, so the two paths are compared end to end;
JPEGs, a PNG (always Pillow) and a corrupt JPEG share batches, and only the corrupt one fails.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from client.api import ClassifierClient
from server.inference import pipeline
from tests.support.kit import running_daemon, write_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BATCHING = {"max_batch_size": 8, "max_delay_ms": 300.0, "autotune": False}


def picture(height: int, width: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    base = base + rng.normal(0, 25, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("models")
    for name, decode in (("on_device", "device"), ("pillow", "cpu")):
        write_model(root, name, seed=7, manifest={"input": {"size": [32, 32], "resize": 36, "decode": decode},
                                                  "batching": BATCHING})
    with running_daemon(root, watch=False) as thread:
        yield thread


def scores(response: object) -> dict[str, float]:
    return {p.label: p.score for p in response.predictions}  # type: ignore[attr-defined]


def test_device_decoded_jpegs_score_like_pillow_decoded_ones(daemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    decoded: list[int] = []
    real = pipeline._decode_hwc

    def counting(jpegs, *args):  # type: ignore[no-untyped-def]
        decoded.append(len(jpegs))
        return real(jpegs, *args)

    monkeypatch.setattr(pipeline, "_decode_hwc", counting)
    images = [picture(480, 640, 1), picture(300, 200, 2), picture(64, 64, 3)]
    with ClassifierClient(daemon.target) as client:
        for image in images:
            device = client.classify(image, model="on_device", top_k=4)
            pillow = client.classify(image, model="pillow", top_k=4)
            assert device.predictions[0].label == pillow.predictions[0].label
            for label, score in scores(pillow).items():
                assert scores(device)[label] == pytest.approx(score, abs=0.02)
    assert decoded == [1, 1, 1]  # the "on_device" model's JPEGs went through the device path, the others not


def test_jpegs_pngs_and_a_corrupt_jpeg_share_a_batch_and_only_the_corrupt_one_fails(  # type: ignore[no-untyped-def]
        daemon) -> None:
    good = picture(240, 320, 4)
    corrupt = good[:600] + bytes(len(good) - 600)  # the header reads fine; decoding finds the damage
    png = picture(240, 320, 5, "PNG")
    payloads = [good, corrupt, png, picture(200, 260, 6)]
    with ClassifierClient(daemon.target) as client, ThreadPoolExecutor(len(payloads)) as pool:
        futures = [pool.submit(client.classify, p, model="on_device", top_k=1) for p in payloads]
        answers = []
        for future in futures:
            try:
                answers.append(future.result())
            except grpc.RpcError as exc:
                answers.append(exc)
    assert isinstance(answers[1], grpc.RpcError)
    assert answers[1].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in answers[1].details().lower()
    served = [a for i, a in enumerate(answers) if i != 1]
    assert all(not isinstance(a, grpc.RpcError) for a in served)
    assert max(a.batch_size for a in served) > 1  # they were computed together (300 ms batching window)
