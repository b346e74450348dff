"""Tests of server.inference.threads: the per-version torch thread count chosen from timed single images after an
idle gap and from back-to-back batches (fake passes whose cost the test sets per thread count and size), and a real
LoadedVersion whose forward pass records the thread count it ran on: every timed pass runs on the count it is
recorded for, and the loader's measurement is one inference-thread call per pass."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

from server.batching.online import OnlineTuner, TunerSettings
from server.core.manifest import parse_manifest
from server.inference import cap_tuning, threads
from server.inference.runtime import InferenceThread, LoadedVersion, choose_version_threads
from server.inference.threads import Pass, choose_threads, trial, use_threads
from server.ops.tuning_metrics import TuningCollector, TuningFigures


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_process_threads", 2)  # a team of two, whatever this machine has
    yield
    torch.set_num_threads(before)


def passes(cost_ms: dict[tuple[int, int], float], batch: int = 8) -> tuple[tuple[int, str], list[Pass]]:
    """Run the trial on fake passes costing ``cost_ms[count, size]``; its outcome and the passes it asked for."""
    asked: list[Pass] = []
    steps = trial(2, batch)
    try:
        step = next(steps)
        while True:
            asked.append(step)
            step = steps.send(cost_ms[step.count, step.size] / 1000)
    except StopIteration as done:
        return done.value, asked


def test_a_tiny_model_gets_one_thread_when_it_wins_single_images_and_keeps_the_throughput() -> None:
    (chosen, why), asked = passes({(1, 1): 0.7, (2, 1): 9.0, (1, 8): 1.0, (2, 8): 1.0})  # digits-like
    assert chosen == 1
    assert "median of 4: 0.70 ms on 1 thread, 9.00 ms on 2" in why and "8000 images/s on 1 thread, 8000 on 2" in why
    assert asked[0] == Pass(2, 1, False)  # the probe
    assert asked[1:9] == [Pass(1, 1, True), Pass(2, 1, True)] * threads.RUNS  # interleaved, after idle gaps
    assert asked[9:] == [Pass(1, 8, False), Pass(2, 8, False)] * threads.BATCH_RUNS  # back to back


def test_the_team_is_kept_when_it_gives_more_throughput_under_load() -> None:
    (chosen, why), _ = passes({(1, 1): 50.0, (2, 1): 52.0, (1, 8): 200.0, (2, 8): 120.0})  # resnet18-like
    assert chosen == 2 and "batch of 8 back to back: 40 images/s on 1 thread, 67 on 2" in why
    (chosen, _), _ = passes({(1, 1): 50.0, (2, 1): 52.0, (1, 8): 200.0, (2, 8): 195.0})  # 2.5 % more: not worth it
    assert chosen == 1


def test_the_team_is_kept_without_batches_when_clearly_faster_on_single_images() -> None:
    (chosen, _), asked = passes({(1, 1): 10.0, (2, 1): 6.0})
    assert chosen == 2 and all(p.size == 1 for p in asked)


def test_the_throughput_batch_is_the_cap_at_most_eight() -> None:
    cost = {(1, 1): 1.0, (2, 1): 1.0, (1, 3): 3.0, (2, 3): 3.0}
    assert {p.size for p in passes(cost, batch=3)[1]} == {1, 3}


def test_a_slow_model_is_measured_within_the_budget_and_a_huge_one_not_at_all() -> None:
    (chosen, why), asked = passes({(1, 1): 82.0, (2, 1): 400.0, (1, 8): 600.0, (2, 8): 700.0})  # busy machine
    assert chosen == 1 and "median of 1" in why  # 0.4 + 0.482 + 2 x 0.02 s: past half the budget
    assert len([p for p in asked if p.size == 8]) == 2  # one batch each: the budget is spent
    (chosen, why), asked = passes({(1, 1): 900.0, (2, 1): 600.0})
    assert (chosen, len(asked)) == (2, 1) and "not measured" in why
    assert choose_threads(lambda count, size: 0.0, 1, 8)[0] == 1


def test_use_threads_switches_only_when_needed() -> None:
    use_threads(1)
    assert torch.get_num_threads() == 1
    use_threads(1)
    assert torch.get_num_threads() == 1


# ----- a real version: each pass runs on the count it is recorded for


class Recorder(nn.Module):
    """Logits of zeros; records (batch size, torch threads) of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape[0], torch.get_num_threads()))
        return torch.zeros(x.shape[0], 2)


class OtherRuntime:
    """A runtime that is not torch (ONNX Runtime's place) running the recorder: what torch threads its batch got."""

    name = "onnxruntime"

    def __init__(self, module: Recorder) -> None:
        self.module = module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


def recording_version() -> tuple[LoadedVersion, Recorder]:
    manifest = parse_manifest({"architecture": "classifyd:small_cnn", "input": {"size": 4, "resize": 4}},
                              Path("model.toml"), ("a", "b"))
    module = Recorder()
    version = LoadedVersion(name="m", version=1, manifest=manifest, module=module, device=torch.device("cpu"),
                            max_batch_size=8, max_delay_ms=0.0)
    return version, module


def claims(version: LoadedVersion, module: Recorder) -> list[tuple[int, int, int, int]]:
    """Spy on ``version.timed_pass``: (claimed count, size, count the forward ran on, its batch size) per pass."""
    seen: list[tuple[int, int, int, int]] = []
    timed = version.timed_pass

    def spy(count: int, size: int, *args: Any, **kwargs: Any) -> float:
        took = timed(count, size, *args, **kwargs)
        seen.append((count, size, module.seen[-1][1], module.seen[-1][0]))
        return took

    version.timed_pass = spy  # type: ignore[method-assign]
    return seen


def test_every_timed_pass_of_a_real_version_runs_on_the_count_it_claims() -> None:
    version, module = recording_version()
    seen = claims(version, module)
    torch.set_num_threads(2)
    version.choose_threads_now()
    assert version.torch_threads in (1, 2)
    assert {(count, size) for count, size, _, _ in seen} >= {(1, 1), (2, 1)}
    assert all(claimed == ran and size == batch for claimed, size, ran, batch in seen), seen


def test_the_loader_measures_one_pass_per_inference_thread_call_and_serves_on_the_choice() -> None:
    version, module = recording_version()
    seen = claims(version, module)
    inference = InferenceThread()
    calls: list[object] = []
    run = inference.run

    async def counted(fn: Any, *args: object) -> Any:
        calls.append(fn)
        return await run(fn, *args)

    inference.run = counted  # type: ignore[method-assign]
    try:
        asyncio.run(choose_version_threads(version, inference))
        asyncio.run(run(version.predict, [torch.zeros(4, 4, 3, dtype=torch.uint8)]))
    finally:
        inference.shutdown()
    assert len(calls) == len(seen) >= 5  # the probe, two single images at least, ...: each its own call
    assert all(claimed == ran for claimed, _, ran, _ in seen), seen
    assert module.seen[-1] == (1, version.torch_threads)  # served on the count chosen


def test_threads_other_than_the_inference_threads_run_torch_without_a_team() -> None:
    """Only inference threads may own OpenMP teams (threads.without_team): a pool thread runs torch on 1 thread,
    and the inference threads keep the process's count."""
    team = threads.process_threads()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=threads.without_team) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert threads.process_threads() == team  # recorded before the count changed
    inference = InferenceThread()
    try:
        version_threads = asyncio.run(inference.run(lambda: (threads.use_threads(team), torch.get_num_threads())[1]))
        assert version_threads == team
    finally:
        inference.shutdown()


# ----- under load the online tuner's width decides (server/batching/online.py, server/inference/cap_tuning.py)


def test_batches_under_load_run_on_the_tuners_width_and_light_ones_on_the_versions_count() -> None:
    version, module = recording_version()
    version.torch_threads = 2  # the load-time choice
    now = [100.0]
    version.tuner = OnlineTuner(8, 8, widths=cap_tuning.thread_widths(version), width=1, clock=lambda: now[0])
    image = [torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()]
    version.predict(image)
    assert module.seen[-1][1] == 2  # no batch seen yet: not under load
    version.tuner.observe(8, 8, 0.01, backlog=5)  # a full batch: load keeps batches full
    version.predict(image)
    assert module.seen[-1][1] == 1
    version.predict(image, threads=2)  # an explicit count (the thread measurement) still wins
    assert module.seen[-1][1] == 2
    now[0] += 1.0
    version.tuner.observe(3, 8, 0.01)  # the load went (a batch of 3 after an idle second): the version's choice
    version.predict(image)
    assert module.seen[-1][1] == 2
    version.runtime = OtherRuntime(module)  # type: ignore[assignment]
    version.predict(image)
    assert module.seen[-1][1] == 1  # switched away from torch: its glue runs on one thread, whatever else says 2


def test_only_the_cpus_torch_runtime_with_a_team_tunes_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    version, _ = recording_version()
    assert cap_tuning.thread_widths(version) == (1, 2)
    version.runtime = SimpleNamespace(name="onnxruntime")  # type: ignore[assignment]
    assert cap_tuning.thread_widths(version) == ()  # its session has threads of its own
    version, _ = recording_version()
    monkeypatch.setattr(threads, "_process_threads", 1)
    assert cap_tuning.thread_widths(version) == ()


def test_a_version_on_another_runtime_moves_its_cap_down_only_for_a_clear_gain() -> None:
    version, module = recording_version()
    assert cap_tuning.tuner_settings(version) == TunerSettings()
    version.runtime = OtherRuntime(module)  # type: ignore[assignment]
    settings = cap_tuning.tuner_settings(version)
    assert settings.down_tolerance == -settings.up_margin < 0


def test_a_pinned_cap_gets_a_tuner_of_its_threads_alone() -> None:
    version, _ = recording_version()  # no batch curve: the cap (8) is not the ladder's choice
    assert not cap_tuning.tunes_online(version)
    tuner = cap_tuning.tuner_for(version)
    assert tuner is not None and tuner.sizes == [8] and tuner.widths == (1, 2)
    assert not tuner.snapshot().cap_online
    figures = cap_tuning.figures(version)
    assert figures is not None and not figures.cap_online and figures.threads == 2
    targeted, _ = recording_version()
    targeted.manifest = parse_manifest({"architecture": "classifyd:small_cnn", "input": {"size": 4, "resize": 4},
                                        "batching": {"latency_target_ms": 50}}, Path("model.toml"), ("a", "b"))
    assert cap_tuning.tuner_for(targeted) is None  # its policy sizes the batches


def test_metrics_of_a_pinned_cap_show_its_threads_and_no_cap_series() -> None:
    registry = CollectorRegistry()
    registry.register(TuningCollector(lambda: {
        "pinned": TuningFigures(64, 0, 1, 2, {64: 0.01}, threads=1, cap_online=False),
        "tuned": TuningFigures(16, 8, 0, 1, {16: 0.05}, threads=2)}))
    text = generate_latest(registry).decode()
    assert 'classifyd_batch_threads{model="pinned"} 1.0' in text
    assert 'classifyd_batch_threads{model="tuned"} 2.0' in text
    assert 'classifyd_batch_cap{model="tuned"} 16.0' in text and 'classifyd_batch_cap{model="pinned"}' not in text
    assert 'classifyd_batch_estimate_seconds{batch_size="64",model="pinned"}' not in text
    assert 'classifyd_batch_cap_changes_total{model="pinned"} 1.0' in text
