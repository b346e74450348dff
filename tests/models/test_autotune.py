"""Auto-tuned batch cap: the knee on synthetic curves, the measurement ladder, and a real daemon that measures a
model whose batch time the test controls."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc

from client import tensor_request
from server.batching.curve import BatchCurve, BatchPoint, best_rates, choose_knee, ladder
from server.batching.online import OnlineTuner
from server.core.config import AutotuneDefaults
from server.core.manifest import BatchingSpec, ManifestError, parse_manifest
from server.daemon import manager_settings
from server.inference.devices import InferenceThreads
from server.inference.runtime import InferenceThread, LoadedVersion
from server.models.loader import autotune, runtime_choice
from server.models.loader.autotune import TunePlan, curve_from, measure, plan_for
from server.models.manager import ModelManager
from tests.inference.test_threads import OtherRuntime
from tests.support.kit import DaemonThread, PacedModel, local_config, running_daemon, write_model

pytestmark = pytest.mark.timeout(120)

# ----- the knee


def test_flat_curve_takes_the_smallest_batch() -> None:
    assert choose_knee({1: 100.0, 2: 101.0, 4: 99.0, 8: 100.5, 16: 100.0}) == 1


def test_rising_curve_takes_the_largest_batch() -> None:
    assert choose_knee({1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0}) == 16


def test_saturating_curve_stops_where_the_gain_ends() -> None:
    assert choose_knee({1: 60.0, 2: 110.0, 4: 190.0, 8: 250.0, 16: 258.0, 32: 262.0}) == 8
    assert choose_knee({1: 60.0, 2: 110.0, 4: 190.0, 8: 240.0, 16: 258.0, 32: 262.0}) == 16


def test_peaked_curves_measured_on_the_cpu_take_the_peak() -> None:
    resnet18 = {1: 60.9, 2: 72.0, 4: 81.9, 8: 70.9, 16: 66.5, 32: 59.3, 64: 49.2}
    mobilenet = {1: 242.8, 2: 400.0, 4: 560.0, 8: 690.0, 16: 761.5, 32: 474.1, 64: 296.7}
    assert choose_knee(resnet18) == 4
    assert choose_knee(mobilenet) == 16


def test_tolerance_decides_how_close_counts() -> None:
    curve = {1: 50.0, 2: 90.0, 4: 100.0, 8: 112.0}
    assert choose_knee(curve, tolerance=0.05) == 8
    assert choose_knee(curve, tolerance=0.15) == 4


def test_noisy_plateau_keeps_the_knee_whatever_the_noise() -> None:
    rng = random.Random(8)
    for _ in range(200):
        true_rates = {1: 40.0, 2: 70.0, 4: 100.0, 8: 130.0, 16: 130.0, 32: 130.0, 64: 130.0}
        noisy = {size: rate * rng.uniform(0.98, 1.02) for size, rate in true_rates.items()}
        assert choose_knee(noisy) == 8


def test_fastest_of_repeats_ignores_slowdowns_however_many() -> None:
    # Batch times (s) of a curve peaking at 4, measured while other processes took the cores: most runs slowed.
    samples = {1: [0.016, 0.050, 0.090], 2: [0.060, 0.028, 0.045], 4: [0.049, 0.300, 0.120],
               8: [0.113, 0.200, 0.300], 16: [0.240, 0.500, 0.241]}
    rates = best_rates(samples)
    assert rates[4] == pytest.approx(4 / 0.049)
    assert choose_knee(rates) == 4
    medians = {size: size / sorted(times)[1] for size, times in samples.items()}
    assert choose_knee(medians) == 16  # what the median would pick


def test_empty_curve_is_an_error() -> None:
    with pytest.raises(ValueError, match="no measured"):
        choose_knee({})


def test_ladder_doubles_up_to_the_ceiling() -> None:
    assert ladder(1) == [1]
    assert ladder(64) == [1, 2, 4, 8, 16, 32, 64]
    assert ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_curve_estimate_interpolates_and_extrapolates() -> None:
    curve = BatchCurve((BatchPoint(1, 0.010), BatchPoint(2, 0.012), BatchPoint(4, 0.016)), 4, True)
    assert curve.estimate(1) == 0.010
    assert curve.estimate(3) == pytest.approx(0.014)
    assert curve.estimate(8) == pytest.approx(0.016 + 4 * 0.004)  # at least the last size's time per item
    assert curve.points[2].images_per_second == pytest.approx(250.0)
    assert curve.describe() == "1:100 2:167 4:250*"


# ----- the measurement ladder, on a fake clock


class FakeForward:
    """``time_batch(size)`` advances a fake clock by ``batch_s(size)``; ``fail_at`` raises like an out-of-memory."""

    def __init__(self, batch_s: dict[int, float], fail_at: int | None = None) -> None:
        self.now = 0.0
        self.batch_s = batch_s
        self.fail_at = fail_at
        self.runs: list[int] = []

    async def time_batch(self, size: int) -> float:
        if size == self.fail_at:
            raise RuntimeError("CUDA out of memory")
        self.runs.append(size)
        self.now += self.batch_s[size]
        return self.batch_s[size]

    def clock(self) -> float:
        return self.now

    def measure(self, sizes: list[int], budget_s: float, **kwargs: Any) -> tuple[dict[int, list[float]], str]:
        return asyncio.run(measure(self.time_batch, sizes, budget_s, clock=self.clock, **kwargs))


PACED = PacedModel(4, base_ms=5, per_item_ms=1, knee=8, slow_ms=10)


def test_measure_times_each_size_after_an_untimed_run() -> None:
    forward = FakeForward({size: PACED.batch_s(size) for size in ladder(8)})
    samples, stopped = forward.measure(ladder(8), 10.0, min_time_s=0.0)
    assert stopped == ""
    assert forward.runs == [size for size in ladder(8) for _ in range(4)]
    assert samples[8] == pytest.approx([0.013] * 3)
    assert choose_knee(best_rates(samples)) == 8


def test_cheap_sizes_repeat_until_they_add_up() -> None:
    forward = FakeForward({1: 0.006, 2: 0.030, 4: 0.5})
    samples, _ = forward.measure([1, 2, 4], 10.0)
    assert [len(samples[size]) for size in (1, 2, 4)] == [9, 3, 3]  # 9 × 6 ms reach 50 ms; 3 × 30 ms already do


def test_measure_stops_when_throughput_falls_twice() -> None:
    forward = FakeForward({size: PACED.batch_s(size) for size in ladder(64)})
    samples, stopped = forward.measure(ladder(64), 60.0)
    assert sorted(samples) == [1, 2, 4, 8, 16, 32]
    assert "fell" in stopped


def test_measure_keeps_to_its_budget() -> None:
    forward = FakeForward({size: 0.1 * size for size in ladder(64)})  # linear: throughput never falls
    samples, stopped = forward.measure(ladder(64), 5.0)
    assert forward.now <= 5.0
    assert sorted(samples) == [1, 2, 4]  # 8 would take 8 * 0.1 * 4 = 3.2 s more than the 2.8 s spent
    assert "budget" in stopped


def test_measure_caps_below_a_size_that_runs_out_of_memory() -> None:
    forward = FakeForward({size: 0.001 * size for size in ladder(64)}, fail_at=16)
    samples, stopped = forward.measure(ladder(64), 5.0)
    assert sorted(samples) == [1, 2, 4, 8]
    assert "batch 16 failed: CUDA out of memory" in stopped
    curve = curve_from(samples, TunePlan(8, True, True, 64, 5.0), stopped)
    assert curve.ceiling == 8  # the online tuner never explores the size that ran out of memory
    assert curve_from(samples, TunePlan(8, True, True, 64, 5.0), "time budget of 5 s reached").ceiling == 64


def test_measure_raises_when_even_one_item_fails() -> None:
    forward = FakeForward({1: 0.01}, fail_at=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        forward.measure([1, 2], 5.0)


def test_curve_from_samples_keeps_a_pinned_cap() -> None:
    samples = {1: [0.01], 2: [0.011], 4: [0.012]}
    chosen = curve_from(samples, TunePlan(4, True, True, 4, 1.0), "")
    pinned = curve_from(samples, TunePlan(2, True, False, 2, 1.0), "")
    assert (chosen.chosen, chosen.autotuned) == (4, True)
    assert (pinned.chosen, pinned.autotuned) == (2, False)


# ----- what the manifest and the server ask for


def test_plan_autotunes_unpinned_models_up_to_the_device_ceiling() -> None:
    defaults = AutotuneDefaults()
    assert plan_for(BatchingSpec(), defaults, 32, "cpu") == TunePlan(32, True, True, 64, 3.0)
    assert plan_for(BatchingSpec(), defaults, 32, "cuda") == TunePlan(32, True, True, 256, 3.0)
    spec = BatchingSpec(autotune_max_batch_size=16, autotune_budget_s=0.5)
    assert plan_for(spec, defaults, 32, "cpu") == TunePlan(16, True, True, 16, 0.5)


def test_plan_keeps_a_pinned_or_disabled_cap_and_measures_only_for_a_target() -> None:
    defaults = AutotuneDefaults()
    assert plan_for(BatchingSpec(max_batch_size=8), defaults, 32, "cpu").measure is False
    assert plan_for(BatchingSpec(autotune=False), defaults, 32, "cpu") == TunePlan(32, False, False, 32, 3.0)
    assert plan_for(BatchingSpec(), AutotuneDefaults(enabled=False), 32, "cpu").measure is False
    assert plan_for(BatchingSpec(autotune=True), AutotuneDefaults(enabled=False), 32, "cpu").choose_cap is True
    target = BatchingSpec(max_batch_size=8, latency_target_ms=50.0)
    assert plan_for(target, defaults, 32, "cpu") == TunePlan(8, True, False, 8, 3.0)


@pytest.mark.parametrize(("batching", "key", "message"), [
    ({"autotune": True, "max_batch_size": 8}, "batching.autotune", "remove max_batch_size"),
    ({"autotune": "yes"}, "batching.autotune", "must be of type bool"),
    ({"autotune_budget_s": 0}, "batching.autotune_budget_s", "must be > 0"),
    ({"autotune_max_batch_size": 0}, "batching.autotune_max_batch_size", "at least 1"),
    ({"latency_target_ms": -5}, "batching.latency_target_ms", "must be > 0"),
    ({"latency_target_ms": 50, "max_delay_ms": 2}, "batching.latency_target_ms", "remove max_delay_ms"),
])
def test_manifest_rejects_bad_autotune_settings(batching: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        parse_manifest({"architecture": "classifyd:small_cnn", "batching": batching}, Path("m.toml"), ("a", "b"))
    assert caught.value.key == key


def test_manifest_reads_autotune_settings() -> None:
    raw = {"architecture": "classifyd:small_cnn", "batching": {
        "autotune": False, "autotune_budget_s": 2, "autotune_max_batch_size": 128, "latency_target_ms": 40}}
    batching = parse_manifest(raw, Path("m.toml"), ("a", "b")).batching
    assert batching == BatchingSpec(autotune=False, autotune_budget_s=2.0, autotune_max_batch_size=128,
                                    latency_target_ms=40.0)


# ----- a real daemon


PACED_ARGS = {"base_ms": 5.0, "per_item_ms": 1.0, "knee": 8, "slow_ms": 10.0}  # 8 is the knee
TINY_INPUT = {"color": "L", "size": 4, "resize": 4}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonThread]:
    root = tmp_path_factory.mktemp("models")
    write_model(root, "paced", architecture="classifyd:test_paced", manifest={
        "model_args": PACED_ARGS, "input": TINY_INPUT, "batching": {"autotune_max_batch_size": 16}})
    write_model(root, "pinned", architecture="classifyd:test_paced", manifest={
        "model_args": PACED_ARGS, "input": TINY_INPUT, "batching": {"max_batch_size": 2}})
    write_model(root, "untuned", architecture="classifyd:test_paced", manifest={
        "model_args": PACED_ARGS, "input": TINY_INPUT, "batching": {"autotune": False}})
    with running_daemon(root, max_batch_size=3) as running:
        yield running


def test_paced_model_gets_the_knee_of_its_curve_and_get_model_shows_it(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        info = pb_grpc.ClassifierStub(channel).GetModel(pb.GetModelRequest(model="paced"))
    assert info.max_batch_size == 8
    assert info.autotuned
    assert [p.batch_size for p in info.batch_curve] == [1, 2, 4, 8, 16]
    by_size = {p.batch_size: p for p in info.batch_curve}
    for size in (1, 4, 8, 16):
        point = by_size[size]
        assert point.batch_ms >= PACED.batch_s(size) * 1000  # a sleep never ends early
        assert point.images_per_second == pytest.approx(size / point.batch_ms * 1000)
    assert by_size[16].images_per_second < by_size[8].images_per_second


def test_pinned_and_disabled_models_keep_their_cap_unmeasured(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        pinned = stub.GetModel(pb.GetModelRequest(model="pinned"))
        untuned = stub.GetModel(pb.GetModelRequest(model="untuned"))
    assert (pinned.max_batch_size, pinned.autotuned, len(pinned.batch_curve)) == (2, False, 0)
    assert (untuned.max_batch_size, untuned.autotuned, len(untuned.batch_curve)) == (3, False, 0)  # the server's


def test_batches_of_the_tuned_model_stay_within_its_cap(daemon: DaemonThread) -> None:
    request = tensor_request(np.zeros((4, 4), dtype=np.uint8), model="paced")
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        calls = [stub.Classify.future(request, timeout=30) for _ in range(40)]
        sizes = [call.result().batch_size for call in calls]
    assert max(sizes) <= 8
    assert max(sizes) > 1  # 40 concurrent requests were batched


# ----- at start-up: ready first, curves afterwards, one at a time


def test_start_up_serves_with_the_provisional_cap_then_measures_one_model_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a", "b", "c"):
        write_model(tmp_path, name, architecture="classifyd:test_paced", manifest={
            "model_args": PACED_ARGS, "input": TINY_INPUT, "batching": {"autotune_max_batch_size": 16}})
    running: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    real_tune = autotune.tune

    async def watched_tune(version: LoadedVersion, inference: InferenceThread, plan: TunePlan) -> object:
        running.append(version.name)
        overlaps.append(tuple(running))
        try:
            return await real_tune(version, inference, plan)
        finally:
            running.remove(version.name)

    monkeypatch.setattr(autotune, "tune", watched_tune)

    async def main() -> None:
        inference = InferenceThreads()
        manager = ModelManager(manager_settings(local_config(tmp_path, max_batch_size=3)), inference)
        try:
            await manager.load_repository()
            ready = [manager.get(n).serving() for n in ("a", "b", "c")]
            assert all(r is not None and r.loaded is not None for r in ready), "not every model is READY"
            provisional = [(r.loaded.max_batch_size, r.loaded.batch_curve) for r in ready if r and r.loaded]
            assert provisional == [(3, None)] * 3, "a model waited for its curve before READY"
            await manager.tuned()
            assert [r.loaded.max_batch_size for r in ready if r and r.loaded] == [8, 8, 8]  # the knee, in place
        finally:
            await manager.aclose()
            inference.shutdown()

    asyncio.run(main())
    assert sorted(overlaps) == [("a",), ("b",), ("c",)], f"measurements overlapped: {overlaps}"


# ----- a curve measured again after a runtime switch (server/models/loader/runtime_choice.py)


def paced_version(cap: int = 3) -> LoadedVersion:
    """A paced model's version on the CPU with a ladder-chosen (autotuned) curve, serving at ``cap``."""
    manifest = parse_manifest({"architecture": "classifyd:test_paced", "model_args": PACED_ARGS,
                               "input": TINY_INPUT}, Path("model.toml"), ("a", "b"))
    version = LoadedVersion(name="paced", version=1, manifest=manifest, module=PacedModel(2, **PACED_ARGS),
                            device=torch.device("cpu"), max_batch_size=cap, max_delay_ms=0.0)
    version.batch_curve = BatchCurve((BatchPoint(1, 0.006), BatchPoint(cap, 0.008)), cap, True, ceiling=16)
    return version


def busy(tuner: OnlineTuner, now: list[float], batches: int = 10) -> None:
    """Full batches with requests queued behind them, 0.1 s apart on ``tuner``'s clock."""
    for _ in range(batches):
        now[0] += 0.1
        tuner.observe(tuner.limit(), tuner.limit(), 0.01, backlog=5)


PLAN = TunePlan(cap=3, measure=True, choose_cap=True, ceiling=16, budget_s=3.0)


def test_a_measurement_queued_for_a_pause_waits_while_batches_keep_coming() -> None:
    version = paced_version()
    now = [100.0]
    version.tuner = OnlineTuner(3, 16, clock=lambda: now[0])

    async def main() -> None:
        inference = InferenceThreads()
        queue = autotune.TuneQueue(inference, poll_s=0.005)
        try:
            queue.schedule(version, PLAN, after_pause_s=1.0)
            for _ in range(10):
                busy(version.tuner, now, 1)  # type: ignore[arg-type]
                await asyncio.sleep(0.01)
            assert version.batch_curve is not None and len(version.batch_curve.points) == 2, "measured under load"
            now[0] += 1.0  # a second without a batch
            await asyncio.wait_for(queue.wait(), 60)
        finally:
            inference.shutdown()
        assert version.max_batch_size == 8 and version.tuner is None  # the knee; a new tuner starts from it

    asyncio.run(main())


@pytest.mark.parametrize("loaded", [True, False])
def test_a_switch_under_load_keeps_the_cap_with_a_fresh_tuner_and_measures_at_the_next_pause(
        loaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    version = paced_version(cap=4)
    now = [100.0]
    old = version.tuner = OnlineTuner(4, 16, clock=lambda: now[0], widths=(1, 2))
    if loaded:
        busy(old, now)
    version.runtime = OtherRuntime(version.module)  # type: ignore[assignment,arg-type]
    monkeypatch.setattr(runtime_choice, "PAUSE_S", 0.5)

    async def main() -> None:
        inference = InferenceThreads()
        queue = autotune.TuneQueue(inference, poll_s=0.005)
        chooser = runtime_choice.RuntimeChooser(runtime_choice.ChoiceSettings(), inference, queue,
                                                lambda *_: None, lambda _: None)
        try:
            chooser._retune(version)
            fresh = version.tuner
            if loaded:
                assert fresh is not None and fresh is not old and fresh.cap == 4 and fresh.widths == ()
                await asyncio.sleep(0.05)
                assert version.max_batch_size == 4, "measured beside live batches"
            await asyncio.wait_for(queue.wait(), 60)
        finally:
            inference.shutdown()
        assert version.max_batch_size == 8 and version.tuner is None

    asyncio.run(main())
