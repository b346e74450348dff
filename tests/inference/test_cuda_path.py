"""The GPU path end to end on a CUDA device: nvJPEG decoding, pinned staging with two batches in flight,
bf16 + channels_last, and CUDA graphs through ``compile = "reduce-overhead"``.

Skipped without CUDA; benchmarks/gpu_bench.sh runs these on the GPU host (``pytest -k cuda``).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.api import ClassifierClient
from server.core.manifest import InputSpec
from server.inference.device_decode import decode_batch, probe
from server.inference.preprocess import preprocess
from tests.support.kit import running_daemon, write_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def photo_jpeg(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    base = base + rng.normal(0, 20, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_cuda_nvjpeg_decode_is_close_to_pillow() -> None:
    spec = InputSpec()
    payloads = [photo_jpeg(480, 640, seed) for seed in range(4)] + [photo_jpeg(300, 200, 9)]
    jobs = [probe(p, spec) for p in payloads]
    assert all(job is not None for job in jobs)
    decoded = decode_batch(jobs, spec, torch.device("cuda"))  # type: ignore[arg-type]
    for payload, tensor in zip(payloads, decoded, strict=True):
        assert isinstance(tensor, torch.Tensor) and tensor.is_cuda
        got = tensor.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        want = preprocess(payload, spec).astype(np.int16)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 2.0  # nvJPEG's IDCT and upsampling differ from libjpeg's


@pytest.fixture(scope="module")
def cuda_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    fast = {"precision": "bf16", "channels_last": True, "input": {"size": [64, 64], "resize": 72},
            "batching": {"max_batch_size": 8, "max_delay_ms": 50.0, "autotune": False}}
    write_model(root, "gpu_decode", seed=3, manifest={**fast, "input": {**fast["input"], "decode": "device"}})
    write_model(root, "pillow", seed=3, manifest={**fast, "input": {**fast["input"], "decode": "cpu"}})
    write_model(root, "graphs", seed=3, manifest={**fast, "compile": "reduce-overhead",
                                                  "compile_batch_sizes": [1, 2, 4, 8]})
    return root


def test_cuda_daemon_serves_gpu_decoded_staged_and_graph_compiled_models(cuda_models: Path) -> None:
    payloads = [photo_jpeg(480, 640, seed) for seed in range(12)]
    with running_daemon(cuda_models, device="cuda", watch=False) as daemon, \
            ClassifierClient(daemon.target) as client, ThreadPoolExecutor(12) as pool:
        answers = {name: list(pool.map(lambda p, n=name: client.classify(p, model=n, top_k=1), payloads))
                   for name in ("gpu_decode", "pillow", "graphs")}
    assert max(a.batch_size for a in answers["gpu_decode"]) > 1  # several batches in flight, staged
    agree = sum(a.predictions[0].label == b.predictions[0].label
                for a, b in zip(answers["gpu_decode"], answers["pillow"], strict=True))
    assert agree >= 10  # bf16 and another JPEG decoder: near-ties may flip
    assert [a.predictions[0].label for a in answers["graphs"]] == [a.predictions[0].label for a in answers["pillow"]]
