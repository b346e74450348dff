"""ONNX Runtime behind the manifest: a shipped model.onnx (``architecture = "onnx"``) and ``runtime = "onnxruntime"``
(the built module exported, cached outside the repository and verified before it serves)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from safetensors.torch import load_file
from torch import nn

from client import image_request
from server.core.config import BatchingDefaults
from server.core.manifest import ManifestError, parse_manifest
from server.inference.devices import InferenceThreads
from server.inference.runtimes import OnnxRuntime
from server.models.loader import onnx
from server.models.loader.architectures import build_architecture
from server.models.loader.pipeline import Loaded, LoadFailed, LoadSettings, VersionLoader
from tests.models.test_model_formats import local_scores, scores
from tests.support.kit import encode, running_daemon, write_model

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

LABELS = ["cat", "dog", "fox", "owl"]
SMALL = {"model_args": {"width": 8}, "input": {"size": 32, "resize": 32, "crop": "none"},
         "batching": {"max_batch_size": 4, "autotune": False}}
NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # [input]'s default for RGB


def module_of(version_dir: Path) -> nn.Module:
    """The small_cnn the kit wrote into ``version_dir``, rebuilt from its weights."""
    module = build_architecture("classifyd:small_cnn", len(LABELS), 3, {"width": 8})
    module.load_state_dict(load_file(str(version_dir / "model.safetensors")))
    return module.eval()


def ship_as_onnx(root: Path, name: str, size: int = 32, seed: int = 0) -> tuple[Path, nn.Module]:
    """A model directory holding only model.onnx (exported from a random small_cnn) under architecture = "onnx"."""
    version_dir = write_model(root, name, labels=LABELS, manifest={**SMALL, "architecture": "onnx"}, seed=seed)
    module = module_of(version_dir)
    (version_dir / "model.safetensors").unlink()
    torch.onnx.export(module, (torch.zeros(2, 3, size, size),), str(version_dir / "model.onnx"),
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return version_dir, module


@pytest.fixture
def inference() -> Iterator[InferenceThreads]:
    thread = InferenceThreads()
    yield thread
    thread.shutdown()


def load(inference: InferenceThreads, version_dir: Path, cache_dir: Path) -> Loaded:
    async def go() -> Loaded:
        loader = VersionLoader(LoadSettings(torch.device("cpu"), BatchingDefaults(), cache_dir=cache_dir), inference)
        try:
            return await loader.load(version_dir.parent.name, int(version_dir.name), version_dir)
        finally:
            loader.close()
    return asyncio.run(go())


def test_a_shipped_onnx_model_serves_without_pytorch_code_and_scores_like_the_module(tmp_path: Path) -> None:
    ship_as_onnx(tmp_path / "models", "animals")
    _, module = ship_as_onnx(tmp_path / "reference", "animals")  # same seed: the same weights
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with running_daemon(tmp_path / "models", watch=False) as daemon, grpc.insecure_channel(daemon.target) as channel:
        assert isinstance(daemon.daemon.manager.resolve("animals").runtime, OnnxRuntime)  # type: ignore[union-attr]
        stub = pb_grpc.ClassifierStub(channel)
        reply = stub.Classify(image_request(encode(pixels), model="animals", top_k=4), timeout=60)
        info = stub.GetModel(pb.GetModelRequest(model="animals"), timeout=60)
    assert (info.architecture, info.runtime) == ("onnx", "onnxruntime")
    np.testing.assert_allclose(scores(reply), local_scores(module, pixels, *NORM), atol=onnx.TOLERANCE)


def test_runtime_onnxruntime_exports_once_verifies_and_answers_like_pytorch(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS,
                              manifest={**SMALL, "runtime": "onnxruntime"})
    cache = tmp_path / "cache"
    first = load(inference, version_dir, cache)
    assert isinstance(first.version.runtime, OnnxRuntime)
    (cached,) = cache.glob("*.onnx")
    stamp = cached.stat().st_mtime_ns
    first.version.release()
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with running_daemon(tmp_path / "models", watch=False, cache_dir=cache) as daemon, \
            grpc.insecure_channel(daemon.target) as channel:
        serving = daemon.daemon.manager.resolve("animals")  # type: ignore[union-attr]
        assert isinstance(serving.runtime, OnnxRuntime) and serving.runtime.source == str(cached)
        reply = pb_grpc.ClassifierStub(channel).Classify(image_request(encode(pixels), model="animals", top_k=4),
                                                         timeout=60)
    assert list(cache.glob("*.onnx")) == [cached] and cached.stat().st_mtime_ns == stamp  # a cache hit: no re-export
    np.testing.assert_allclose(scores(reply), local_scores(module_of(version_dir), pixels, *NORM),
                               atol=onnx.TOLERANCE)


def test_an_onnx_graph_whose_input_does_not_fit_the_manifest_is_refused_by_name(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir, _ = ship_as_onnx(tmp_path, "animals", size=24)  # exported for 24 x 24, manifest says 32
    with pytest.raises(LoadFailed, match=r"input 'pixels' takes N x 3 x 24 x 24 but \[input\] gives N x 3 x 32 x 32"):
        load(inference, version_dir, tmp_path / "cache")


def test_a_file_onnx_runtime_cannot_read_fails_the_version_with_its_reason(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir, _ = ship_as_onnx(tmp_path, "animals")
    (version_dir / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(LoadFailed, match=r"model.onnx: ONNX Runtime cannot load it: .*INVALID_PROTOBUF") as caught:
        load(inference, version_dir, tmp_path / "cache")
    assert not caught.value.unexpected


def test_an_export_that_disagrees_with_pytorch_fails_the_version_naming_the_difference(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir = write_model(tmp_path / "models", "animals", labels=LABELS,
                              manifest={**SMALL, "runtime": "onnxruntime"})
    cache = tmp_path / "cache"
    load(inference, version_dir, cache).version.release()
    (cached,) = cache.glob("*.onnx")
    other, _ = ship_as_onnx(tmp_path / "other", "animals", seed=7)  # other weights under the same cache key
    shutil.copy(other / "model.onnx", cached)
    with pytest.raises(LoadFailed, match=r"largest probability difference [0-9.e-]+ \(tolerance 0.0001\)"):
        load(inference, version_dir, cache)


@pytest.mark.parametrize(("keys", "message"), [
    ({"architecture": "onnx", "runtime": "torch"}, 'architecture = "onnx" runs on ONNX Runtime only'),
    ({"runtime": "onnxruntime", "compile": "default"}, 'torch.compile does not apply to runtime = "onnxruntime"'),
    ({"runtime": "tensorrt"}, "must be one of torch, onnxruntime, auto; got 'tensorrt'"),
])
def test_runtime_keys_that_cannot_work_are_refused_by_the_manifest(tmp_path: Path, keys: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)) as caught:
        parse_manifest({"architecture": "classifyd:small_cnn", **keys}, tmp_path / "model.toml", tuple(LABELS))
    assert caught.value.key == "runtime"


def test_a_shipped_graph_with_a_batch_of_one_is_served_in_batches_of_one(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir, module = ship_as_onnx(tmp_path, "animals")
    torch.onnx.export(module, (torch.zeros(1, 3, 32, 32),), str(version_dir / "model.onnx"), dynamo=False)
    loaded = load(inference, version_dir, tmp_path / "cache")
    assert loaded.version.max_batch_size == 1
    assert loaded.version.predict([np.zeros((32, 32, 3), np.uint8)]).shape == (1, len(LABELS))
