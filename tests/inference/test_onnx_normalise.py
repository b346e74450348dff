"""uint8 batches normalised inside the ONNX graph (server/inference/onnx_normalise.py) against the float path:
an exported module and a shipped ``architecture = "onnx"`` model, custom mean/std, grey and 4-channel inputs, float
batches on the same session, and a runtime switch between staging a batch and running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx as onnx_lib
import pytest
import torch

from server.core.manifest import load_manifest
from server.inference import onnx_normalise
from server.inference.devices import InferenceThreads
from server.inference.runtime import LoadedVersion
from server.inference.runtimes import OnnxRuntime, open_session
from server.models.loader import onnx
from server.models.loader.build import build_for_serving
from tests.models.test_onnx import LABELS, SMALL, load, ship_as_onnx
from tests.support.kit import write_model

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def torch_version(tmp_path: Path, **input_keys: Any) -> LoadedVersion:
    """A random small_cnn (32x32, stretched) as a version on PyTorch, with ``input_keys`` in its ``[input]``."""
    keys = {**SMALL, "input": {**SMALL["input"], **input_keys}}
    version_dir = write_model(tmp_path, "animals", labels=LABELS, manifest=keys)
    manifest = load_manifest(version_dir)
    module, manifest = build_for_serving(version_dir, manifest, torch.device("cpu"))
    return LoadedVersion(name="animals", version=1, manifest=manifest, module=module, device=torch.device("cpu"),
                         max_batch_size=8, max_delay_ms=0.0)


def exported(version: LoadedVersion, path: Path) -> OnnxRuntime:
    """``version``'s module exported as the loader exports it (the dynamo exporter: seconds), opened as the loader
    opens it."""
    onnx.export(version.module, version.manifest, path)
    return onnx.open_export(path)


def traced(version: LoadedVersion, path: Path, batch: int = 2) -> OnnxRuntime:
    """``version``'s module through the TorchScript-based exporter (quick), with a dynamic batch unless ``batch``
    is 1."""
    channels = version.manifest.input.channels
    dynamic = {"x": {0: "batch"}} if batch > 1 else None
    torch.onnx.export(version.module, (torch.zeros(batch, channels, 32, 32),), str(path), input_names=["x"],
                      dynamic_axes=dynamic, dynamo=False)
    return OnnxRuntime(open_session(path, 1), str(path))


def pixels(version: LoadedVersion, count: int = 6, seed: int = 0) -> list[np.ndarray]:
    spec = version.manifest.input
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (count, spec.height, spec.width, spec.channels), dtype=np.uint8))


def with_runtime(version: LoadedVersion, runtime: OnnxRuntime) -> LoadedVersion:
    version.runtime = runtime
    return version


@pytest.mark.slow
def test_an_exported_module_takes_uint8_batches_and_scores_like_the_float_path(tmp_path: Path) -> None:
    version = torch_version(tmp_path)
    images = pixels(version)
    want = version.predict(images)  # PyTorch, normalised by torch
    runtime = exported(version, tmp_path / "export.onnx")
    assert runtime.takes_pixels
    version.runtime = runtime
    got = version.predict(images)  # uint8 into the graph
    assert np.abs(got - want).max() <= onnx.TOLERANCE
    float_path = version.predict([image.astype(np.float32) / 255 for image in images])  # same session, float input
    assert np.abs(float_path - got).max() <= 1e-6


def test_the_uint8_path_does_not_go_through_the_float_input(tmp_path: Path) -> None:
    """A batch of uint8 images reaches the graph as uint8: the float input gets no rows."""
    version = torch_version(tmp_path)
    runtime = traced(version, tmp_path / "traced.onnx")
    fed: list[dict[str, np.ndarray]] = []
    session = runtime.session

    class Spy:
        def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
            fed.append(feed)
            return session.run(outputs, feed)

    runtime.session = Spy()  # type: ignore[assignment]
    with_runtime(version, runtime).predict(pixels(version, 3))
    assert fed[0][onnx_normalise.PIXELS].dtype == np.uint8 and fed[0][onnx_normalise.PIXELS].shape[0] == 3
    assert fed[0][runtime.input.name].shape[0] == 0


def test_a_shipped_onnx_model_takes_uint8_batches_and_scores_like_its_module(tmp_path: Path) -> None:
    version_dir, module = ship_as_onnx(tmp_path, "animals")
    inference = InferenceThreads()
    try:
        loaded = load(inference, version_dir, tmp_path / "cache").version
    finally:
        inference.shutdown()
    assert isinstance(loaded.runtime, OnnxRuntime) and loaded.runtime.takes_pixels
    assert loaded.runtime.input.name == "pixels"  # the graph's own input name, for float batches
    reference = LoadedVersion(name="animals", version=1, manifest=loaded.manifest, module=module,
                              device=torch.device("cpu"), max_batch_size=8, max_delay_ms=0.0)
    images = pixels(reference)
    assert np.abs(loaded.predict(images) - reference.predict(images)).max() <= onnx.TOLERANCE


@pytest.mark.parametrize("input_keys", [
    {"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.25, 0.125]},
    {"color": "L", "mean": [0.5], "std": [0.3]},
    {"color": "RGBA", "mean": [0.5, 0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2, 0.2]},
])
def test_custom_mean_std_grey_and_four_channel_inputs(tmp_path: Path, input_keys: dict[str, Any]) -> None:
    version = torch_version(tmp_path, **input_keys)
    images = pixels(version)
    want = version.predict(images)
    runtime = traced(version, tmp_path / "traced.onnx")
    assert runtime.takes_pixels
    assert np.abs(with_runtime(version, runtime).predict(images) - want).max() <= onnx.TOLERANCE


def test_a_runtime_switch_between_staging_and_running_a_batch_gives_the_same_scores(tmp_path: Path) -> None:
    """A batch is prepared (stacked, uint8) while the version runs on PyTorch and runs after the switch to ONNX
    Runtime, and the other way round; a float batch and a mixed one run on the pixel graph's float input."""
    version = torch_version(tmp_path)
    images = pixels(version, 4)
    want = version.predict(images)
    runtime = traced(version, tmp_path / "traced.onnx")
    eager = version.runtime
    staged = version.stage(images)  # prepared for PyTorch ...
    version.runtime = runtime  # ... switched between batches ...
    assert np.abs(version.predict(staged) - want).max() <= onnx.TOLERANCE  # ... run on ONNX Runtime
    staged = version.stage(images)
    version.runtime = eager
    assert np.abs(version.predict(staged) - want).max() <= 1e-6
    version.runtime = runtime
    mixed = [images[0].astype(np.float32) / 255, *images[1:]]  # stacked as float32 in 0..1
    assert np.abs(version.predict(mixed) - want).max() <= onnx.TOLERANCE


def test_a_graph_that_cannot_take_pixels_is_served_on_the_float_path(tmp_path: Path) -> None:
    version = torch_version(tmp_path)
    path = tmp_path / "fixed.onnx"
    runtime = traced(version, path, batch=1)
    assert "fixed batch" in onnx_normalise.unsupported(onnx_lib.load(str(path)))
    assert onnx_normalise.pixel_model(path) == path
    assert not runtime.takes_pixels
    image = pixels(version, 1)
    want = version.predict(image)
    assert np.abs(with_runtime(version, runtime).predict(image) - want).max() <= onnx.TOLERANCE
