"""Tests of server.batching.online: the online cap tuner on synthetic batch times with an injected clock, and the
batcher taking its limits from a tuner."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping

import pytest

from server.batching.batcher import Batcher
from server.batching.online import CapChange, OnlineTuner, TunerSettings, quantile
from tests.support.batcher_harness import FakeClock, Handler, run, settle, spawn

pytestmark = pytest.mark.timeout(20)

PEAKED = {1: 60.0, 2: 72.0, 4: 82.0, 8: 71.0, 16: 66.0, 32: 50.0, 64: 40.0}
"""images/s by batch size, shaped like resnet18 on the 2-core CPU (knee at 4)."""


class Sim:
    """Saturated (or light) load against a tuner: every batch takes size / rate(size) seconds, times noise."""

    def __init__(self, tuner: OnlineTuner, clock: list[float], rates: Mapping[int, float], *,
                 noise: Callable[[], float] = lambda: 1.0) -> None:
        self.tuner, self.clock, self.rates, self.noise = tuner, clock, rates, noise
        self.served = 0
        self.lost_s = 0.0  # time spent below the best rate, in seconds of the best rate's throughput
        self.sizes: list[int] = []

    def batch_s(self, size: int) -> float:
        rate = self.rates[max(k for k in self.rates if k <= size)]  # sizes off the ladder: the size below's rate
        return size / rate * self.noise()

    def run(self, seconds: float, *, waiting: int | None = None, idle_s: float = 0.005) -> None:
        """Batches for ``seconds`` of fake time; ``waiting`` items available per batch (None: always full), each
        such batch after ``idle_s`` of waiting for them (light load: the worker waits for requests)."""
        end = self.clock[0] + seconds
        while self.clock[0] < end:
            if waiting is not None:
                self.clock[0] += idle_s
            limit = self.tuner.limit()
            size = limit if waiting is None else min(limit, waiting)
            took = self.batch_s(size)
            self.clock[0] += took
            self.served += size
            self.sizes.append(size)
            self.tuner.observe(size, limit, took, 1 if waiting is None else max(0, waiting - size))


def make(cap: int, ceiling: int = 64, **settings: float) -> tuple[OnlineTuner, list[float], list[CapChange]]:
    clock = [1000.0]
    changes: list[CapChange] = []
    tuner = OnlineTuner(cap, ceiling, clock=lambda: clock[0], settings=TunerSettings(**settings),  # type: ignore[arg-type]
                        on_change=changes.append)
    return tuner, clock, changes


@pytest.mark.parametrize("seed", [1, 2, 16, 64])
def test_cap_converges_to_the_best_size_from_any_seed(seed: int) -> None:
    tuner, clock, changes = make(seed)
    sim = Sim(tuner, clock, PEAKED)
    sim.run(60.0)
    assert tuner.cap == 4, [(c.old, c.new) for c in changes]
    assert all(change.new in PEAKED for change in changes)
    assert tuner.snapshot().changes == len(changes)


def test_a_rising_curve_climbs_to_its_ceiling_and_no_further() -> None:
    tuner, clock, _ = make(2, ceiling=16)
    Sim(tuner, clock, {1: 10.0, 2: 19.0, 4: 36.0, 8: 70.0, 16: 130.0}).run(120.0)
    assert tuner.cap == 16
    assert max(tuner.sizes) == 16


def test_explores_only_when_batches_are_full() -> None:
    tuner, clock, changes = make(8)
    sim = Sim(tuner, clock, PEAKED)
    sim.run(120.0, waiting=5)  # light load: batches of 5 under a cap of 8
    assert tuner.trials == 0 and changes == []
    assert set(sim.sizes) == {5}


def test_a_trial_is_abandoned_when_the_load_drops() -> None:
    tuner, clock, changes = make(4)
    sim = Sim(tuner, clock, PEAKED)
    while tuner.limit() == 4:  # saturated until the first trial starts
        sim.run(0.001)
    trial = tuner.limit()
    assert trial in (2, 8)
    sim.run(0.001, waiting=1)  # the load drops to one request
    assert tuner.limit() == 4 and tuner.snapshot().exploring == 0 and changes == []


def test_settled_cap_does_not_oscillate_under_noise() -> None:
    rng = random.Random(7)
    # Mostly +-5 % jitter, one batch in ten stalled by up to 3x (another process took the core).
    noise = lambda: rng.uniform(0.95, 1.05) * (rng.uniform(1.0, 3.0) if rng.random() < 0.1 else 1.0)  # noqa: E731
    tuner, clock, changes = make(1)
    sim = Sim(tuner, clock, PEAKED, noise=noise)
    sim.run(60.0)
    settled = len(changes)
    sim.run(600.0)
    assert tuner.cap == 4
    assert len(changes) - settled <= 2, [(c.old, c.new) for c in changes]


def test_a_flat_curve_settles_without_flapping() -> None:
    rng = random.Random(3)
    tuner, clock, changes = make(8)
    sim = Sim(tuner, clock, dict.fromkeys(PEAKED, 50.0), noise=lambda: rng.uniform(0.97, 1.03))
    sim.run(600.0)
    moves = [(c.old, c.new) for c in changes]
    ups = sum(new > old for old, new in moves)
    assert ups <= 1, moves  # no size is better: it drifts down to low-latency sizes and stays


def test_with_symmetric_margins_a_flat_curve_keeps_its_cap_and_a_clearly_faster_smaller_size_still_wins() -> None:
    """ONNX Runtime's settings (server/inference/cap_tuning.py): a smaller cap must win by the larger's margin."""
    rng = random.Random(3)
    tuner, clock, changes = make(8, down_tolerance=-TunerSettings().up_margin)
    Sim(tuner, clock, dict.fromkeys(PEAKED, 50.0), noise=lambda: rng.uniform(0.97, 1.03)).run(600.0)
    assert changes == [] and tuner.cap == 8 and tuner.trials > 0
    tuner, clock, changes = make(8, down_tolerance=-TunerSettings().up_margin)
    Sim(tuner, clock, PEAKED).run(300.0)  # 4 is 15% faster than 8
    assert tuner.cap == 4, [c.describe() for c in changes]


def test_exploration_costs_at_most_five_percent_of_throughput() -> None:
    tuner, clock, _ = make(4)
    sim = Sim(tuner, clock, PEAKED)
    sim.run(60.0)  # already at the best size: every trial is a loss
    ideal = PEAKED[4] * 60.0
    assert tuner.trials >= 2
    assert sim.served >= 0.95 * ideal, (sim.served, ideal)
    # ... and the trials happen: both neighbours were measured within the minute
    assert {e.batch_size for e in tuner.snapshot().estimates} >= {2, 4, 8}


def test_sizes_stay_within_the_ladder_and_its_bounds() -> None:
    tuner, clock, _ = make(1, ceiling=8)
    sim = Sim(tuner, clock, {1: 10.0, 2: 30.0, 4: 80.0, 8: 200.0})
    sim.run(120.0)
    assert set(sim.sizes) <= {1, 2, 4, 8}
    assert tuner.cap == 8
    tuner1, clock1, changes1 = make(1, ceiling=1)
    Sim(tuner1, clock1, {1: 10.0}).run(30.0)
    assert tuner1.cap == 1 and tuner1.trials == 0 and changes1 == []


def test_estimates_expire_and_odd_times_are_ignored() -> None:
    tuner, clock, _ = make(4, keep_s=10.0)
    for _ in range(6):
        clock[0] += 0.05
        tuner.observe(4, 4, 0.05)
    tuner.observe(4, 4, float("nan"))
    tuner.observe(4, 4, -1.0)
    assert tuner.estimate(4) == pytest.approx(0.05)
    clock[0] += 11.0
    assert tuner.estimate(4) is None
    assert quantile([5.0, 1.0, 3.0, 2.0], 0.25) == 1.0


def test_batcher_takes_its_limit_from_the_tuner_and_reports_each_batch() -> None:
    class Stub:
        def __init__(self) -> None:
            self.seen: list[tuple[int, int, float]] = []

        def limit(self) -> int:
            return 3

        def observe(self, batch_size: int, limit: int, compute_s: float, backlog: int = 0) -> None:
            self.seen.append((batch_size, limit, compute_s, backlog))

    async def body() -> None:
        clock = FakeClock()
        handler = Handler(gated=True, clock=clock, compute_dt=0.25)
        stub = Stub()
        batcher: Batcher[int, int] = Batcher(handler, clock=clock, max_batch_size=8, tuner=stub)
        batcher.start()
        first = spawn(batcher, -1)
        await settle()
        rest = spawn(batcher, *range(7))
        await settle()
        handler.gate.set()
        await asyncio.gather(*first, *rest)
        assert handler.sizes == [1, 3, 3, 1]
        assert stub.seen == [(1, 3, 0.25, 0), (3, 3, 0.25, 4), (3, 3, 0.25, 1), (1, 3, 0.25, 0)]
        batcher.configure(tuner=None)
        assert batcher.tuner is None
        await batcher.aclose()

    run(body)


def test_a_cap_of_one_at_one_request_at_a_time_tries_nothing_but_tries_under_a_backlog() -> None:
    tuner, clock, _ = make(1)
    sim = Sim(tuner, clock, PEAKED)
    sim.run(60.0, waiting=1)  # concurrency 1: every batch fills the cap of 1, nothing waits behind it
    assert tuner.trials == 0 and set(sim.sizes) == {1}
    sim.run(60.0, waiting=3)  # requests wait behind each batch: the load is more than the cap
    assert tuner.trials > 0 and max(sim.sizes) > 1


def test_under_load_while_batches_are_mostly_loaded_and_recent_and_idle_since_the_last_one() -> None:
    tuner, clock, _ = make(8)
    assert not tuner.under_load(1.0) and tuner.idle_s() == 0.0  # no batch yet: idle since it was made
    sim = Sim(tuner, clock, PEAKED)
    sim.run(2.0)
    assert tuner.under_load(1.0) and tuner.idle_s() == 0.0
    clock[0] += 1.5  # the batches paused
    assert not tuner.under_load(1.0) and tuner.idle_s() == pytest.approx(1.5)
    sim.run(2.0, waiting=1, idle_s=0.05)  # light load: batches keep coming, none under load
    assert not tuner.under_load(1.0) and tuner.idle_s() == 0.0


# ----- widths: the torch threads per batch, tuned under load beside the cap

LIGHT_WIDTH = 2
"""The version's own count (the load-time choice): what a batch runs on when ``width_now()`` says 0."""


class WidthSim(Sim):
    """:class:`Sim` whose batch time depends on the width each batch runs on (``rates`` by (size, width))."""

    def __init__(self, tuner: OnlineTuner, clock: list[float], rates: Mapping[tuple[int, int], float]) -> None:
        super().__init__(tuner, clock, {})
        self.width_rates = rates
        self.widths: list[int] = []

    def batch_s(self, size: int) -> float:
        width = self.tuner.width_now() or LIGHT_WIDTH
        self.widths.append(width)
        return size / self.width_rates[max(k for k in self.width_rates if k[0] <= size and k[1] == width)]


def make_wide(cap: int, width: int, ceiling: int = 16) -> tuple[OnlineTuner, list[float], list[CapChange]]:
    clock = [1000.0]
    changes: list[CapChange] = []
    tuner = OnlineTuner(cap, ceiling, clock=lambda: clock[0], on_change=changes.append, widths=(1, 2), width=width)
    return tuner, clock, changes


# mobilenet_v3_small at concurrency 32 on the 2-core VM, shaped: two threads lose to one under load
ONE_THREAD_WINS = {(1, 1): 40.0, (2, 1): 80.0, (4, 1): 150.0, (8, 1): 230.0, (16, 1): 255.0,
                   (1, 2): 35.0, (2, 2): 70.0, (4, 2): 130.0, (8, 2): 190.0, (16, 2): 210.0}


def test_under_load_the_faster_width_is_found_with_the_best_cap() -> None:
    tuner, clock, changes = make_wide(8, width=2)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    sim.run(240.0)
    assert (tuner.cap, tuner.width) == (16, 1), [c.describe() for c in changes]
    width_moves = [c for c in changes if c.old_width != c.new_width]
    assert width_moves and width_moves[0].describe().startswith("torch threads 2 -> 1 at max_batch_size ")
    snapshot = tuner.snapshot()
    assert snapshot.width == 1 and {e.width for e in snapshot.estimates} == {1, 2}
    assert sim.widths[-50:] == [1] * 50  # settled: batches under load run on the chosen width


def test_more_threads_are_taken_only_when_clearly_faster() -> None:
    faster = {key: rate * (1.3 if key[1] == 2 else 1.0) for key, rate in ONE_THREAD_WINS.items()}
    tuner, clock, _ = make_wide(16, width=1)
    WidthSim(tuner, clock, faster).run(120.0)
    assert tuner.width == 2
    barely = {key: rate * (1.02 if key[1] == 2 else 1.0) for key, rate in ONE_THREAD_WINS.items()}
    tuner, clock, _ = make_wide(16, width=1)
    WidthSim(tuner, clock, barely).run(120.0)
    assert tuner.width == 1  # 2 % is within what noise gives: fewer threads leave cores to the rest


def test_light_load_runs_on_the_versions_own_count_and_tries_no_width() -> None:
    tuner, clock, _ = make_wide(8, width=1)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    sim.run(60.0, waiting=3)  # batches of 3 under a cap of 8: not full
    assert tuner.trials == 0 and set(sim.widths) == {LIGHT_WIDTH}
    assert tuner.width_now() == 0
    sim.run(5.0)  # load arrives: after the first full batch the tuned width applies
    assert sim.widths[-1] == 1 and tuner.width_now() == 1


def test_a_width_trial_runs_its_width_and_shows_in_the_snapshot() -> None:
    tuner, clock, _ = make_wide(8, width=2)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    while tuner.snapshot().exploring == 0:
        sim.run(0.001)
    snapshot = tuner.snapshot()  # widths are tried first: the sizes' turn comes next
    assert (snapshot.exploring, snapshot.exploring_width, snapshot.width) == (8, 1, 2)
    assert tuner.width_now() == 1 and tuner.limit() == 8


def test_widths_are_off_without_two_of_them_and_checked() -> None:
    tuner, clock, _ = make(4)
    Sim(tuner, clock, PEAKED).run(30.0)
    assert tuner.width_now() == 0 and tuner.snapshot().width == 0
    assert all(e.width == 0 for e in tuner.snapshot().estimates)
    assert OnlineTuner(4, 8, widths=(2,)).widths == ()
    with pytest.raises(ValueError, match="not one of"):
        OnlineTuner(4, 8, widths=(1, 2), width=4)
    with pytest.raises(ValueError, match="widths must be >= 1"):
        OnlineTuner(4, 8, widths=(0, 2))


def test_a_trial_measured_while_the_load_changed_moves_nothing() -> None:
    """A/B/A: the cap is measured again after each trial. A trial that ran as the load ended (its batches alone on
    the cores, twice as fast) is not taken when the cap's second look finds no full batches ..."""
    tuner, clock, changes = make_wide(16, width=1)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    while tuner.snapshot().exploring_width != 2:
        sim.run(0.001)
    sim.width_rates = {key: rate * 2 for key, rate in ONE_THREAD_WINS.items()}  # the preprocessing stopped
    while tuner.snapshot().exploring_width == 2:
        sim.run(0.001)
    sim.run(10.0, waiting=3)  # ... and the load with it
    assert changes == [] and tuner.width == 1
    # ... nor when the same speed-up lasts into the second look: the trial is compared with the better look
    sim.width_rates = dict(ONE_THREAD_WINS)
    sim.run(120.0)
    assert changes == [] and tuner.width == 1 and tuner.cap == 16
    while tuner.snapshot().exploring_width != 2:
        sim.run(0.001)
    sim.width_rates = {key: rate * (2 if key[1] == 1 else 1.9) for key, rate in ONE_THREAD_WINS.items()}
    sim.run(5.0)
    assert tuner.width == 1, [c.describe() for c in changes]


def test_a_cap_the_load_cannot_fill_is_measured_by_its_back_to_back_batches() -> None:
    """32 clients under a cap of 32 make batches of about 16, one right after the other: under load, though
    never full. The cap is measured by what its batches deliver, a smaller cap that fills is tried, and so is the
    other width; a cap of 32 at the same speed as 16 gives way to 16 (it answers no sooner, it only waits more)."""
    tuner, clock, changes = make_wide(32, width=2, ceiling=32)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    sim.run(120.0, waiting=16, idle_s=0.0)
    assert (tuner.cap, tuner.width) == (16, 1), [c.describe() for c in changes]
    assert max(sim.sizes) == 16 and sim.sizes[-20:] == [16] * 20
    # the same batches after an idle gap each (light load): nothing is tried
    tuner, clock, changes = make_wide(32, width=2, ceiling=32)
    WidthSim(tuner, clock, ONE_THREAD_WINS).run(120.0, waiting=16, idle_s=0.005)
    assert tuner.trials == 0 and changes == []


def test_a_batch_after_light_load_is_not_counted_for_the_width_it_did_not_run_on() -> None:
    """After a batch not under load the next runs on the version's own count (width_now() is 0), so its time must
    not be recorded for the tuner's width."""
    tuner, clock, _ = make_wide(8, width=1)
    clock[0] += 1.0
    tuner.observe(3, 8, 0.01)  # light: the next batch runs on the version's own count
    assert tuner.width_now() == 0
    clock[0] += 0.5
    tuner.observe(8, 8, 0.5, backlog=4)  # full, but it ran on the other count: not a sample of width 1
    assert tuner.snapshot().estimates == ()
    assert tuner.width_now() == 1
    clock[0] += 0.04
    tuner.observe(8, 8, 0.04, backlog=4)
    assert [(e.batch_size, e.width, e.samples) for e in tuner.snapshot().estimates] == [(8, 1, 1)]


def test_a_trial_older_than_the_samples_it_compares_is_dropped() -> None:
    tuner, clock, changes = make_wide(8, width=2)
    sim = WidthSim(tuner, clock, ONE_THREAD_WINS)
    while tuner.snapshot().exploring == 0:
        sim.run(0.001)
    clock[0] += 61.0  # the load stopped mid-trial; a minute later it is back with full batches
    sim.run(0.001)
    assert tuner.snapshot().exploring == 0 and changes == []
