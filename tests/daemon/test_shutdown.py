"""Graceful shutdown of the real ``python -m server`` process: SIGTERM under load.

Every call is answered OK or UNAVAILABLE (which a retry policy retries), never CANCELLED: while draining the
daemon still serves, then refuses with UNAVAILABLE, finishes what it accepted, and answers UNAVAILABLE what is
still queued when the grace period runs out; watch streams end at once instead of holding the stop.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import tensor_request
from tests.support.daemon_process import DaemonProcess
from tests.support.kit import write_model

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(180)]
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
    assert any("stopping: NOT_SERVING" in line["message"] for line in lines)


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
    # the queued ones are UNAVAILABLE before the grace period ends (retryable elsewhere), none CANCELLED
    codes = Counter(o.code() for o, _ in outcomes if isinstance(o, grpc.aio.AioRpcError))
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes



@dataclass
class Calls:
    """Client threads, each with a channel of its own, classifying until stopped (bounded by a time limit)."""

    target: str
    limit_s: float = 90.0
    outcomes: list[tuple[float, grpc.StatusCode, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        ends = time.monotonic() + self.limit_s
        with grpc.insecure_channel(self.target) as channel:
            classify = pb_grpc.ClassifierStub(channel).Classify
            while not self.stop.is_set() and time.monotonic() < ends:
                try:
                    classify(REQUEST, timeout=10)
                    self.outcomes.append((time.monotonic(), grpc.StatusCode.OK, ""))
                except grpc.RpcError as exc:
                    self.outcomes.append((time.monotonic(), exc.code(), exc.details() or ""))
                    time.sleep(0.01)  # refused at once once the daemon is gone: no need to spin


@dataclass
class Watched:
    """A server stream read to its end: when each message came, and how and when the stream ended."""

    messages: list[tuple[float, object]] = field(default_factory=list)
    ended: tuple[float, grpc.StatusCode] | None = None

    def read(self, stream: object) -> None:
        try:
            for message in stream:  # type: ignore[attr-defined]
                self.messages.append((time.monotonic(), message))
        except grpc.RpcError as exc:
            self.ended = (time.monotonic(), exc.code())


def test_continuous_load_across_sigterm_gets_only_ok_or_unavailable_and_watches_end_at_once(tmp_path: Path) -> None:
    models = slow_repository(tmp_path / "models", delay_s=0.02)
    drain, grace = 1.5, 20.0
    with DaemonProcess(models, tmp_path, "--drain-seconds", str(drain), "--grace-seconds", str(grace),
                       "--no-watch") as daemon:
        calls, health_watch, model_watch = Calls(daemon.target), Watched(), Watched()
        with grpc.insecure_channel(daemon.target) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            streams = [(health_watch, health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=120)),
                       (model_watch, pb_grpc.ClassifierStub(channel).WatchModels(pb.WatchModelsRequest(),
                                                                                 timeout=120))]
            threads = [threading.Thread(target=calls.run) for _ in range(6)]
            threads += [threading.Thread(target=watched.read, args=(stream,)) for watched, stream in streams]
            for thread in threads:
                thread.start()
            while sum(1 for _, code, _ in list(calls.outcomes) if code is grpc.StatusCode.OK) < 30:
                time.sleep(0.05)
            signalled = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            time.sleep(drain / 3)
            draining = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            code = daemon.wait(timeout=drain + grace + 30)
            exited = time.monotonic()
            time.sleep(0.5)  # the clients keep calling after the exit
            calls.stop.set()
            for thread in threads:
                thread.join(30)
    codes = Counter((code, details) for _, code, details in calls.outcomes if code is not grpc.StatusCode.OK)
    assert {code for code, _ in codes} <= {grpc.StatusCode.UNAVAILABLE}, codes
    assert code == 0, daemon.log(4000)
    assert draining == health_pb2.HealthCheckResponse.NOT_SERVING
    served_draining = [at for at, code, _ in calls.outcomes if code is grpc.StatusCode.OK
                       and signalled + 0.2 < at < signalled + drain - 0.2]
    assert len(served_draining) > 10  # NOT_SERVING at once, yet still serving while load balancers move away
    assert exited - signalled < drain + grace / 2  # the open watch streams did not hold the stop
    statuses = [m.status for _, m in health_watch.messages]  # type: ignore[attr-defined]
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    for watched in (health_watch, model_watch):
        assert watched.ended is not None and watched.ended[1] is grpc.StatusCode.UNAVAILABLE, watched.ended
        assert watched.ended[0] < exited
