"""How often an operator may reload a model (ReloadModel): concurrent requests share one reload, and each model
reloads at most once per ``--reload-min-interval-seconds``.

A reload loads every version of the model again, warms it up, validates and autotunes it on the shared inference
thread: seconds of work that every request of every model waits behind. Runs on the event loop; never blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from server.core.config import DEFAULT_RELOAD_MIN_INTERVAL_S
from server.core.errors import ModelUnavailable, Overloaded


class Reloads:
    """Coalesces and spaces out the reloads of each model; ``reload(name)`` does one (``ModelManager.reconcile``
    with ``force=True``). ``clock`` is injected by tests."""

    def __init__(self, reload: Callable[[str], Awaitable[object]],
                 min_interval_s: float = DEFAULT_RELOAD_MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self._reload = reload
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._running: dict[str, asyncio.Future[object]] = {}
        self._finished: dict[str, float] = {}  # model → when its last reload finished (failed ones count: they cost)

    async def reload(self, name: str) -> None:
        """Reload model ``name``, or wait for the reload of it that is running. Raises Overloaded (at once) within
        the interval after its last reload, ModelUnavailable when the repository cannot be read (a filesystem
        outage is the situation's fault, not the caller's: retryable), or what the reload raises. Cancelling the
        caller does not cancel a reload: others may share it."""
        running = self._running.get(name)
        if running is None:
            self._check_interval(name)
            running = asyncio.ensure_future(self._reload_reading_disk(name))
            self._running[name] = running
            running.add_done_callback(lambda done: self._finish(name, done))
        await asyncio.shield(running)

    async def _reload_reading_disk(self, name: str) -> object:
        try:
            return await self._reload(name)
        except OSError as exc:
            raise ModelUnavailable(f"cannot reload model {name}: the model repository cannot be read "
                                   f"({exc.strerror or exc}); retry once it is back") from exc

    def _check_interval(self, name: str) -> None:
        last = self._finished.get(name)
        if last is None:
            return
        wait = last + self._min_interval_s - self._clock()
        if wait > 0:
            raise Overloaded(f"model {name} was reloaded {self._min_interval_s - wait:.1f} s ago; a model reloads at "
                             f"most once per {self._min_interval_s:g} s (--reload-min-interval-seconds): retry in "
                             f"{wait:.1f} s")

    def _finish(self, name: str, done: asyncio.Future[object]) -> None:
        self._finished[name] = self._clock()
        if self._running.get(name) is done:
            del self._running[name]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone; each one still waiting gets it raised
