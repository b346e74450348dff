"""Graceful shutdown of the real ``python -m server`` process: SIGTERM under load."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import tensor_request
from tests.support.kit import write_model
from tests.support.process import DaemonProcess

pytestmark = pytest.mark.timeout(180)
REQUEST = tensor_request(np.zeros((8, 8), np.uint8), model="slow")


def slow_repository(root: Path, delay_s: float) -> Path:
    write_model(root, "slow", architecture="classifyd:test_slow",
                manifest={"input": {"color": "L", "size": 8, "resize": 8},
                          "model_args": {"delay_s": delay_s, "tag": "shutdown"}, "batching": {"max_batch_size": 4}})
    return root


async def _timed(call: asyncio.Future[pb.ClassifyResponse]) -> tuple[object, float]:
    try:
        outcome: object = await call
    except grpc.aio.AioRpcError as exc:
        outcome = exc
    return outcome, time.monotonic()


async def _until_not_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
        except grpc.aio.AioRpcError:
            return  # the listener is already closed
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            return
        await asyncio.sleep(0.01)


async def _signal_under_load(daemon: DaemonProcess, count: int,
                             sig: signal.Signals = signal.SIGTERM) -> tuple[list[tuple[object, float]], float, list]:
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        accepted = [asyncio.ensure_future(_timed(stub.Classify(REQUEST, timeout=120))) for _ in range(count)]
        await asyncio.wait(accepted, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.5)  # every request has reached the server; most still wait in the queue
        signalled = time.monotonic()
        daemon.process.send_signal(sig)
        await _until_not_serving(channel)
        late = await asyncio.gather(*(stub.Classify(REQUEST, timeout=10) for _ in range(10)), return_exceptions=True)
        return list(await asyncio.gather(*accepted)), signalled, late


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tmp_path: Path) -> None:
    models = slow_repository(tmp_path / "models", delay_s=0.1)
    grace = 30.0
    with DaemonProcess(models, tmp_path, "--grace-seconds", str(grace), "--log-format", "json") as daemon:
        outcomes, signalled, late = asyncio.run(_signal_under_load(daemon, count=120))
        code = daemon.wait(timeout=grace + 30)
        exited = time.monotonic()
        log = daemon.log()
    errors = [o for o, _ in outcomes if not isinstance(o, pb.ClassifyResponse)]
    assert not errors, f"accepted requests lost: {errors[:3]}"
    assert sum(1 for _, answered in outcomes if answered > signalled) >= 10  # the queue drained after SIGTERM
    for error in late:
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.UNAVAILABLE
    assert code == 0, log
    assert exited - signalled < grace
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    # Everything Python logs is JSON; gRPC's C core writes its own lines ("I1128 12:00:00.000 …") to stderr.
    assert all(line.startswith("{") or re.match(r"[IWEF]\d{4} ", line) for line in log.splitlines() if line.strip())
    assert any("stopping: finishing in-flight requests" in line["message"] for line in lines)


def test_sigint_with_work_left_at_the_end_of_the_grace_period_still_exits_0_in_time(tmp_path: Path) -> None:
    models = slow_repository(tmp_path / "models", delay_s=0.5)  # 200 requests: 25 s of work
    with DaemonProcess(models, tmp_path, "--grace-seconds", "1", "--no-watch") as daemon:
        outcomes, signalled, _ = asyncio.run(_signal_under_load(daemon, count=200, sig=signal.SIGINT))
        code = daemon.wait(timeout=60)
        exited = time.monotonic()
    assert code == 0
    assert exited - signalled < 1 + 10  # the grace period, plus the batch running and the release of models
    answered = sum(1 for o, _ in outcomes if isinstance(o, pb.ClassifyResponse))
    assert 0 < answered < 200

