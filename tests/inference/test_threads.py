"""Tests of server.inference.threads: the per-version torch thread count chosen from timed single images (a fake
clock: each pass advances it by what the test says a pass at the current thread count costs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from server.inference import threads
from server.inference.threads import choose_threads, use_threads


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake(cost_ms: dict[int, float]) -> tuple[list[float], object, object]:
    clock = [0.0]
    counts: list[int] = []

    def run_single() -> None:
        counts.append(torch.get_num_threads())
        clock[0] += cost_ms[torch.get_num_threads()] / 1000

    return clock, run_single, counts


def test_a_small_model_whose_team_wakes_slowly_gets_one_thread() -> None:
    clock, run_single, counts = fake({1: 0.7, 2: 9.0})
    chosen, why = choose_threads(run_single, 2, sleep=lambda s: None, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert chosen == 1
    assert "median of 4: 0.70 ms on 1 thread, 9.00 ms on 2" in why
    assert counts.count(1) == threads.RUNS and counts.count(2) == threads.RUNS + 1  # interleaved, plus the probe


def test_the_team_is_kept_only_when_clearly_faster() -> None:
    clock, run_single, _ = fake({1: 10.0, 2: 6.0})
    assert choose_threads(run_single, 2, sleep=lambda s: None, clock=lambda: clock[0])[0] == 2  # type: ignore[arg-type]
    clock, run_single, _ = fake({1: 10.0, 2: 9.5})  # 5 % faster: not worth a core taken from preprocessing
    assert choose_threads(run_single, 2, sleep=lambda s: None, clock=lambda: clock[0])[0] == 1  # type: ignore[arg-type]


def test_a_slow_model_is_measured_within_the_budget_and_a_huge_one_not_at_all() -> None:
    clock, run_single, counts = fake({1: 82.0, 2: 400.0})  # resnet18 on a busy machine
    chosen, why = choose_threads(run_single, 2, sleep=lambda s: None, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert chosen == 1 and "median of 2" in why  # 0.4 + 2 x (0.082 + 0.4) s: past the budget of about 1 s
    clock, run_single, counts = fake({1: 900.0, 2: 600.0})
    chosen, why = choose_threads(run_single, 2, sleep=lambda s: None, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert (chosen, len(counts)) == (2, 1) and "not measured" in why
    assert choose_threads(run_single, 1)[0] == 1


def test_use_threads_switches_only_when_needed() -> None:
    use_threads(1)
    assert torch.get_num_threads() == 1
    use_threads(1)
    assert torch.get_num_threads() == 1
