"""Swap races in the batch pipeline: real versions loaded from real files, a real inference thread and pool.

A batch that spans versions (items kept on the version they were admitted with, others moved to the one that
serves now) must hold every version it uses until it is done; an item prepared for the input spec of the
version it was admitted with is redone for the new one, and one payload invalid for the new spec fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.batching.admission import Admission
from server.core.errors import InvalidInput
from server.inference.devices import InferenceThreads
from server.inference.pipeline import BatchItem, BatchPipeline, Computed
from server.inference.prepare import InputPreparer
from server.inference.runtime import LoadedVersion
from server.models.loader.pipeline import LoadSettings, VersionLoader
from tests.support.kit import GATE, encode, write_model

pytestmark = pytest.mark.timeout(60)
TINY = {"model_args": {"width": 8}, "batching": {"autotune": False}}


async def load(root: Path, name: str, version: int, manifest: dict[str, Any], architecture: str,
               inference: InferenceThreads) -> LoadedVersion:
    version_dir = write_model(root, name, version=version, architecture=architecture, manifest=manifest)
    loader = VersionLoader(LoadSettings(torch.device("cpu")), inference)
    try:
        return (await loader.load(name, version, version_dir)).version
    finally:
        loader.close()


def pipeline_for(serving: Callable[[], LoadedVersion], inference: InferenceThreads,
                 inputs: InputPreparer) -> BatchPipeline:
    """A pipeline whose unpinned items go to ``serving()``, as the manager's resolve sends them."""
    return BatchPipeline(lambda name, number: serving(), inference, inputs, Admission())


def item(admitted: LoadedVersion, payload: bytes | None = None, *, exact: bool = False) -> BatchItem:
    spec = admitted.manifest.input
    array = np.zeros((spec.height, spec.width, spec.channels), np.uint8)
    return BatchItem(array, spec, payload if payload is not None else encode(array[:, :, 0]), 0, admitted,
                     exact=exact)


def run(test: Callable[[InferenceThreads, InputPreparer], Any]) -> None:
    inference, inputs = InferenceThreads(), InputPreparer(2)
    try:
        asyncio.run(test(inference, inputs))
    finally:
        GATE.open.set()
        inputs.shutdown()
        inference.shutdown()


def test_a_version_retired_while_an_earlier_group_computes_stays_until_the_batch_is_done(tmp_path: Path) -> None:
    async def body(inference: InferenceThreads, inputs: InputPreparer) -> None:
        small = {**TINY, "input": {"color": "L", "size": 8, "resize": 8}}
        old = await load(tmp_path, "old", 1, {"input": small["input"]}, "classifyd:test_gated", inference)
        new = await load(tmp_path, "new", 2, small, "classifyd:small_cnn", inference)
        pipeline = pipeline_for(lambda: new, inference, inputs)
        GATE.close()
        # The first item stays on the version it was admitted with (a tile); the second moves to the new one.
        batch = asyncio.ensure_future(pipeline.run_batch("m", [item(old, exact=True), item(old)]))
        assert await asyncio.to_thread(GATE.entered.acquire, timeout=20)  # the first group is computing

        async def retire() -> None:  # what the manager does once a newer version took over
            await new.drained()
            await inference.for_version(new).run(new.release)

        retiring = asyncio.ensure_future(retire())
        await asyncio.sleep(0.05)
        GATE.open.set()
        results = await batch
        await retiring
        assert [type(r) for r in results] == [Computed, Computed], results
        assert [r.version for r in results if isinstance(r, Computed)] == [old, new]
        assert new.released  # released once the batch was done with it

    run(body)


def test_after_a_swap_that_changes_the_input_an_invalid_payload_fails_alone(tmp_path: Path) -> None:
    async def body(inference: InferenceThreads, inputs: InputPreparer) -> None:
        rgb = {**TINY, "input": {"color": "RGB", "size": 8, "resize": 8}}
        rgba = {**TINY, "input": {"color": "RGBA", "size": 8, "resize": 8}}  # no fill_alpha: RGB is refused
        old = await load(tmp_path, "old", 1, rgb, "classifyd:small_cnn", inference)
        new = await load(tmp_path, "new", 2, rgba, "classifyd:small_cnn", inference)
        pipeline = pipeline_for(lambda: new, inference, inputs)
        opaque = encode(np.full((8, 8, 3), 200, np.uint8))
        with_alpha = encode(np.full((8, 8, 4), 200, np.uint8))
        results = await pipeline.run_batch("m", [item(old, opaque), item(old, with_alpha), item(old, opaque)])
        assert isinstance(results[0], InvalidInput) and "fourth channel" in str(results[0])
        assert isinstance(results[2], InvalidInput)
        assert isinstance(results[1], Computed) and results[1].version is new
        assert results[1].probabilities.shape == (4,)

    run(body)
