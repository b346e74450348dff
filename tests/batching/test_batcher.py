"""Tests of server.batching.batcher: a fake clock and gated handlers, no real sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.batching.batcher import Batcher
from server.batching.interface import Batched, BatcherClosed, DeadlineExpired, QueueFull, SystemClock
from tests.support.batcher_harness import T0, FakeClock, Handler, run, settle, spawn

pytestmark = pytest.mark.timeout(10)


async def echo(items: list[Any]) -> list[Any]:
    return items


def make(handler: Handler, clock: FakeClock | None = None, **kwargs: Any) -> Batcher[Any, Any]:
    batcher: Batcher[Any, Any] = Batcher(handler, clock=clock or FakeClock(), **kwargs)
    batcher.start()
    return batcher


async def block_first(handler: Handler, batcher: Batcher[Any, Any], item: Any = 0) -> asyncio.Task[Batched[Any]]:
    """Submit one item and let it reach the (gated) handler, so later submits queue up."""
    task = spawn(batcher, item)[0]
    await settle()
    assert handler.batches == [[item]]
    return task


# 1
def test_lone_request_dispatched_at_once_without_timer() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=8)
        result = await batcher.submit(3)
        assert handler.batches == [[3]]
        assert result == Batched(value=30, batch_size=1, queue_s=0.0, compute_s=0.0)
        assert clock.sleep_calls == []
        await batcher.aclose()

    run(body)


# 2
def test_accumulated_requests_form_full_batches_in_order() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher, item=-1)
        tasks = spawn(batcher, *range(10))
        await settle()
        assert batcher.queue_depth == 10
        assert handler.sizes == [1]
        handler.gate.set()
        results = await asyncio.gather(first, *tasks)
        assert handler.batches == [[-1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert [r.value for r in results[1:]] == [i * 10 for i in range(10)]
        assert [r.batch_size for r in results] == [1] + [4] * 8 + [2] * 2
        assert batcher.queue_depth == 0
        await batcher.aclose()

    run(body)


# 3
def test_max_delay_waits_from_first_item_then_dispatches() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=3, max_delay_s=0.5)
        a = spawn(batcher, 1)[0]
        await settle()
        assert handler.batches == []
        assert clock.sleep_calls == [0.5]
        clock.advance(0.25)
        b = spawn(batcher, 2)[0]
        await settle()
        clock.advance(0.125)
        await settle()
        assert handler.batches == []  # 0.375 s after the first submit
        clock.advance(0.125)
        await settle()
        assert handler.batches == [[1, 2]]
        ra, rb = await asyncio.gather(a, b)
        assert (ra.batch_size, ra.queue_s) == (2, 0.5)
        assert (rb.batch_size, rb.queue_s) == (2, 0.25)
        await batcher.aclose()

    run(body)


def test_max_delay_dispatches_as_soon_as_full() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=2, max_delay_s=10.0)
        a = spawn(batcher, 1)[0]
        await settle()
        assert handler.batches == []
        b = spawn(batcher, 2)[0]
        await settle()
        assert handler.batches == [[1, 2]]
        assert [r.value for r in await asyncio.gather(a, b)] == [10, 20]
        assert clock.pending_sleeps == 0  # the window's timer was cancelled
        assert clock.now() == T0
        await batcher.aclose()

    run(body)


def test_max_delay_already_spent_while_previous_batch_computed() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler(gated=True)
        batcher = make(handler, clock, max_batch_size=4, max_delay_s=1.0)
        first = spawn(batcher, 0)[0]
        await settle()
        clock.advance(1.0)
        await settle()
        assert handler.batches == [[0]]
        waiting = spawn(batcher, 1, 2)
        await settle()
        clock.advance(2.0)  # longer than the delay: no further wait is due
        handler.gate.set()
        await asyncio.gather(first, *waiting)
        assert handler.batches == [[0], [1, 2]]
        assert clock.sleep_calls == [1.0]
        await batcher.aclose()

    run(body)


# 4
def test_deadline_passed_while_queued_is_never_computed() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler(gated=True)
        batcher = make(handler, clock, max_batch_size=4)
        first = await block_first(handler, batcher)
        late = spawn(batcher, 1, deadline=T0 + 1.0)[0]
        ok = spawn(batcher, 2, deadline=T0 + 5.0)[0]
        await settle()
        clock.advance(1.0)  # now == late's deadline: expired
        handler.gate.set()
        with pytest.raises(DeadlineExpired):
            await late
        assert (await ok).value == 20
        await first
        assert handler.batches == [[0], [2]]
        await batcher.aclose()

    run(body)


def test_batch_of_only_expired_items_is_not_dispatched() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler(gated=True)
        batcher = make(handler, clock, max_batch_size=4)
        first = await block_first(handler, batcher)
        late = spawn(batcher, 1, 2, deadline=T0 + 0.5)
        await settle()
        clock.advance(1.0)
        handler.gate.set()
        outcomes = await asyncio.gather(*late, return_exceptions=True)
        assert all(isinstance(o, DeadlineExpired) for o in outcomes)
        await first
        assert handler.batches == [[0]]
        await batcher.aclose()

    run(body)


# 5
def test_cancelled_caller_is_skipped() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher)
        a, b, c = spawn(batcher, 1, 2, 3)
        await settle()
        b.cancel()
        await settle()
        assert b.cancelled()
        assert batcher.queue_depth == 2
        handler.gate.set()
        assert [r.value for r in await asyncio.gather(a, c)] == [10, 30]
        assert [r.batch_size for r in await asyncio.gather(a, c)] == [2, 2]
        await first
        assert handler.batches == [[0], [1, 3]]
        await batcher.aclose()

    run(body)


def test_cancel_during_compute_discards_result_silently() -> None:
    async def body() -> None:
        handler = Handler(gated=True, result=lambda x: ValueError("bad") if x == 2 else x)
        batcher = make(handler, max_batch_size=4)
        tasks = spawn(batcher, 1, 2)
        await settle()
        assert handler.batches == [[1, 2]]
        for task in tasks:
            task.cancel()
        await settle()
        handler.gate.set()
        await settle()
        assert all(t.cancelled() for t in tasks)
        assert (await batcher.submit(5)).value == 5  # worker still alive
        await batcher.aclose()

    run(body)  # run() fails on "exception was never retrieved" or InvalidStateError


# 6
def test_handler_exception_fans_out_to_its_batch_only() -> None:
    async def body() -> None:
        boom = ValueError("boom")
        handler = Handler(gated=True, raise_if=lambda batch: boom if "boom" in batch else None)
        batcher = make(handler, max_batch_size=2)
        first = await block_first(handler, batcher)
        tasks = spawn(batcher, "boom", "x", "y", "z")
        await settle()
        handler.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert outcomes[0] is boom
        assert outcomes[1] is boom
        assert [o.value for o in outcomes[2:]] == ["y" * 10, "z" * 10]
        assert (await first).value == 0
        assert handler.batches == [[0], ["boom", "x"], ["y", "z"]]
        await batcher.aclose()

    run(body)


def test_handler_own_cancellation_does_not_kill_worker() -> None:
    async def body() -> None:
        handler = Handler(raise_if=lambda batch: asyncio.CancelledError() if 1 in batch else None)
        batcher = make(handler, max_batch_size=2)
        with pytest.raises(RuntimeError, match="cancelled"):
            await batcher.submit(1)
        assert (await batcher.submit(2)).value == 20
        await batcher.aclose()

    run(body)


# 7
def test_per_item_exception_fails_only_that_item() -> None:
    async def body() -> None:
        handler = Handler(gated=True, result=lambda x: KeyError(x) if x % 2 else x)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher)
        tasks = spawn(batcher, 1, 2, 3, 4)
        await settle()
        handler.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[0], KeyError) and outcomes[0].args == (1,)
        assert isinstance(outcomes[2], KeyError) and outcomes[2].args == (3,)
        assert [outcomes[1].value, outcomes[3].value] == [2, 4]
        assert outcomes[1].batch_size == 4
        await first
        await batcher.aclose()

    run(body)


def test_unsettable_item_results_become_runtime_errors() -> None:
    async def body() -> None:
        errors = {1: StopIteration(), 2: asyncio.CancelledError()}
        handler = Handler(result=lambda x: errors.get(x, x))
        batcher = make(handler, max_batch_size=4)
        outcomes = await asyncio.gather(*spawn(batcher, 1, 2, 3), return_exceptions=True)
        assert [type(o) for o in outcomes[:2]] == [RuntimeError, RuntimeError]
        assert outcomes[0].__cause__ is errors[1]
        assert outcomes[2].value == 3
        assert handler.sizes == [3]
        assert (await batcher.submit(4)).value == 4
        await batcher.aclose()

    run(body)


# 8
def test_wrong_result_count_fails_batch_and_worker_survives() -> None:
    async def body() -> None:
        handler = Handler(gated=True, results_for=lambda batch: [] if "short" in batch else None)
        batcher = make(handler, max_batch_size=2)
        first = await block_first(handler, batcher)
        tasks = spawn(batcher, "short", "x")
        await settle()
        handler.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, RuntimeError)
            assert "0 results for a batch of 2" in str(outcome)
        await first
        assert (await batcher.submit(7)).value == 70
        await batcher.aclose()

    run(body)


# 9
def test_queue_full_counts_waiting_items_only() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4, max_queue=2, name="digits")
        first = await block_first(handler, batcher)  # computing: not counted
        waiting = spawn(batcher, 1, 2)
        await settle()
        assert batcher.queue_depth == 2
        with pytest.raises(QueueFull, match=r"digits.*max_queue=2"):
            await batcher.submit(3)
        handler.gate.set()
        await asyncio.gather(first, *waiting)
        assert (await batcher.submit(4)).value == 40  # room again
        assert handler.batches == [[0], [1, 2], [4]]
        await batcher.aclose()

    run(body)


# 10
def test_aclose_drain_computes_queued_then_refuses() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher)
        queued = spawn(batcher, 1, 2, 3)
        await settle()
        closing = asyncio.ensure_future(batcher.aclose(drain=True))
        await settle()
        assert not closing.done()
        with pytest.raises(BatcherClosed):
            await batcher.submit(9)
        handler.gate.set()
        await closing
        assert [r.value for r in await asyncio.gather(first, *queued)] == [0, 10, 20, 30]
        assert handler.batches == [[0], [1, 2, 3]]
        await batcher.aclose()  # idempotent
        with pytest.raises(BatcherClosed):
            await batcher.submit(9)

    run(body)


def test_aclose_without_drain_fails_queued_and_finishes_inflight() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher)
        queued = spawn(batcher, 1, 2)
        await settle()
        closing = asyncio.ensure_future(batcher.aclose(drain=False))
        await settle()
        for task in queued:
            assert task.done()
            assert isinstance(task.exception(), BatcherClosed)
        assert not closing.done()  # the in-flight batch is still computing
        handler.gate.set()
        await closing
        assert (await first).value == 0
        assert handler.batches == [[0]]

    run(body)


def test_aclose_without_drain_during_delay_window() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=4, max_delay_s=5.0)
        task = spawn(batcher, 1)[0]
        await settle()
        await batcher.aclose(drain=False)
        with pytest.raises(BatcherClosed):
            await task
        assert handler.batches == []

    run(body)


def test_aclose_drain_ends_delay_window_early() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=4, max_delay_s=5.0)
        task = spawn(batcher, 1)[0]
        await settle()
        await batcher.aclose(drain=True)
        assert (await task).value == 10
        assert clock.now() == T0

    run(body)


def test_aclose_before_start_fails_queued() -> None:
    async def body() -> None:
        batcher: Batcher[Any, Any] = Batcher(Handler(), max_batch_size=2, clock=FakeClock())
        task = spawn(batcher, 1)[0]
        await settle()
        await batcher.aclose()
        with pytest.raises(BatcherClosed):
            await task
        with pytest.raises(BatcherClosed):
            batcher.start()

    run(body)


# 11
def test_queue_and_compute_times_use_the_clock() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler(gated=True, clock=clock, compute_dt=2.0)
        batcher = make(handler, clock, max_batch_size=4)
        a = await block_first(handler, batcher)  # dispatched at T0
        clock.advance(1.0)
        b = spawn(batcher, 1)[0]  # submitted at T0 + 1
        await settle()
        clock.advance(0.5)
        handler.gate.set()  # a finishes at T0 + 3.5; b dispatched then, done at T0 + 5.5
        ra, rb = await asyncio.gather(a, b)
        assert (ra.queue_s, ra.compute_s) == (0.0, 3.5)
        assert (rb.queue_s, rb.compute_s) == (2.5, 2.0)
        await batcher.aclose()

    run(body)


# 12
def test_configure_applies_to_next_batch() -> None:
    async def body() -> None:
        handler = Handler(gated=True)
        batcher = make(handler, max_batch_size=4)
        first = await block_first(handler, batcher)
        tasks = spawn(batcher, *range(1, 7))
        await settle()
        batcher.configure(max_batch_size=2, max_delay_s=0.25)
        assert (batcher.max_batch_size, batcher.max_delay_s) == (2, 0.25)
        handler.gate.set()  # queued since long ago: the delay is already spent
        await asyncio.gather(first, *tasks)
        assert handler.sizes == [1, 2, 2, 2]
        await batcher.aclose()

    run(body)


def test_configure_can_complete_a_collecting_batch() -> None:
    async def body() -> None:
        clock = FakeClock()
        handler = Handler()
        batcher = make(handler, clock, max_batch_size=4, max_delay_s=5.0)
        tasks = spawn(batcher, 1, 2)
        await settle()
        assert handler.batches == []
        batcher.configure(max_batch_size=2)
        await settle()
        assert handler.batches == [[1, 2]]
        await asyncio.gather(*tasks)
        await batcher.aclose()

    run(body)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_batch_size": 2, "max_delay_s": -1.0}, {"max_batch_size": 2, "max_queue": 0}],
)
def test_invalid_settings_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Batcher(echo, **kwargs)


def test_invalid_configure_changes_nothing() -> None:
    batcher: Batcher[Any, Any] = Batcher(echo, max_batch_size=3, max_delay_s=0.5)
    with pytest.raises(ValueError):
        batcher.configure(max_batch_size=4, max_delay_s=float("nan"))
    assert (batcher.max_batch_size, batcher.max_delay_s) == (3, 0.5)


def test_system_clock_smoke() -> None:
    async def body() -> None:
        handler = Handler()
        batcher: Batcher[Any, Any] = Batcher(handler, max_batch_size=8, max_delay_s=0.001)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
        assert [r.value for r in results] == [0, 10, 20]
        assert handler.sizes == [3]
        assert all(r.queue_s >= 0 and r.compute_s >= 0 for r in results)
        assert SystemClock().now() > 0
        await batcher.aclose()

    run(body)


class PerBatchGates:
    """Every call blocks on a gate of its own (``gates[i]`` for the i-th batch), so batches finish in any order."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [x * 10 for x in items]


def test_next_batch_is_handed_over_while_the_first_computes_with_two_in_flight() -> None:
    async def body() -> None:
        handler = PerBatchGates()
        batcher: Batcher[Any, Any] = Batcher(handler, clock=FakeClock(), max_batch_size=4, max_concurrent_batches=2)
        batcher.start()
        first = spawn(batcher, 1)
        await settle()
        second = spawn(batcher, 2, 3)
        await settle()
        assert handler.batches == [[1], [2, 3]]  # formed and handed over while [1] is still computing
        third = spawn(batcher, 4)
        await settle()
        assert handler.batches == [[1], [2, 3]]  # two in flight: the third waits for a free slot
        assert batcher.queue_depth == 1
        handler.gates[1].set()  # the second batch finishes first
        assert [r.value for r in await asyncio.gather(*second)] == [20, 30]
        await settle()
        assert handler.batches == [[1], [2, 3], [4]]
        handler.gates[0].set()
        handler.gates[2].set()
        assert [r.value for r in await asyncio.gather(*first, *third)] == [10, 40]
        await batcher.aclose()

    run(body)


def test_one_batch_at_a_time_by_default() -> None:
    async def body() -> None:
        handler = PerBatchGates()
        batcher = make(handler, max_batch_size=4)  # type: ignore[arg-type]
        first = spawn(batcher, 1)
        await settle()
        second = spawn(batcher, 2, 3)
        await settle()
        assert handler.batches == [[1]]
        handler.gates[0].set()
        await settle()
        assert handler.batches == [[1], [2, 3]]
        handler.gates[1].set()
        assert [r.value for r in await asyncio.gather(*first, *second)] == [10, 20, 30]
        await batcher.aclose()

    run(body)


def test_closing_waits_for_every_batch_in_flight() -> None:
    async def body() -> None:
        handler = PerBatchGates()
        batcher: Batcher[Any, Any] = Batcher(handler, clock=FakeClock(), max_batch_size=1, max_concurrent_batches=2)
        batcher.start()
        tasks = spawn(batcher, 1, 2)
        await settle()
        closing = asyncio.ensure_future(batcher.aclose())
        await settle()
        assert not closing.done()
        handler.gates[1].set()
        await settle()
        assert not closing.done()  # the first batch is still computing
        handler.gates[0].set()
        await closing
        assert [r.value for r in await asyncio.gather(*tasks)] == [10, 20]

    run(body)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_concurrent_batches_must_be_a_positive_int(value: Any) -> None:
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        Batcher(echo, max_batch_size=1, max_concurrent_batches=value)
