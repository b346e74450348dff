"""A daemon that is still loading: listening, NOT_SERVING, and saying which model is loading.

In-thread and deterministic: the ``gated`` model's warm-up blocks on :data:`tests.support.kit.GATE`, so the test
holds the load open while it asks, then lets it finish.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import tensor_request
from server.daemon import Daemon
from tests.support.kit import GATE, local_config, write_model

pytestmark = pytest.mark.timeout(120)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write_model(tmp_path, "gated", architecture="classifyd:test_gated",
                manifest={"input": {"color": "L", "size": 8, "resize": 8}, "batching": {"max_batch_size": 4}})
    return tmp_path


async def health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def while_loading(daemon: Daemon) -> None:
    """What a client sees while ``gated`` warms up: the server and the model NOT_SERVING, the version LOADING,
    Classify UNAVAILABLE "is loading", HTTP ready 400 and the status page's version LOADING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        assert await health(channel, "") == NOT_SERVING
        assert await health(channel, "gated") == NOT_SERVING
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model="gated"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model gated is loading" in (refused.value.details() or "")
        for unresolved in ("", "not-yet-read"):  # no default chosen yet, no model of that name read yet
            with pytest.raises(grpc.aio.AioRpcError) as starting:
                await stub.Classify(tensor_request(np.zeros((8, 8), np.uint8), model=unresolved), timeout=5)
            assert starting.value.code() == grpc.StatusCode.UNAVAILABLE, starting.value.details()
            assert "the daemon is starting" in (starting.value.details() or "")
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert [pb.VersionInfo.State.Name(v.state) for v in listed.models[0].versions] == ["LOADING"]
    base = f"http://127.0.0.1:{daemon.http_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v2/health/ready") as ready:
            assert ready.status == 400
        async with session.get(f"{base}/status.json") as status:
            page = await status.json()
    assert page["models"][0]["versions"][0]["state"] == "LOADING"


async def start_while_gated(daemon: Daemon) -> None:
    GATE.close()
    try:
        await daemon.listen()
        loading = asyncio.ensure_future(daemon.load())
        entered = await asyncio.to_thread(GATE.entered.acquire, timeout=30)  # the warm-up batch is running
        assert entered, "the gated model's warm-up never started"
        await while_loading(daemon)
    finally:
        GATE.open.set()
    await loading
    async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
        assert await health(channel, "") == SERVING
        assert await health(channel, "gated") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:  # once loaded, an unknown model is unknown
            await pb_grpc.ClassifierStub(channel).Classify(
                tensor_request(np.zeros((8, 8), np.uint8), model="not-yet-read"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_ports_answer_while_models_load_and_say_so(models: Path) -> None:
    async def main() -> None:
        daemon = Daemon(local_config(models, watch=False, http_port=0))
        try:
            await start_while_gated(daemon)
        finally:
            await daemon.stop(1.0)

    asyncio.run(main())
