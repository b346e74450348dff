"""The rollout comparison (server/inference/agreement.py) and the low-priority shadow lane
(server/inference/shadow.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server.core.manifest import Manifest
from server.inference.agreement import LabelMap, ScoreBoard
from server.inference.devices import InferenceThreads
from server.inference.shadow import ShadowJob, ShadowLane


def manifest(labels: tuple[str, ...], activation: str = "softmax", top_k: int = 2) -> Manifest:
    thresholds = (0.5,) * len(labels) if activation == "sigmoid" else ()
    return Manifest(Path("model.toml"), "classifyd:small_cnn", len(labels), labels, None, top_k, False,
                    activation=activation, thresholds=thresholds)


def test_labels_are_compared_by_text_whatever_their_order() -> None:
    serving = manifest(("cat", "dog", "fox"))
    reordered = manifest(("fox", "cat", "dog"))
    labels = LabelMap(serving, reordered)
    assert not labels.differ
    same = labels.compare(np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.7, 0.2]))  # the same answer, reordered
    assert (same.agreement, same.topk_overlap) == (1.0, 1.0) and same.mean_abs_diff == pytest.approx(0.0)
    other = labels.compare(np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.2, 0.7]))  # candidate says dog
    assert other.agreement == 0.0 and other.topk_overlap == 1.0
    assert other.mean_abs_diff == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_sigmoid_agreement_is_the_jaccard_overlap_of_the_reported_labels() -> None:
    serving = manifest(("a", "b", "c", "d"), "sigmoid", top_k=4)
    labels = LabelMap(serving, serving)
    compared = labels.compare(np.array([0.9, 0.8, 0.1, 0.1]), np.array([0.9, 0.2, 0.7, 0.1]))
    assert compared.agreement == pytest.approx(1 / 3)  # {a, b} vs {a, c}
    assert labels.compare(np.array([0.1] * 4), np.array([0.2] * 4)).agreement == 1.0  # nothing reported by either


def test_only_the_same_labels_in_the_same_order_may_answer_for_the_serving_version() -> None:
    serving = manifest(("cat", "dog", "fox"))
    assert LabelMap(serving, manifest(("cat", "dog", "fox"))).identical
    assert not LabelMap(serving, manifest(("fox", "cat", "dog"))).identical  # compared, never a canary
    assert not LabelMap(serving, manifest(("cat", "dog", "wolf"))).identical


def test_another_label_set_cannot_be_compared() -> None:
    assert LabelMap(manifest(("cat", "dog")), manifest(("cat", "wolf"))).differ
    assert ScoreBoard(labels_differ=True).scores().labels_differ


def test_the_compute_ratio_compares_medians_at_like_batch_sizes() -> None:
    board = ScoreBoard()
    assert board.compute_ratio() is None
    for per_item in (0.010, 0.011, 0.5):  # one preempted pass does not move the median
        board.serving.add(per_item, batch_items=8)
    board.serving.add(0.020, batch_items=1)
    board.candidate.add(0.03, batch_items=1)  # 30 ms alone against 20 ms: 1.5x
    assert board.compute_ratio() == pytest.approx(1.5)
    board.candidate.add(0.0165, batch_items=8)  # and 16.5 ms at 8 against 11 ms: weighted 1:1
    assert board.compute_ratio() == pytest.approx((0.03 + 0.0165) / (0.02 + 0.011))
    other = ScoreBoard()
    other.serving.add(0.01, batch_items=2)
    other.candidate.add(0.02, batch_items=4)  # no size in common: the medians over every size
    assert other.scores().compute_ratio == pytest.approx(2.0)


class FakeVersion:
    """What the lane needs of a LoadedVersion: its device, leases, a batch cap and a forward pass that takes
    ``seconds``."""

    def __init__(self, seconds: float, cap: int = 4) -> None:
        self.seconds, self.max_batch_size = seconds, cap
        self.device = torch.device("cpu")  # whose inference thread the lane uses
        self.leases = 0
        self.batches: list[int] = []
        self.started: list[float] = []

    def lease(self) -> None:
        self.leases += 1

    def unlease(self) -> None:
        self.leases -= 1

    def predict(self, inputs: list[np.ndarray]) -> np.ndarray:
        self.started.append(time.monotonic())
        self.batches.append(len(inputs))
        time.sleep(self.seconds)
        return np.stack([np.full(2, float(a.mean())) for a in inputs])


def test_shadow_work_waits_for_live_work_batches_and_keeps_to_its_share() -> None:
    async def scenario() -> tuple[FakeVersion, list[str], list[object], ShadowLane]:
        threads = InferenceThreads()
        inference = threads.for_device(torch.device("cpu"))
        lane = ShadowLane(threads)
        version = FakeVersion(0.02)
        order: list[str] = []
        answers: list[object] = []
        release = threading.Event()

        def live(name: str) -> None:
            order.append(name)
            release.wait(5)

        first = asyncio.ensure_future(inference.run(live, "live 1"))
        await asyncio.sleep(0.05)
        for i in range(6):
            job = ShadowJob(version, [np.full((2, 2, 1), i, dtype=np.uint8)], 0.2,  # type: ignore[arg-type]
                            lambda rows, per_item, items: answers.append((rows, items)))
            assert lane.offer(job)
        second = asyncio.ensure_future(inference.run(live, "live 2"))  # queued behind live 1, ahead of shadow
        await asyncio.sleep(0.05)
        assert version.batches == [] and version.leases == 6  # nothing ran while live work waited
        release.set()
        await asyncio.gather(first, second)
        order.append("live done")
        while len(answers) < 6:
            await asyncio.sleep(0.01)
        inference.shutdown()
        return version, order, answers, lane

    version, order, answers, lane = asyncio.run(scenario())
    assert order == ["live 1", "live 2", "live done"]
    assert version.batches == [4, 2]  # batched up to the cap
    assert version.leases == 0
    rows, items = answers[0]  # type: ignore[misc]
    assert items == 4 and float(rows[0][0]) == 0.0  # type: ignore[index]
    # after a pass of t seconds the lane rests t * (1 - share) / share: 4 t for a share of 0.2
    gap = version.started[1] - version.started[0]
    assert gap >= 5 * lane.busy_s / 2 * 0.9


def test_a_full_lane_drops_samples_not_requests() -> None:
    async def scenario() -> tuple[ShadowLane, FakeVersion]:
        threads = InferenceThreads()
        inference = threads.for_device(torch.device("cpu"))
        lane = ShadowLane(threads, max_pending=2)
        version = FakeVersion(0.0)
        blocker = threading.Event()
        busy = asyncio.ensure_future(inference.run(blocker.wait, 5))
        accepted = [lane.offer(ShadowJob(version, [np.zeros((1, 1, 1))], 0.5,  # type: ignore[arg-type]
                                         lambda *a: None)) for _ in range(3)]
        assert accepted == [True, True, False]
        await lane.aclose()
        blocker.set()
        await busy
        inference.shutdown()
        return lane, version

    lane, version = asyncio.run(scenario())
    assert lane.dropped == 1 and version.leases == 0 and version.batches == []


def test_scoreboard_without_comparisons_reports_zeros() -> None:
    scores = ScoreBoard().scores()
    assert dataclasses.astuple(scores)[:4] == (0, 0.0, 0.0, 0.0) and scores.compute_ratio is None


def test_under_back_to_back_live_work_the_lane_still_gets_its_owed_share() -> None:
    """Live calls never leave the thread quiet (two always queued): shadow work must progress all the same, ahead
    of a later live call once the lane's credit (share / (1 - share) × live busy time) allows, and no further."""
    async def scenario() -> tuple[list[int], int, ShadowLane, float]:
        threads = InferenceThreads()
        inference = threads.for_device(torch.device("cpu"))
        lane = ShadowLane(threads)
        version = FakeVersion(0.005, cap=1)  # one job a pass: four passes
        answers: list[int] = []
        live_done = 0

        def live() -> None:
            time.sleep(0.005)

        pending = {asyncio.ensure_future(inference.run(live)) for _ in range(2)}
        await asyncio.sleep(0)  # both live calls are queued before the first shadow job arrives
        for i in range(4):
            assert lane.offer(ShadowJob(version, [np.full((2, 2, 1), i, dtype=np.uint8)], 0.5,  # type: ignore[arg-type]
                                        lambda rows, per_item, items: answers.append(live_done)))
        for _ in range(200):  # each finished live call replaced at once: _live never drops to 0
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            live_done += len(finished)
            pending |= {asyncio.ensure_future(inference.run(live)) for _ in finished}
            if len(answers) == 4:
                break
        await asyncio.gather(*pending)
        await lane.aclose()
        inference.shutdown()
        return answers, live_done, lane, inference.live_busy_s

    answers, live_done, lane, live_busy = asyncio.run(scenario())
    assert len(answers) == 4 and max(answers) < live_done  # computed while live work never stopped
    assert lane.busy_s <= live_busy + 0.5  # share 0.5: at most as much as live work, give or take a pass


def test_jobs_no_longer_wanted_are_skipped_and_their_leases_given_back() -> None:
    async def scenario() -> tuple[FakeVersion, list[object]]:
        threads = InferenceThreads()
        inference = threads.for_device(torch.device("cpu"))
        lane = ShadowLane(threads)
        version = FakeVersion(0.0)
        answers: list[object] = []
        wanted = True
        blocker = threading.Event()
        busy = asyncio.ensure_future(inference.run(blocker.wait, 5))
        for _ in range(3):
            assert lane.offer(ShadowJob(version, [np.zeros((1, 1, 1))], 0.5,  # type: ignore[arg-type]
                                        lambda *a: answers.append(a), lambda: wanted))
        assert version.leases == 3
        wanted = False  # the candidate was rejected or replaced meanwhile
        blocker.set()
        await busy
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not lane.pending:
                break
        inference.shutdown()
        return version, answers

    version, answers = asyncio.run(scenario())
    assert version.leases == 0 and version.batches == [] and answers == []


def test_a_reserved_place_counts_towards_the_pending_limit() -> None:
    async def scenario() -> ShadowLane:
        lane = ShadowLane(InferenceThreads(), max_pending=2)
        assert lane.reserve() and lane.reserve()
        assert not lane.reserve()  # full: the preparation is not even started
        assert not lane.offer(ShadowJob(FakeVersion(0.0), [np.zeros((1, 1, 1))], 0.5,  # type: ignore[arg-type]
                                        lambda *a: None))
        lane.unreserve(dropped=True)
        lane.unreserve()
        assert lane.reserve()
        lane.unreserve()
        return lane

    lane = asyncio.run(scenario())
    assert lane.dropped == 3
