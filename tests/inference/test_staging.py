"""Staging a batch before its forward pass (server/inference/staging.py): stacking, slicing, and on CUDA pinned buffers.

The CUDA tests run on a GPU host only (benchmarks/gpu_bench.sh runs them there); the CPU ones everywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.core.manifest import load_manifest
from server.inference.isolation import predict_splitting_on_oom
from server.inference.runtime import LoadedVersion
from server.inference.staging import StagedBatch, Stager, stack
from server.models.loader.build import build_for_serving

REPO = Path(__file__).resolve().parents[2]


def digits_version(tmp_path: Path, device: str = "cpu", max_batch_size: int = 4) -> LoadedVersion:
    version_dir = tmp_path / "digits" / "1"
    shutil.copytree(REPO / "models" / "digits" / "1", version_dir)
    shutil.copy(REPO / "models" / "digits" / "labels.txt", tmp_path / "digits")
    shutil.copy(REPO / "models" / "digits" / "model.toml", tmp_path / "digits")
    manifest = load_manifest(version_dir)
    module, manifest = build_for_serving(version_dir, manifest, torch.device(device))
    return LoadedVersion(name="digits", version=1, manifest=manifest, module=module, device=torch.device(device),
                         max_batch_size=max_batch_size, max_delay_ms=0.0)


def images(count: int, shape: tuple[int, int, int] = (8, 8, 1), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def test_cpu_stage_stacks_the_arrays_in_order_and_slices_them() -> None:
    arrays = images(3)
    staged = Stager(torch.device("cpu")).stage(arrays, capacity=4)
    assert staged.ready is None
    assert staged.tensor.dtype == torch.uint8
    assert np.array_equal(staged.tensor.numpy(), np.stack(arrays))
    assert len(staged) == 3 and len(staged[1:]) == 2
    assert np.array_equal(staged[1:].tensor.numpy(), np.stack(arrays[1:]))


def test_mixed_uint8_and_float_inputs_stack_as_floats_in_0_to_1() -> None:
    uint8 = np.full((2, 2, 1), 255, np.uint8)
    floats = np.full((2, 2, 1), 0.25, np.float32)
    stacked = stack([uint8, floats])
    assert stacked.dtype == np.float32
    assert stacked[0].max() == 1.0 and stacked[1].max() == 0.25


def test_arrays_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        Stager(torch.device("cpu")).stage(images(1, (8, 8, 1)) + images(1, (9, 8, 1)), capacity=4)


def test_predict_on_a_staged_batch_equals_predict_on_its_arrays(tmp_path: Path) -> None:
    version = digits_version(tmp_path)
    arrays = images(4)
    assert np.allclose(version.predict(version.stage(arrays)), version.predict(arrays), atol=1e-6)
    # floats take the out-of-place path: the stacked input must stay as it was
    floats = [a.astype(np.float32) / 255.0 for a in arrays]
    before = [f.copy() for f in floats]
    assert np.allclose(version.predict(floats), version.predict(arrays), atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(floats, before, strict=True))


def test_out_of_memory_split_halves_a_staged_batch(tmp_path: Path) -> None:
    version = digits_version(tmp_path)
    staged = version.stage(images(4))
    seen: list[int] = []

    def predict(batch: StagedBatch) -> np.ndarray:
        assert isinstance(batch, StagedBatch)
        seen.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return version.predict(batch)

    splits: list[int] = []
    rows = predict_splitting_on_oom(predict, staged, splits)
    assert splits == [4, 2, 2] and seen == [4, 2, 1, 1, 2, 1, 1]
    assert np.allclose(np.stack(rows), version.predict(images(4)), atol=1e-6)


@pytest.mark.cuda
def test_cuda_stage_copies_from_pinned_memory_and_predicts_the_same(tmp_path: Path) -> None:
    version = digits_version(tmp_path, "cuda")
    arrays = images(4)
    staged = version.stage(arrays)
    assert staged.tensor.is_cuda and staged.ready is not None
    assert np.allclose(version.predict(staged), version.predict([*arrays]), atol=1e-5)


@pytest.mark.cuda
def test_cuda_pinned_buffers_are_reused_only_after_their_copy(tmp_path: Path) -> None:
    version = digits_version(tmp_path, "cuda")
    batches = [images(4, seed=seed) for seed in range(7)]  # more batches than pinned buffers in the ring
    staged = [version.stage(b) for b in batches]
    for arrays, batch in zip(batches, staged, strict=True):
        assert np.array_equal(batch.wait().cpu().numpy(), np.stack(arrays))
