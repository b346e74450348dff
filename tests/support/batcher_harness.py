"""Test helper: drive a :class:`~server.batching.batcher.Batcher` without real sleeps: a fake clock, a recording
handler that can be held at a gate, and the loop helpers the batcher tests share."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any

from server.batching.batcher import Batcher
from server.batching.interface import Batched

T0 = 100.0
"""Where a :class:`FakeClock` starts."""


class FakeClock:
    """now() is set by the test; sleep() blocks until advance() passes its end."""

    def __init__(self, start: float = T0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleep_calls: list[float] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.sleep_calls.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, future))
        await future

    def advance(self, dt: float) -> None:
        self._now += dt
        for end, future in self._sleepers:
            if end <= self._now and not future.done():
                future.set_result(None)
        self._sleepers = [(end, f) for end, f in self._sleepers if not f.done()]

    @property
    def pending_sleeps(self) -> int:
        return sum(not f.done() for _, f in self._sleepers)


class Handler:
    """Records each batch; while ``gate`` is clear, every call blocks on it.

    ``result`` maps an item to its result (a value or an exception instance);
    ``compute_dt`` advances the fake clock inside the call to fake compute time.
    """

    def __init__(
        self,
        *,
        gated: bool = False,
        result: Callable[[Any], Any] = lambda x: x * 10,
        clock: FakeClock | None = None,
        compute_dt: float = 0.0,
        raise_if: Callable[[list[Any]], BaseException | None] = lambda batch: None,
        results_for: Callable[[list[Any]], list[Any] | None] = lambda batch: None,
    ) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self._result = result
        self._clock = clock
        self._compute_dt = compute_dt
        self._raise_if = raise_if
        self._results_for = results_for

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self._clock is not None and self._compute_dt:
            self._clock.advance(self._compute_dt)
        error = self._raise_if(items)
        if error is not None:
            raise error
        override = self._results_for(items)
        return override if override is not None else [self._result(x) for x in items]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async test body and fail on any error the loop reported on its own."""

    async def body() -> None:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        await test()
        gc.collect()  # unretrieved future exceptions are reported on collection
        await settle()
        assert reported == [], reported

    asyncio.run(body())


async def settle(rounds: int = 20) -> None:
    """Let every ready task run until nothing is left to do."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def spawn(batcher: Batcher[Any, Any], *items: Any, **kwargs: Any) -> list[asyncio.Task[Batched[Any]]]:
    """Submit each item from a task of its own (not awaited: the test decides when to let them run)."""
    return [asyncio.ensure_future(batcher.submit(item, **kwargs)) for item in items]
