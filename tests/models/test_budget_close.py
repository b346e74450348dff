"""Shutting down the manager stops the work model control and the memory budget started around the loads: a load on
demand under way is cancelled, and its version is listed AVAILABLE rather than left LOADING."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.core.lifecycle import VersionState
from server.inference.devices import InferenceThreads
from server.models.control import EXPLICIT, ModelControl
from server.models.manager import ManagerSettings, ModelManager
from server.models.memory_budget import MemoryBudget
from tests.support.kit import GATE, write_model

pytestmark = pytest.mark.timeout(120)

GATED = {"input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 2}}


def test_closing_the_manager_cancels_a_load_on_demand(tmp_path: Path) -> None:
    write_model(tmp_path, "gated", architecture="classifyd:test_gated", manifest=GATED)
    threads = InferenceThreads()

    async def scenario() -> tuple[bool, int, list[VersionState]]:
        manager = ModelManager(ManagerSettings(tmp_path, torch.device("cpu"), default_runtime="torch"), threads)
        budget = MemoryBudget(manager, ModelControl(manager, EXPLICIT), 10**9, lazy=True)
        await manager.load_repository()  # explicit: listed AVAILABLE
        request = asyncio.get_running_loop().create_task(budget.resolve("gated", 0, None))
        while not GATE.batches:  # the warm-up's forward pass has started, and waits
            await asyncio.sleep(0.01)
        GATE.open.set()  # the forward pass may end now, but the cancel below reaches the load first (same step)
        await manager.aclose()
        loads_left = len(budget._loads)
        await asyncio.wait([request])
        return request.cancelled() or isinstance(request.exception(), Exception), loads_left, \
            [v.state for v in manager.get("gated").versions.values()]

    GATE.close()
    try:
        ended, loads_left, states = asyncio.run(scenario())
    finally:
        GATE.open.set()
        threads.shutdown()
    assert ended and loads_left == 0
    assert states == [VersionState.AVAILABLE]  # the cut-short load is listed again, not dropped or left LOADING
