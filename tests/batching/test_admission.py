"""Admission rules, out-of-memory splitting and the JSON log format, without a daemon."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from server.batching.admission import Admission, BatchTimes
from server.core.errors import DeadlineExpired, Overloaded
from server.inference.isolation import FailureLog, predict_splitting_on_oom
from server.ops.logs import JsonFormatter


def test_queue_limit_counts_waiting_and_preprocessing_requests() -> None:
    admission = Admission()
    tickets = [admission.admit("m", queued=1, max_queue=4, max_batch_size=2, deadline=None) for _ in range(3)]
    assert admission.preparing("m") == 3
    with pytest.raises(Overloaded, match=r"model m: queue is full \(4 waiting, max_queue=4\)"):
        admission.admit("m", queued=1, max_queue=4, max_batch_size=2, deadline=None)
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert admission.preparing("m") == 2
    admission.admit("m", queued=1, max_queue=4, max_batch_size=2, deadline=None)
    assert admission.preparing("other") == 0


def test_moving_average_of_batch_time() -> None:
    times = BatchTimes(alpha=0.5)
    times.observe(1.0)
    times.observe(3.0)
    assert times.seconds == pytest.approx(2.0)
    assert times.count == 2


def test_a_deadline_is_judged_only_once_enough_batches_were_seen() -> None:
    admission = Admission(alpha=1.0, min_batches=2)
    admission.observe_batch("m", 0.5)
    # One batch seen: no estimate yet, so even a hopeless deadline is admitted.
    admission.admit("m", queued=100, max_queue=1000, max_batch_size=1, deadline=1.0, now=0.0).release()
    admission.observe_batch("m", 0.5)
    assert admission.estimated_wait("m", 9, 4) == pytest.approx(1.0)  # two full batches ahead
    with pytest.raises(DeadlineExpired, match="model m: deadline cannot be met: 9 requests are ahead"):
        admission.admit("m", queued=9, max_queue=1000, max_batch_size=4, deadline=1.0, now=0.0)
    admission.admit("m", queued=9, max_queue=1000, max_batch_size=4, deadline=1.01, now=0.0)


def test_requests_that_fit_in_the_next_batch_are_never_rejected_early() -> None:
    admission = Admission(alpha=1.0, min_batches=1)
    admission.observe_batch("m", 10.0)
    # 3 ahead and batches of 4: no whole batch is ahead, so even 1 ms against 10 s batches is admitted.
    assert admission.estimated_wait("m", 3, 4) == 0.0
    ticket = admission.admit("m", queued=3, max_queue=100, max_batch_size=4, deadline=0.001, now=0.0)
    assert ticket.model == "m" and admission.preparing("m") == 1
    # One more ahead fills a batch before it: that one is refused, and nothing is counted for it.
    with pytest.raises(DeadlineExpired, match="4 requests are ahead"):
        admission.admit("m", queued=3, max_queue=100, max_batch_size=4, deadline=0.001, now=0.0)
    assert admission.preparing("m") == 1


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    calls: list[int] = []

    def predict(arrays: list[np.ndarray]) -> np.ndarray:
        calls.append(len(arrays))
        if len(arrays) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return np.stack([a.ravel()[:1] for a in arrays])

    splits: list[int] = []
    rows = predict_splitting_on_oom(predict, [np.full(3, n, np.float32) for n in range(7)], splits)
    assert [float(r[0]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # every row in its request's place
    assert splits == [7, 3, 4]
    assert calls == [7, 3, 1, 2, 4, 2, 2]


def test_a_single_request_that_does_not_fit_fails_alone() -> None:
    def predict(arrays: list[np.ndarray]) -> np.ndarray:
        if any(a[0] > 5 for a in arrays):
            raise torch.cuda.OutOfMemoryError("too big")
        return np.stack(arrays)

    rows = predict_splitting_on_oom(predict, [np.array([1.0]), np.array([9.0])], [])
    assert float(rows[0][0]) == 1.0
    assert isinstance(rows[1], torch.cuda.OutOfMemoryError) and rows[1].__traceback__ is None


def test_other_exceptions_are_not_split() -> None:
    def predict(arrays: list[np.ndarray]) -> np.ndarray:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        predict_splitting_on_oom(predict, [np.zeros(1)] * 4, [])


def test_failure_log_counts_runs_of_failures(caplog: pytest.LogCaptureFixture) -> None:
    failures = FailureLog()
    assert failures.failed("m", 1, 4, ValueError("x"), ["a", "b"]) == 1
    assert failures.failed("m", 1, 4, ValueError("x"), []) == 2
    failures.succeeded("m", 1)
    assert failures.failed("m", 1, 4, ValueError("x"), ["c"]) == 1  # the run ended; the total goes on
    messages = [record.getMessage() for record in caplog.records]
    assert "(2 in a row, 2 in all)" in messages[1] and "(1 in a row, 3 in all)" in messages[2]
    assert [record.exc_info is not None for record in caplog.records] == [True, False, True]  # once per run
    assert caplog.records[0].request_ids == ["a", "b"]


def test_json_formatter_writes_one_object_per_line_with_extra_fields() -> None:
    logger = logging.getLogger("test.json")
    record = logger.makeRecord("test.json", logging.WARNING, __file__, 1, "hello %s", ("世界",), None,
                               extra={"request_id": "r1", "latency_ms": 1.5})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "hello 世界" and data["level"] == "WARNING" and data["logger"] == "test.json"
    assert data["request_id"] == "r1" and data["latency_ms"] == 1.5 and data["time"].endswith("+00:00")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logger.makeRecord("test.json", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(JsonFormatter().format(record))["exception"]
