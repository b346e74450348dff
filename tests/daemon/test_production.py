"""Production behaviour in a real daemon: shedding, deadlines, cancellation, failure isolation, request logs."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.ops.logs import JsonFormatter
from tests.support.daemon_process import DaemonProcess
from tests.support.faults import COMPUTED, computed_items
from tests.support.kit import GATE, REPO, DaemonThread, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)
SMALL = {"color": "L", "size": 8, "resize": 8}
BLANK = np.zeros((8, 8), np.uint8)
MARKED = np.zeros((8, 8), np.uint8)
MARKED[0, 0] = 255  # tests/support/faults.py FussyModel refuses an input whose top-left pixel outshines its neighbour


def build_repository(root: Path) -> Path:
    shutil.copytree(REPO / "models" / "digits", root / "digits")
    write_model(root, "slow", architecture="classifyd:test_slow",
                manifest={"input": SMALL, "model_args": {"delay_s": 0.05, "tag": "slow"},
                          "batching": {"max_batch_size": 1, "max_queue": 64}})
    write_model(root, "held", architecture="classifyd:test_gated",
                manifest={"input": SMALL, "batching": {"max_batch_size": 4}})
    # Batches dispatch only when full (the delay never runs out in a test), so their membership is exact.
    full_only = {"max_batch_size": 4, "max_delay_ms": 600000}
    write_model(root, "fussy", architecture="classifyd:test_fussy",
                manifest={"input": SMALL, "model_args": {"oom_above": 64, "tag": "fussy"}, "batching": full_only})
    write_model(root, "oom", architecture="classifyd:test_fussy",
                manifest={"input": SMALL, "model_args": {"oom_above": 2, "tag": "oom"},
                          "batching": {"max_batch_size": 8, "max_delay_ms": 600000}})
    write_model(root, "nomem", architecture="classifyd:test_fussy",
                manifest={"input": SMALL, "model_args": {"oom_above": 0, "tag": "nomem"},
                          "batching": {"max_batch_size": 2, "max_delay_ms": 600000}})
    return root


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    with running_daemon(build_repository(tmp_path_factory.mktemp("models")), watch=False) as running:
        yield running


@pytest.fixture
def stub(daemon: DaemonThread) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


async def gather_outcomes(target: str, requests: list[pb.ClassifyRequest],
                          timeout: float = 60) -> list[pb.ClassifyResponse | grpc.aio.AioRpcError]:
    """Send every request at once; each outcome is a response or the error it got."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        return list(await asyncio.gather(*(stub.Classify(r, timeout=timeout) for r in requests),
                                         return_exceptions=True))


def failures(outcomes: list[object]) -> list[grpc.aio.AioRpcError]:
    return [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]


# ----- deadlines and cancellation (a request whose deadline passes in the queue: tests/daemon/test_daemon.py)


def wait_for_depth(daemon: DaemonThread, model: str, depth: int) -> None:
    """Wait until ``depth`` requests of ``model`` are admitted and not yet in a batch."""
    deadline = time.monotonic() + 20
    while daemon.daemon.service.queue_depths().get(model, (0, 0))[0] != depth:
        assert time.monotonic() < deadline, f"queue of {model} never reached {depth}"
        time.sleep(0.01)


def test_a_cancelled_queued_request_is_withdrawn_and_never_computed(daemon: DaemonThread,
                                                                   stub: pb_grpc.ClassifierStub) -> None:
    request = tensor_request(BLANK, model="held")
    GATE.close()
    try:
        blocker = stub.Classify.future(request, timeout=60)
        assert GATE.entered.acquire(timeout=20)
        cancelled = [stub.Classify.future(request, timeout=60) for _ in range(3)]
        wait_for_depth(daemon, "held", 3)
        for call in cancelled:
            call.cancel()
        wait_for_depth(daemon, "held", 0)  # withdrawn from the queue while the model is still busy
    finally:
        GATE.open.set()
    assert blocker.result().predictions
    assert stub.Classify(request, timeout=20).batch_size == 1
    assert all(c.cancelled() for c in cancelled)
    assert GATE.batches == [1, 1]


def test_a_deadline_the_queue_cannot_meet_is_rejected_at_once(daemon: DaemonThread,
                                                              stub: pb_grpc.ClassifierStub) -> None:
    request = tensor_request(BLANK, model="slow")
    for _ in range(3):  # teach the moving average: >= 0.05 s per batch of one
        stub.Classify(request, timeout=20)
    before = computed_items("slow")
    backlog = [stub.Classify.future(request, timeout=60) for _ in range(40)]
    deadline = time.monotonic() + 20
    while daemon.daemon.service.queue_depths()["slow"][0] < 30 and time.monotonic() < deadline:
        time.sleep(0.01)  # (at least 30 of them admitted; the model computes one per batch meanwhile)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=1.0)  # about 30 batches of >= 0.05 s are ahead of it
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # gRPC's own expiry says "Deadline Exceeded"; this is the early rejection, before the request waited at all
    assert "model slow: deadline cannot be met" in caught.value.details()
    assert all(f.result().predictions for f in backlog)
    assert computed_items("slow") - before == 40  # the backlog only: the rejected request was never computed
    assert stub.Classify(request, timeout=20).predictions  # a deadline it can meet is accepted


# ----- failure isolation


def test_a_batch_that_raises_fails_only_its_requests_and_the_next_batch_succeeds(
        daemon: DaemonThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="classifyd.isolation")
    poisoned = [tensor_request(MARKED if n == 0 else BLANK, model="fussy", request_id=f"p{n}") for n in range(4)]
    outcomes = asyncio.run(gather_outcomes(daemon.target, poisoned))
    assert len(failures(outcomes)) == 4  # one batch of 4: all of it fails, with the model's error
    for error in failures(outcomes):
        assert error.code() is grpc.StatusCode.INTERNAL
        assert "model fussy version 1 failed on this batch: ValueError: marked input" in error.details()
    clean = asyncio.run(gather_outcomes(daemon.target, [tensor_request(BLANK, model="fussy") for _ in range(4)]))
    assert not failures(clean) and [r.batch_size for r in clean] == [4] * 4  # the model stays in service
    mixed = [tensor_request(MARKED if n == 5 else BLANK, model="fussy", request_id=f"m{n}") for n in range(8)]
    outcomes = asyncio.run(gather_outcomes(daemon.target, mixed))
    failed = failures(outcomes)
    assert len(failed) == 4 and isinstance(outcomes[5], grpc.aio.AioRpcError)  # the marked one's batch only
    assert sum(1 for o in outcomes if isinstance(o, pb.ClassifyResponse)) == 4
    messages = [r.getMessage() for r in caplog.records if r.name == "classifyd.isolation"]
    assert any("(1 in a row, 1 in all)" in m and "p0" in m for m in messages)
    assert any("(1 in a row, 2 in all)" in m and "m5" in m for m in messages)


def test_request_ids_enter_the_failure_log_escaped_and_capped(daemon: DaemonThread,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="classifyd.isolation")
    forged = "x\n2026-01-01 00:00:00 ERROR classifyd: forged line\r\u2028"
    ids = [forged, "y" * 5000, "plain-1", "plain-2"]
    requests = [tensor_request(MARKED if n == 0 else BLANK, model="fussy", request_id=i) for n, i in enumerate(ids)]
    outcomes = asyncio.run(gather_outcomes(daemon.target, requests))
    assert len(failures(outcomes)) == 4
    record = next(r for r in caplog.records if r.name == "classifyd.isolation" and "plain-1" in r.getMessage())
    message = record.getMessage()
    assert not any(c in message for c in "\n\r\u2028")  # a client's newline cannot forge a log line
    assert "'x\\n2026-01-01 00:00:00 ERROR classifyd: forged line\\r\\u2028'" in message
    assert "y" * 199 + "…" in message and "y" * 201 not in message
    assert sorted(len(i) for i in record.request_ids) == [7, 7, len(forged), 200]  # capped for JSON logs too


def test_out_of_memory_splits_the_batch_until_it_fits(daemon: DaemonThread) -> None:
    COMPUTED["oom"].clear()
    requests = [tensor_request(np.full((8, 8), n * 20, np.uint8), model="oom", top_k=4) for n in range(8)]
    outcomes = asyncio.run(gather_outcomes(daemon.target, requests))
    assert not failures(outcomes)
    assert [r.batch_size for r in outcomes] == [8] * 8
    assert COMPUTED["oom"] == [2, 2, 2, 2]  # 8 → 4 + 4 → 2 + 2 + 2 + 2: every request computed exactly once
    # "fussy" has the same weights (same architecture and seed) and never runs out of memory: the halves must
    # give every request the result an unsplit batch gives it.
    unsplit = asyncio.run(gather_outcomes(daemon.target, [pb.ClassifyRequest(model="fussy", top_k=4,
                                                                               tensor=r.tensor) for r in requests]))
    for split, whole in zip(outcomes, unsplit, strict=True):
        assert [p.index for p in split.predictions] == [p.index for p in whole.predictions]
        np.testing.assert_allclose([p.score for p in split.predictions], [p.score for p in whole.predictions],
                                   rtol=1e-5)


def test_out_of_memory_for_a_single_request_fails_it_with_internal(daemon: DaemonThread) -> None:
    outcomes = asyncio.run(gather_outcomes(daemon.target, [tensor_request(BLANK, model="nomem")] * 2))
    assert len(failures(outcomes)) == 2
    for error in failures(outcomes):
        assert error.code() is grpc.StatusCode.INTERNAL
        assert "ran out of memory even for a single request" in error.details()
    digits = asyncio.run(gather_outcomes(daemon.target, [tensor_request(BLANK)]))
    assert not failures(digits)  # other models are untouched


# ----- load shedding


def test_shed_requests_are_refused_before_preprocessing(daemon: DaemonThread, stub: pb_grpc.ClassifierStub) -> None:
    request = tensor_request(BLANK, model="slow")
    backlog = [stub.Classify.future(request, timeout=60) for _ in range(64 + 8)]
    shed = [f.exception() for f in backlog if f.exception() is not None]
    assert shed, "64 may wait and one computes: some of 72 requests must be shed"
    for error in shed:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "model slow: queue is full" in error.details() and "max_queue=64" in error.details()
    assert len(backlog) - len(shed) < 64 + 8  # accepted: what the queue holds, plus what drained meanwhile
    assert daemon.daemon.service.queue_depths()["slow"] == (0, 64)  # nothing is left counted against the limit


# ----- request ids and structured logs


def test_request_log_has_request_ids_as_json(daemon: DaemonThread, stub: pb_grpc.ClassifierStub,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="classifyd.requests")
    named = stub.Classify(tensor_request(BLANK, request_id="abc-123"), timeout=20)
    anonymous = stub.Classify(tensor_request(BLANK), timeout=20)
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(model="nope", request_id="bad-1", image=b"x"), timeout=20)
    assert named.request_id == "abc-123"
    assert len(anonymous.request_id) == 16  # generated, so the answer can be found in the log
    records = {r.request_id: r for r in caplog.records if r.name == "classifyd.requests"}
    assert {"abc-123", anonymous.request_id, "bad-1"} <= set(records)
    line = json.loads(JsonFormatter().format(records["abc-123"]))
    assert line["request_id"] == "abc-123" and line["model"] == "digits" and line["version"] == 1
    assert line["code"] == "OK" and line["batch_size"] == 1 and line["level"] == "DEBUG"
    assert "abc-123" in line["message"]
    bad = json.loads(JsonFormatter().format(records["bad-1"]))
    assert bad["code"] == "NOT_FOUND" and bad["level"] == "INFO" and "unknown model 'nope'" in bad["message"]


# ----- model code raising what asyncio cannot carry


@pytest.mark.process
def test_model_code_raising_stop_iteration_or_a_base_exception_fails_only_its_batch_and_sigterm_still_stops(
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    batching = {"max_batch_size": 4, "max_delay_ms": 600000}  # dispatched when full: batch membership is exact
    for name, raises in (("stops", "StopIteration"), ("bases", "BaseException"), ("cancels", "CancelledError")):
        write_model(models, name, architecture="classifyd:test_raising",
                    manifest={"input": SMALL, "model_args": {"raises": raises}, "batching": batching})
    with DaemonProcess(models, tmp_path, "--grace-seconds", "5") as daemon:
        for name, raises in (("stops", "StopIteration"), ("bases", "BaseException"), ("cancels", "CancelledError")):
            poisoned = [tensor_request(MARKED if n == 0 else BLANK, model=name) for n in range(4)]
            outcomes = asyncio.run(gather_outcomes(daemon.target, poisoned, timeout=30))
            assert len(failures(outcomes)) == 4, outcomes
            for error in failures(outcomes):
                assert error.code() is grpc.StatusCode.INTERNAL
                assert error.details() == (f"model {name} version 1 failed on this batch: {raises}: raised by model "
                                           "code (test model)")
            clean = asyncio.run(gather_outcomes(daemon.target, [tensor_request(BLANK, model=name)] * 4, timeout=30))
            assert not failures(clean) and [r.batch_size for r in clean] == [4] * 4  # the next batch works
        assert daemon.stop(timeout=60) == 0  # and shutdown completes
