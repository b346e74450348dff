"""Triton-style per-version statistics (server/ops/inference_stats.py), fed with real core reports."""

from __future__ import annotations

from server.core.errors import Status
from server.core.types import BatchReport, ClassifyResult, RequestReport
from server.ops.inference_stats import InferenceStats


def answered(model: str, version: int, *, cache_hit: bool = False) -> RequestReport:
    result = ClassifyResult([], model, version, batch_size=2, queue_s=0.001, compute_s=0.004, preprocess_s=0.002,
                            cache_hit=cache_hit)
    return RequestReport("r", model, 0, Status.OK, "", 0.010, result)


def test_requests_and_batches_are_counted_per_version_with_their_durations() -> None:
    stats = InferenceStats(clock=lambda: 1000.0)
    stats.batch_done(BatchReport("m", 2, 2, 0.004))
    stats.request_done(answered("m", 2))
    stats.request_done(answered("m", 2))
    stats.request_done(answered("m", 2, cache_hit=True))
    got = stats.of("m", 2)
    assert (got.success.count, got.success.ns) == (3, 30_000_000)
    assert (got.queue.count, got.queue.ns, got.compute_infer.ns, got.compute_input.ns) == (2, 2_000_000, 8_000_000,
                                                                                           4_000_000)
    assert got.cache_hit.count == 1 and got.last_inference_ms == 1_000_000
    assert (got.execution_count, got.inference_count, got.batches[2].count) == (1, 2, 1)
    assert stats.versions("m") == [2]


def test_a_failure_without_a_version_counts_against_the_newest_version_served_and_unknown_models_are_not_kept() -> None:
    stats = InferenceStats()
    stats.batch_done(BatchReport("m", 1, 1, 0.001))
    stats.batch_done(BatchReport("m", 3, 1, 0.001))
    stats.request_done(RequestReport("r", "m", 0, Status.INVALID_ARGUMENT, "bad image", 0.002))
    stats.request_done(RequestReport("r", "other", 0, Status.NOT_FOUND, "unknown model", 0.001))
    assert stats.of("m", 3).fail.count == 1 and stats.of("m", 1).fail.count == 0
    assert stats.versions("other") == []
