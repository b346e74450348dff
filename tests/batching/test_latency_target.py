"""Latency target: the policy alone, the policy in a batcher on a fake clock, and a real daemon under load."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from torch import nn

from client import tensor_request
from server.batching.batcher import Batcher
from server.batching.curve import BatchCurve, BatchPoint
from server.batching.interface import DeadlineExpired, DeadlineUnreachable, QueueFull, QueueState, TargetUnreachable
from server.batching.policy import LatencyTargetPolicy
from server.core.manifest import parse_manifest
from server.inference.pipeline import ModelBatchers
from server.inference.runtime import LoadedVersion
from tests.support.batcher_harness import T0, FakeClock, Handler, run, settle, spawn
from tests.support.kit import DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)


def linear(base_s: float, per_item_s: float) -> Callable[[int], float]:
    return lambda size: base_s + per_item_s * size


CPU_LIKE = linear(0.002, 0.006)  # e(1) = 8 ms, e(6) = 38 ms, e(7) = 44 ms: each item costs almost what one alone does
GPU_LIKE = linear(0.005, 0.0001)  # e(1) = 5.1 ms, e(8) = 5.8 ms: a batch costs about what one item does


def state(depth: int = 0, *, oldest: float = 0.0, busy: int = 0, elapsed: float = 0.0, cap: int = 8,
          now: float = T0) -> QueueState:
    return QueueState(now, depth, oldest, busy, elapsed, cap)


# ----- the policy alone


def test_target_batch_is_the_largest_two_of_which_fit_the_budget() -> None:
    policy = LatencyTargetPolicy(CPU_LIKE, target_s=0.100)  # budget 80 ms: 2 × e(6) = 76 fits, 2 × e(7) = 88 not
    assert policy.target_batch(8) == 6
    assert policy.target_batch(4) == 4
    assert LatencyTargetPolicy(CPU_LIKE, target_s=0.010).target_batch(8) == 1


def test_batch_size_is_the_target_batch_whatever_the_oldest_waited() -> None:
    policy = LatencyTargetPolicy(CPU_LIKE, target_s=0.100)
    assert policy.batch_size(state(8)) == 6
    assert policy.batch_size(state(8, oldest=0.050)) == 6  # a smaller batch would push admitted items back
    assert policy.batch_size(state(8, cap=4)) == 4


def test_observed_slowdown_tightens_the_target_batch() -> None:
    policy = LatencyTargetPolicy(CPU_LIKE, target_s=0.100)
    for _ in range(9):
        policy.observe(6, 0.038)  # as measured
    policy.observe(6, 0.076)  # one batch in ten twice as slow: plan for it
    assert policy.scale == pytest.approx(1.0)
    policy.observe(6, 0.076)
    assert policy.scale == pytest.approx(2.0)
    assert policy.target_batch(8) == 3  # 2 × 2 × e(3) = 80 ms
    policy.observe(6, float("nan"))
    policy.observe(6, 0.0)
    assert policy.scale == pytest.approx(2.0)


def arrivals(policy: LatencyTargetPolicy, count: int, gap_s: float) -> float:
    """Feed ``count`` admitted arrivals ``gap_s`` apart; returns the time of the last."""
    now = T0
    for i in range(count):
        now = T0 + i * gap_s
        assert policy.admit(state(now=now), None) is None
    return now


def test_a_short_wait_never_pays_off_when_each_item_costs_almost_what_one_alone_does() -> None:
    policy = LatencyTargetPolicy(CPU_LIKE, target_s=1.0)
    last = arrivals(policy, 8, 0.0005)
    assert policy.collect(state(1, now=last)) == (0.0, 1)


def test_a_short_wait_pays_off_when_a_batch_costs_about_one_item() -> None:
    policy = LatencyTargetPolicy(GPU_LIKE, target_s=1.0)
    last = arrivals(policy, 8, 0.0005)
    wait, depth = policy.collect(state(1, now=last))
    assert 0 < wait <= GPU_LIKE(1)  # shorter than the batch itself
    assert depth > 1
    assert wait == pytest.approx((depth - 1) * 0.0005)  # the time the expected arrivals take


def test_no_wait_without_recent_arrivals_or_budget() -> None:
    policy = LatencyTargetPolicy(GPU_LIKE, target_s=1.0)
    last = arrivals(policy, 8, 0.0005)
    assert policy.collect(state(1, now=last + 0.5)) == (0.0, 1)  # traffic paused
    assert policy.collect(state(1, oldest=0.799, now=last)) == (0.0, 1)  # the oldest item has no time to spare
    assert LatencyTargetPolicy(GPU_LIKE, target_s=1.0).collect(state(1)) == (0.0, 1)  # no arrivals seen


# ----- the policy in a batcher, on a fake clock


def make(handler: Handler, clock: FakeClock, policy: LatencyTargetPolicy | Any, **kwargs: Any) -> Batcher[Any, Any]:
    batcher: Batcher[Any, Any] = Batcher(handler, clock=clock, name="m", policy=policy, **kwargs)
    batcher.start()
    return batcher


async def busy_cpu_like() -> tuple[FakeClock, Handler, Batcher[Any, Any], asyncio.Task[Any]]:
    """A batcher with a 100 ms target over CPU_LIKE, computing the (gated) batch [0] since T0."""
    clock = FakeClock()
    handler = Handler(gated=True)
    batcher = make(handler, clock, LatencyTargetPolicy(CPU_LIKE, target_s=0.100), max_batch_size=8)
    first = spawn(batcher, 0)[0]
    await settle()
    assert handler.batches == [[0]]  # busy with e(1) = 8 ms left
    return clock, handler, batcher, first


def test_arrivals_beyond_the_target_are_rejected_at_once_and_admitted_ones_form_target_batches() -> None:
    async def body() -> None:
        clock, handler, batcher, first = await busy_cpu_like()
        admitted = spawn(batcher, *range(1, 7))  # 8 + 38 = 46 ms each: within the 80 ms budget
        await settle()
        assert batcher.queue_depth == 6
        with pytest.raises(TargetUnreachable, match=r"m: cannot meet latency target 100 ms: the queue would take "
                                                     r"about 84 ms \(6 requests waiting, batches of 6 take about "
                                                     r"38 ms\)") as caught:
            await batcher.submit(7)
        assert isinstance(caught.value, QueueFull)
        clock.advance(0.006)  # 2 ms left of the running batch: 2 + 2 × 38 = 78 ms fits
        admitted += spawn(batcher, 7)
        await settle()
        assert batcher.queue_depth == 7
        clock.advance(0.002)  # the running batch took e(1) as estimated: the policy's correction stays 1.0
        handler.gate.set()
        await asyncio.gather(first, *admitted)
        assert handler.sizes == [1, 6, 1]
        await batcher.aclose()

    run(body)


def test_a_deadline_that_cannot_be_met_is_rejected_at_once() -> None:
    async def body() -> None:
        _, handler, batcher, first = await busy_cpu_like()
        with pytest.raises(DeadlineUnreachable, match=r"m: cannot meet the request's deadline: 12 ms left, and "
                                                      r"computing it behind the queue takes about 16 ms") as caught:
            await batcher.submit(1, deadline=T0 + 0.012)  # 8 ms left of the running batch + e(1) = 8 ms
        assert isinstance(caught.value, DeadlineExpired)
        ok = spawn(batcher, 2, deadline=T0 + 0.050)[0]
        await settle()
        handler.gate.set()
        assert (await ok).value == 20
        await first
        assert handler.batches == [[0], [2]]
        await batcher.aclose()

    run(body)


def test_batcher_waits_for_expected_arrivals_then_dispatches_when_they_came() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, LatencyTargetPolicy(GPU_LIKE, target_s=0.100), max_batch_size=8)
        tasks: list[asyncio.Task[Any]] = []
        for item in range(4):  # arrivals 0.5 ms apart: the first three find too few arrivals to know a rate
            clock.advance(0.0005 if item else 0.0)
            tasks += spawn(batcher, item)
            await settle()
        assert handler.batches == [[0], [1], [2]]  # item 3 is collecting: four more lower the summed latency
        assert clock.sleep_calls == [pytest.approx(0.002)]
        for item in range(4, 8):  # 1.9 to 3.1 ms: before the wait ends at 3.5 ms
            clock.advance(0.0004)
            tasks += spawn(batcher, item)
            await settle()
        assert handler.batches == [[0], [1], [2], [3, 4, 5, 6, 7]]  # dispatched on arrival, before the timer
        await asyncio.gather(*tasks)
        assert clock.pending_sleeps == 0
        await batcher.aclose()

    run(body)


class BrokenPolicy:
    def __getattr__(self, name: str) -> Any:
        def fail(*args: object) -> Any:
            raise RuntimeError(f"{name} is broken")

        return fail


def test_a_faulty_policy_falls_back_to_the_plain_rules(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, FakeClock(), BrokenPolicy(), max_batch_size=4)
        first = spawn(batcher, 0)[0]
        await settle()
        queued = spawn(batcher, 1, 2, 3)
        await settle()
        handler.gate.set()
        assert [r.value for r in await asyncio.gather(first, *queued)] == [0, 10, 20, 30]
        assert handler.sizes == [1, 3]
        await batcher.aclose()

    with caplog.at_level(logging.ERROR, logger="classifyd.batcher"):
        run(body)
    assert "batch policy admit failed" in caplog.text
    assert "batch policy batch_size failed" in caplog.text


def test_configure_keeps_or_removes_the_policy() -> None:
    policy = LatencyTargetPolicy(CPU_LIKE, target_s=0.1)
    batcher: Batcher[Any, Any] = Batcher(Handler(), max_batch_size=4, policy=policy)
    batcher.configure(max_batch_size=2)
    assert batcher.policy is policy
    batcher.configure(policy=None)
    assert batcher.policy is None


# ----- a real daemon


# Batch time 30 ms + 15 ms per item: e(6) = 120 ms, e(7) = 135 ms. Target 320 ms → budget 256 ms → batches of at
# most 6 (two of them fit), capacity about 50 requests/s.
TARGET_MS = 320.0
PACED = {"base_ms": 30.0, "per_item_ms": 15.0, "knee": 8, "slow_ms": 15.0}
TINY_INPUT = {"color": "L", "size": 4, "resize": 4}
REQUEST = tensor_request(np.zeros((4, 4), dtype=np.uint8), model="target")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    write_model(root, "target", architecture="classifyd:test_paced", manifest={
        "model_args": PACED, "input": TINY_INPUT,
        "batching": {"autotune_max_batch_size": 8, "autotune_budget_s": 5, "latency_target_ms": TARGET_MS}})
    write_model(root, "sluggish", architecture="classifyd:test_paced", manifest={
        "model_args": {"base_ms": 300.0, "per_item_ms": 0.0}, "input": TINY_INPUT,
        "batching": {"max_batch_size": 1, "latency_target_ms": 2000}})
    with running_daemon(root) as running:
        yield running


def paced_batch_s(size: int) -> float:
    return (PACED["base_ms"] + PACED["per_item_ms"] * size) / 1000


@dataclass
class Outcomes:
    ok: list[tuple[float, float, int, float]] = field(default_factory=list)  # client, queue + compute, batch, compute
    rejected: list[tuple[float, str]] = field(default_factory=list)  # (client latency s, message)
    other: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)

    def p99(self, column: int) -> float:
        return float(np.percentile([row[column] for row in self.ok], 99))

    def check_p99_under_target(self) -> None:
        # The target bounds queue + compute, what the batcher controls and responses report. The client also sees
        # preprocessing, gRPC and, here, a GIL shared with the test's client threads on a busy 2-core machine:
        # bounded generously, it still catches requests that queued anywhere else.
        assert self.p99(1) <= TARGET_MS / 1000
        assert self.p99(0) <= 1.5 * TARGET_MS / 1000

    @contextmanager
    def unless_the_machine_stalled(self) -> Iterator[None]:
        """Timing assertions; if they fail while the machine stalled the model itself, skip instead: no policy can
        keep a target when a batch that sleeps 60 ms takes 600 (seen here while other test suites ran)."""
        try:
            yield
        except AssertionError:
            stalls = [compute for _, _, size, compute in self.ok if compute > 2 * paced_batch_s(size)]
            if stalls:
                pytest.skip(f"{len(stalls)} batches took over twice their sleep (up to {max(stalls) * 1000:.0f} "
                            "ms): the machine was too busy to time anything")
            raise


def drive(daemon: DaemonThread, clients: int, seconds: float, backoff_s: float = 0.1) -> Outcomes:
    """``clients`` threads calling Classify back to back for ``seconds``; a rejected client backs off a little."""
    outcomes = Outcomes()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(stub: pb_grpc.ClassifierStub) -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                response = stub.Classify(REQUEST, timeout=10)
            except grpc.RpcError as exc:
                with lock:
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        outcomes.rejected.append((time.monotonic() - started, exc.details()))
                    else:
                        outcomes.other.append((exc.code(), exc.details()))
                time.sleep(backoff_s)
                continue
            with lock:
                outcomes.ok.append((time.monotonic() - started, (response.queue_us + response.compute_us) / 1e6,
                                    response.batch_size, response.compute_us / 1e6))

    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        threads = [threading.Thread(target=client, args=(stub,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return outcomes


def test_get_model_reports_the_target_and_the_curve(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        info = pb_grpc.ClassifierStub(channel).GetModel(pb.GetModelRequest(model="target"))
    assert info.latency_target_ms == TARGET_MS
    assert (info.max_batch_size, info.autotuned) == (8, True)
    assert [p.batch_size for p in info.batch_curve] == [1, 2, 4, 8]


def test_at_a_load_the_target_allows_p99_stays_under_it(daemon: DaemonThread) -> None:
    outcomes = drive(daemon, clients=3, seconds=2.5)
    assert outcomes.other == []
    with outcomes.unless_the_machine_stalled():
        assert outcomes.rejected == []
        assert len(outcomes.ok) >= 20
        outcomes.check_p99_under_target()


def test_at_overload_excess_is_rejected_early_and_accepted_requests_meet_the_target(daemon: DaemonThread) -> None:
    outcomes = drive(daemon, clients=16, seconds=3.0)
    assert outcomes.other == []
    assert outcomes.rejected, "16 closed-loop clients should exceed what the target allows (about 10 at once)"
    assert all(f"cannot meet latency target {TARGET_MS:.0f} ms" in message for _, message in outcomes.rejected)
    assert max(row[2] for row in outcomes.ok) <= 6  # the target, not the cap of 8, limits batches
    with outcomes.unless_the_machine_stalled():
        assert max(latency for latency, _ in outcomes.rejected) < TARGET_MS / 1000  # never waited in the queue
        assert len(outcomes.ok) >= 40  # about 50/s fit the target: it costs little throughput
        outcomes.check_p99_under_target()


def test_a_deadline_the_model_cannot_meet_is_rejected_before_it_passes(daemon: DaemonThread) -> None:
    request = tensor_request(np.zeros((4, 4), dtype=np.uint8), model="sluggish")
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(request, timeout=0.15)  # one batch takes 300 ms
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "cannot meet the request's deadline" in caught.value.details()
        assert stub.Classify(request, timeout=10).predictions  # with time enough it is computed


def test_the_policy_follows_a_curve_measured_again_after_a_runtime_switch() -> None:
    manifest = parse_manifest({"architecture": "classifyd:small_cnn", "input": {"size": 4, "resize": 4},
                               "batching": {"latency_target_ms": 100}}, Path("model.toml"), ("a", "b"))
    version = LoadedVersion(name="m", version=1, manifest=manifest, module=nn.Identity(), device=torch.device("cpu"),
                            max_batch_size=8, max_delay_ms=0.0,
                            batch_curve=BatchCurve((BatchPoint(1, 0.010), BatchPoint(8, 0.080)), 8, False))
    policy = ModelBatchers(lambda name, items: asyncio.sleep(0))._policy_for(version)
    assert policy is not None and policy.estimate(8) == pytest.approx(0.080)
    version.batch_curve = BatchCurve((BatchPoint(1, 0.002), BatchPoint(8, 0.016)), 8, False)  # ONNX Runtime's
    assert policy.estimate(8) == pytest.approx(0.016)
