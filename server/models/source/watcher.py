"""Watch the model repository and hand changed models to the manager.

File events (inotify through watchfiles, or polling for network filesystems)
only say *which model* changed; the manager's ``reconcile`` decides what to
do, and is asked again after the settle period while files are still moving.
A periodic rescan catches anything the events missed, so a failed load never
leaves the watcher blind to later changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import watchfiles

from server.models.source.repository import SettleTracker, model_names

log = logging.getLogger("classifyd.watch")


class Reconciler(Protocol):
    """What the watcher drives (the model manager): TF Serving's source → manager callback, typed structurally."""

    def model_names(self) -> Iterable[str]:
        """The models it holds records of (loaded, failed or being removed)."""
        ...

    async def reconcile(self, name: str, *, settle: SettleTracker) -> float:
        """Bring model ``name`` in line with its directory; seconds to wait before asking again (0: done)."""
        ...


class RepositoryWatcher:
    """Reconciles models whose directories change. ``start()``, then ``await aclose()``."""

    def __init__(self, manager: Reconciler, models_dir: Path, *, settle_s: float = 1.0, poll: bool = False,
                 poll_interval_s: float = 0.5, rescan_s: float = 30.0) -> None:
        self._manager = manager
        self._models_dir = models_dir
        self._settle = SettleTracker(settle_s)
        self._poll = poll
        self._poll_interval_s = poll_interval_s
        self._rescan_s = rescan_s
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start watching. Changes made before the watch was armed are caught by one catch-up rescan."""
        self._tasks = [asyncio.create_task(self._watch(), name="classifyd-watch"),
                       asyncio.create_task(self._schedule(), name="classifyd-reconcile"),
                       asyncio.create_task(self._rescan(), name="classifyd-rescan")]
        for _ in range(3):  # let the watch task run up to its first wait: the inotify watch is then in place
            await asyncio.sleep(0)
        self._touch_all()
        asyncio.get_running_loop().call_later(1.0, self._touch_all)

    def _touch_all(self) -> None:
        if self._stop.is_set():
            return
        for name in set(model_names(self._models_dir)) | set(self._manager.model_names()):
            self.touch(name)

    def touch(self, name: str, delay_s: float = 0.0) -> None:
        """Ask for model ``name`` to be reconciled after ``delay_s`` seconds (sooner requests win)."""
        due = time.monotonic() + delay_s
        self._due[name] = min(due, self._due.get(name, due))
        self._wake.set()

    async def _watch(self) -> None:
        async for changes in watchfiles.awatch(self._models_dir, watch_filter=None, debounce=200, step=20,
                                               stop_event=self._stop, force_polling=self._poll or None,
                                               poll_delay_ms=round(self._poll_interval_s * 1000)):
            for name in {self._model_of(Path(path)) for _, path in changes} - {None}:
                self.touch(name)

    def _model_of(self, path: Path) -> str | None:
        try:
            parts = path.relative_to(self._models_dir).parts
        except ValueError:
            return None
        return parts[0] if parts and not parts[0].startswith(".") else None

    async def _schedule(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            ready = [name for name, due in self._due.items() if due <= now]
            for name in ready:
                del self._due[name]
                await self._reconcile(name)
            timeout = min(self._due.values(), default=now + 3600) - time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))

    async def _reconcile(self, name: str) -> None:
        try:
            wait = await self._manager.reconcile(name, settle=self._settle)
        except Exception:
            log.exception("reconciling model %s failed; retrying after the settle period", name)
            wait = max(self._settle.settle_s, 1.0)
        if wait > 0:
            self.touch(name, wait + 0.01)

    async def _rescan(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._rescan_s)
            self._touch_all()

    async def aclose(self) -> None:
        """Stop watching; a reconcile in progress is cancelled."""
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
