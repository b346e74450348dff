"""The process-wide decode budget (server/inference/decode_budget.py): reservations wait on the loop in order,
within their deadline, and every byte comes back on every path; and the preparer's use of it (prepare.py)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from classifier.v1 import classifier_pb2 as pb
from classifier.v1 import classifier_pb2_grpc as pb_grpc
from PIL import Image

from server.core.errors import InvalidInput, Overloaded
from server.core.manifest import InputSpec
from server.inference.decode_budget import DecodeBudget
from server.inference.decode_cost import decode_bytes
from server.inference.prepare import InputPreparer
from server.inference.preprocess import open_input
from tests.support.kit import running_daemon, write_model

pytestmark = pytest.mark.timeout(60)
MIB = 1 << 20


class Clock:
    """An injected monotonic clock: deadlines are compared with it, never with the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready task run until it waits again (no timing involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_reservations_that_fit_are_immediate_and_come_back() -> None:
    async def main() -> None:
        budget = DecodeBudget(100)
        await budget.reserve(60)
        assert budget.try_reserve(40)
        assert budget.in_use == 100
        assert not budget.try_reserve(1)
        budget.release(60)
        budget.release(40)
        assert budget.in_use == 0

    asyncio.run(main())


def test_a_reservation_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = DecodeBudget(10 * MIB)
    with pytest.raises(Overloaded, match=r"more than the whole decode budget of 10 MiB \(--max-decode-bytes\)"):
        budget.try_reserve(11 * MIB)
    with pytest.raises(Overloaded, match="--max-decode-bytes"):
        asyncio.run(budget.reserve(11 * MIB))
    assert budget.in_use == 0 and budget.waiting == 0


def test_a_waiting_reservation_is_granted_when_bytes_come_back_from_another_thread() -> None:
    async def main() -> None:
        budget = DecodeBudget(100)
        await budget.reserve(80)
        waiting = asyncio.ensure_future(budget.reserve(50))
        await settle()
        assert not waiting.done() and budget.waiting == 1
        releaser = threading.Thread(target=budget.release, args=(80,))  # as a pool thread gives bytes back
        releaser.start()
        await asyncio.wait_for(waiting, 10)
        releaser.join()
        assert budget.in_use == 50 and budget.waiting == 0

    asyncio.run(main())


def test_reservations_are_granted_in_order_a_small_one_does_not_overtake_a_large_one() -> None:
    async def main() -> None:
        budget = DecodeBudget(100)
        await budget.reserve(60)
        large = asyncio.ensure_future(budget.reserve(70))
        await settle()
        assert not budget.try_reserve(10)  # it would fit, but the large one waits first
        small = asyncio.ensure_future(budget.reserve(10))
        await settle()
        assert not small.done()
        budget.release(60)
        await asyncio.wait_for(asyncio.gather(large, small), 10)
        assert budget.in_use == 80

    asyncio.run(main())


def test_a_deadline_already_passed_is_refused_without_waiting() -> None:
    async def main() -> None:
        clock = Clock()
        budget = DecodeBudget(100 * MIB, clock=clock)
        await budget.reserve(90 * MIB)
        with pytest.raises(Overloaded, match=r"decode budget of 100 MiB \(--max-decode-bytes\) was in use"):
            await budget.reserve(20 * MIB, deadline=clock.now)
        assert budget.in_use == 90 * MIB and budget.waiting == 0

    asyncio.run(main())


def test_a_deadline_that_passes_while_waiting_is_refused_and_lets_the_next_one_in() -> None:
    async def main() -> None:
        clock = Clock()
        budget = DecodeBudget(100, clock=clock)
        await budget.reserve(60)
        doomed = asyncio.ensure_future(budget.reserve(70, deadline=clock.now + 0.01))
        await settle()
        behind = asyncio.ensure_future(budget.reserve(30))  # fits, but waits behind the large one
        await settle()
        assert not behind.done()
        with pytest.raises(Overloaded, match="until this request's deadline"):
            await doomed
        await asyncio.wait_for(behind, 10)  # the refused one stood in its way; now it is granted
        assert budget.in_use == 90 and budget.waiting == 0

    asyncio.run(main())


def test_a_cancelled_reservation_holds_nothing_whether_or_not_it_was_granted() -> None:
    async def main() -> None:
        budget = DecodeBudget(100)
        await budget.reserve(100)
        waiting = asyncio.ensure_future(budget.reserve(40))
        await settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert budget.waiting == 0 and budget.in_use == 100
        granted = asyncio.ensure_future(budget.reserve(40))
        await settle()
        budget.release(100)  # grants it; the task is cancelled before it resumes
        granted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await granted
        assert budget.in_use == 0

    asyncio.run(main())


# ----- the preparer: decodes reserve from the budget, waiting on the loop


def png16(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), 40000, np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def version_of(spec: InputSpec) -> SimpleNamespace:
    """The attributes of a LoadedVersion that InputPreparer.prepare reads (an eager PyTorch version on the CPU)."""
    return SimpleNamespace(manifest=SimpleNamespace(input=spec, tiling=None), decodes_on_device=False,
                           device=SimpleNamespace(type="cpu"), runtime=None)


GREY = InputSpec(color="L", height=8, width=8, resize=8)


def test_a_decode_that_does_not_fit_waits_on_the_loop_without_holding_a_pool_thread() -> None:
    data = png16(1000)
    need = decode_bytes(open_input(data), data, GREY)

    async def main() -> None:
        inputs = InputPreparer(1, budget=DecodeBudget(need + need // 2))
        try:
            await inputs.budget.reserve(need)  # another decode holds most of the budget
            waiting = asyncio.ensure_future(inputs.prepare(data, version_of(GREY)))  # type: ignore[arg-type]
            await asyncio.wait_for(inputs.run(lambda: None), 10)  # the only pool thread is free meanwhile
            while inputs.budget.waiting == 0:  # its header is read in the pool; then it waits on the loop
                await asyncio.sleep(0.01)
            assert not waiting.done()
            inputs.budget.release(need)
            pixels = await asyncio.wait_for(waiting, 30)
            assert pixels.shape == (8, 8, 1) and int(pixels[0, 0, 0]) == round(40000 / 257)
            assert inputs.budget.in_use == 0
        finally:
            inputs.shutdown()

    asyncio.run(main())


def test_every_path_gives_the_bytes_back(tmp_path: Path) -> None:
    data = png16(600)
    truncated = data[: len(data) // 2]  # a valid header, pixels missing: InvalidInput after the reservation

    async def main() -> None:
        inputs = InputPreparer(2, budget=DecodeBudget(64 * MIB))
        try:
            await inputs.prepare(data, version_of(GREY))  # type: ignore[arg-type]
            with pytest.raises(InvalidInput, match="cannot decode image"):
                await inputs.prepare(truncated, version_of(GREY))  # type: ignore[arg-type]
            await inputs.budget.reserve(64 * MIB)
            waiting = asyncio.ensure_future(inputs.prepare(data, version_of(GREY)))  # type: ignore[arg-type]
            while inputs.budget.waiting == 0:
                await asyncio.sleep(0.01)
            waiting.cancel()  # the client went away while it waited
            with pytest.raises(asyncio.CancelledError):
                await waiting
            inputs.budget.release(64 * MIB)
            running = asyncio.ensure_future(inputs.prepare(data, version_of(GREY)))  # type: ignore[arg-type]
            await asyncio.sleep(0)
            running.cancel()  # cancelled while (or before) its pool job runs: the job gives the bytes back
            with pytest.raises(asyncio.CancelledError):
                await running
            await asyncio.get_running_loop().run_in_executor(None, inputs.shutdown)  # every job has finished
            assert inputs.budget.in_use == 0 and inputs.budget.waiting == 0
        finally:
            inputs.shutdown()

    asyncio.run(main())


def test_an_input_larger_than_the_whole_budget_is_resource_exhausted() -> None:
    async def main() -> None:
        inputs = InputPreparer(1, budget=DecodeBudget(MIB))
        try:
            with pytest.raises(Overloaded, match=r"more than the whole decode budget of 1\.0 MiB"):
                await inputs.prepare(png16(1000), version_of(GREY))  # type: ignore[arg-type]
            assert inputs.budget.in_use == 0
        finally:
            inputs.shutdown()

    asyncio.run(main())


# ----- a real daemon: concurrent large 16-bit PNGs through a small budget


def test_concurrent_large_images_through_a_small_budget_are_all_answered(tmp_path: Path) -> None:
    write_model(tmp_path, "grey", manifest={"input": {"color": "L", "size": 8, "resize": 8}})
    large, too_large = png16(3000), png16(6000)
    need = decode_bytes(open_input(large), large, GREY)
    budget = need + need // 2  # one large decode at a time, although four pool threads could run four
    assert decode_bytes(open_input(too_large), too_large, GREY) > budget
    with running_daemon(tmp_path, watch=False, max_decode_bytes=budget, preprocess_threads=4) as running, \
            grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert running.daemon is not None
        held = running.daemon.service.decode_budget
        assert held.try_reserve(need)  # as if another decode were running: the first ones must wait
        calls = [stub.Classify.future(pb.ClassifyRequest(model="grey", image=image), timeout=120)
                 for image in [large] * 8 + [too_large]]
        deadline = time.monotonic() + 60
        while held.waiting < 1:  # waiting on the daemon's loop, not in its pool
            assert time.monotonic() < deadline, "no request waited for the decode budget"
            time.sleep(0.01)
        held.release(need)
        outcomes = []
        for call in calls:
            try:
                outcomes.append((grpc.StatusCode.OK, call.result().predictions[0].label))
            except grpc.RpcError as exc:
                outcomes.append((exc.code(), exc.details()))
        assert running.daemon.service.decode_budget.in_use == 0  # given back before each answer was sent
        assert running.daemon.service.decode_budget.limit == budget
    assert [code for code, _ in outcomes] == [grpc.StatusCode.OK] * 8 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert "more than the whole decode budget" in outcomes[-1][1] and "--max-decode-bytes" in outcomes[-1][1]
