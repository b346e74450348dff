"""ReloadModel's policy (server/models/reloads.py): concurrent reloads of a model share one, and a model reloads at
most once per interval, measured from the end of its last reload on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from server.core.errors import ModelUnavailable, Overloaded
from server.models.reloads import Reloads
from tests.support.batcher_harness import FakeClock, settle


class Reloader:
    """Counts reloads per model; each one waits until the test lets it finish (or fail)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finish = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, name: str) -> None:
        self.started.append(name)
        await self.finish.wait()
        if self.error is not None:
            raise self.error


def test_concurrent_reloads_of_a_model_share_one_and_other_models_reload_alongside() -> None:
    async def scenario() -> None:
        reloader, clock = Reloader(), FakeClock()
        reloads = Reloads(reloader, 5.0, clock.now)
        calls = [asyncio.ensure_future(reloads.reload(name)) for name in ("a", "a", "a", "b")]
        await settle()
        assert reloader.started == ["a", "b"]
        calls[0].cancel()  # a caller that goes away does not cancel the reload the others wait for
        reloader.finish.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [None, None, None]
        assert reloader.started == ["a", "b"]

    asyncio.run(scenario())


def test_a_model_reloads_at_most_once_per_interval_after_its_last_reload_finished() -> None:
    async def scenario() -> None:
        reloader, clock = Reloader(), FakeClock()
        reloader.finish.set()
        reloads = Reloads(reloader, 5.0, clock.now)
        await reloads.reload("a")
        clock.advance(3.5)
        with pytest.raises(Overloaded, match=r"model a was reloaded 3\.5 s ago; .* once per 5 s .*retry in 1\.5 s"):
            await reloads.reload("a")
        await reloads.reload("b")  # the interval is per model
        clock.advance(1.5)
        await reloads.reload("a")
        assert reloader.started == ["a", "b", "a"]

    asyncio.run(scenario())


def test_a_failed_reload_counts_and_its_error_reaches_every_caller() -> None:
    async def scenario() -> None:
        reloader, clock = Reloader(), FakeClock()
        reloader.error = RuntimeError("warm-up ran out of memory")
        reloads = Reloads(reloader, 5.0, clock.now)
        calls = [asyncio.ensure_future(reloads.reload("a")) for _ in range(2)]
        await settle()
        reloader.finish.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [str(r) for r in results] == ["warm-up ran out of memory"] * 2
        with pytest.raises(Overloaded):
            await reloads.reload("a")

    asyncio.run(scenario())


def test_interval_zero_allows_back_to_back_reloads_and_a_negative_one_is_refused() -> None:
    async def scenario() -> None:
        reloader = Reloader()
        reloader.finish.set()
        reloads = Reloads(reloader, 0.0, FakeClock().now)
        await reloads.reload("a")
        await reloads.reload("a")
        assert reloader.started == ["a", "a"]

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="min_interval_s"):
        Reloads(Reloader(), -1.0)


def test_a_reload_that_cannot_read_the_repository_is_unavailable_not_internal() -> None:
    async def scenario() -> None:
        reloader, clock = Reloader(), FakeClock()
        reloader.error = FileNotFoundError(2, "No such file or directory")
        reloader.finish.set()
        with pytest.raises(ModelUnavailable, match=r"model repository cannot be read .*No such file"):
            await Reloads(reloader, 5.0, clock.now).reload("a")

    asyncio.run(scenario())
