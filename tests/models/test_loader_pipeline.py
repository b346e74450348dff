"""The loader pipeline (server.models.loader.pipeline) on its own: one version, no manager, no daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from server.core.config import BatchingDefaults
from server.core.manifest import Manifest
from server.inference.devices import InferenceThreads
from server.inference.isolation import ModelCodeError
from server.inference.runtime import LoadedVersion
from server.models.loader import pipeline
from server.models.loader.pipeline import Loaded, LoadFailed, LoadSettings, VersionLoader
from server.models.loader.validation import ValidationError
from tests.support.faults import BrokenInit
from tests.support.kit import write_model

pytestmark = pytest.mark.timeout(60)

SMALL = {"model_args": {"width": 8}, "input": {"color": "L", "size": 8, "resize": 8},
         "batching": {"max_delay_ms": 2.0, "autotune": False}}


@pytest.fixture
def inference() -> Iterator[InferenceThreads]:
    thread = InferenceThreads()
    yield thread
    thread.shutdown()


def load(inference: InferenceThreads, version_dir: Path, *, seen: list[Manifest] | None = None,
         batching: BatchingDefaults | None = None) -> Loaded:
    async def go() -> Loaded:
        loader = VersionLoader(LoadSettings(torch.device("cpu"), batching or BatchingDefaults()), inference)
        try:
            return await loader.load(version_dir.parent.name, int(version_dir.name), version_dir,
                                     on_manifest=None if seen is None else seen.append)
        finally:
            loader.close()
    return asyncio.run(go())


def test_a_good_version_loads_warmed_up_with_the_server_defaults_where_its_manifest_is_silent(
        tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir = write_model(tmp_path, "small", manifest=SMALL)
    seen: list[Manifest] = []
    loaded = load(inference, version_dir, seen=seen, batching=BatchingDefaults(max_batch_size=4, max_queue=7))
    version = loaded.version
    assert (version.name, version.version, version.device.type) == ("small", 1, "cpu")
    assert (version.max_batch_size, version.max_delay_ms, version.max_queue) == (4, 2.0, 7)
    assert loaded.validation_accuracy is None and loaded.seconds > 0  # no samples/ directory
    assert len(seen) == 2 and seen[-1] is version.manifest  # as read, then as the build resolved it
    assert version.predict([torch.zeros(8, 8, 1, dtype=torch.uint8).numpy()]).shape == (1, 4)


def test_a_manifest_that_does_not_parse_fails_without_a_manifest(tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir = write_model(tmp_path, "broken", manifest=SMALL)
    (version_dir.parent / "model.toml").write_text("architecture = [", encoding="utf-8")
    seen: list[Manifest] = []
    with pytest.raises(LoadFailed) as failed:
        load(inference, version_dir, seen=seen)
    assert failed.value.manifest is None and seen == []


def test_bad_weights_fail_with_the_manifest_that_was_read(tmp_path: Path, inference: InferenceThreads) -> None:
    version_dir = write_model(tmp_path, "noweights", manifest=SMALL)
    (version_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadFailed) as failed:
        load(inference, version_dir)
    assert failed.value.manifest is not None and failed.value.manifest.architecture == "classifyd:small_cnn"
    assert str(failed.value)  # the load error's own message


def test_a_version_failing_after_it_was_built_is_released(tmp_path: Path, inference: InferenceThreads,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[LoadedVersion] = []

    async def refuse(version: LoadedVersion, *args: object) -> float | None:
        built.append(version)
        raise ValidationError("accuracy 0.10 is below min_accuracy 0.90")

    monkeypatch.setattr(pipeline, "validate_version", refuse)
    with pytest.raises(LoadFailed, match="below min_accuracy") as failed:
        load(inference, write_model(tmp_path, "inaccurate", manifest=SMALL))
    assert isinstance(failed.value.__cause__, ValidationError)
    assert len(built) == 1 and built[0].released


def test_any_other_exception_fails_the_version_too_named_by_its_type_and_released(
        tmp_path: Path, inference: InferenceThreads, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[LoadedVersion] = []

    async def crash(version: LoadedVersion, *args: object) -> float | None:
        built.append(version)
        raise ZeroDivisionError("a bug, not a bad model")

    monkeypatch.setattr(pipeline, "validate_version", crash)
    with pytest.raises(LoadFailed) as failed:
        load(inference, write_model(tmp_path, "buggy", manifest=SMALL))
    assert str(failed.value) == "ZeroDivisionError: a bug, not a bad model"
    assert failed.value.unexpected and isinstance(failed.value.__cause__, ZeroDivisionError)
    assert built[0].released


def test_a_constructor_that_asserts_fails_the_version_and_nothing_it_built_stays_alive(
        tmp_path: Path, inference: InferenceThreads) -> None:
    BrokenInit.built.clear()
    version_dir = write_model(tmp_path, "asserts", architecture="classifyd:test_broken_init", module=nn.Linear(1, 4),
                              manifest={**SMALL, "model_args": {"raises": "AssertionError"}})
    with pytest.raises(LoadFailed) as failed:
        load(inference, version_dir)
    assert str(failed.value) == "AssertionError: input shape indivisible by patch size (test model)"
    assert failed.value.manifest is not None and failed.value.unexpected
    assert len(BrokenInit.built) == 1 and BrokenInit.built[0]() is None  # the half-built module was freed


@pytest.mark.parametrize("raises", ["StopIteration", "CancelledError", "BaseException"])
def test_a_constructor_raising_what_asyncio_cannot_carry_fails_the_version_instead_of_hanging(
        tmp_path: Path, inference: InferenceThreads, raises: str) -> None:
    version_dir = write_model(tmp_path, "odd", architecture="classifyd:test_broken_init", module=nn.Linear(1, 4),
                              manifest={**SMALL, "model_args": {"raises": raises}})
    with pytest.raises(LoadFailed) as failed:
        load(inference, version_dir)
    assert str(failed.value).startswith(f"{raises}: ")
    assert isinstance(failed.value.__cause__, ModelCodeError)
