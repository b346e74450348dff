"""Watch the model repository and hand changed models to the manager.

File events (inotify through watchfiles, or polling for network filesystems)
only say *which model* changed; the manager's ``reconcile`` decides what to
do, and is asked again after the settle period while files are still moving.
A periodic rescan catches anything the events missed, so a failed load never
leaves the watcher blind to later changes.

Filesystem errors (the models directory renamed away for a moment, an unmounted
volume, a stale NFS handle) are an outage, not a change: nothing is removed for
them, every task keeps running, the failed step is retried with backoff, and the
log says once when the outage starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import watchfiles

from server.core.config import DEFAULT_RESCAN_S, DEFAULT_SETTLE_S
from server.models.source.repository import RepositoryUnreachable, SettleTracker, model_names

log = logging.getLogger("classifyd.watch")
_EVERY_MODEL = _REPOSITORY = ""
"""The scheduler's name for "list the models directory and touch every model", and the outage's for the models
directory itself (no model has an empty name)."""
FIRST_RETRY_S = 0.5
"""The first retry after a filesystem error; each further one waits twice as long, up to :data:`MAX_RETRY_S`."""
MAX_RETRY_S = 30.0


class Reconciler(Protocol):
    """What the watcher drives (the model manager): TF Serving's source → manager callback, typed structurally."""

    def model_names(self) -> Iterable[str]:
        """The models it holds records of that are not removed (loading, loaded or failed)."""
        ...

    async def reconcile(self, name: str, *, settle: SettleTracker) -> float:
        """Bring model ``name`` in line with its directory; seconds to wait before asking again (0: done)."""
        ...


@dataclass
class _Failing:
    since: float
    delay: float = FIRST_RETRY_S
    errors: int = 0


class Outage:
    """Filesystem errors, per thing that failed (``""``: the models directory itself; else one model's directory):
    one warning when they start, one line when they end, and the delay before each retry (doubling from
    :data:`FIRST_RETRY_S` to :data:`MAX_RETRY_S`). Event loop only."""

    def __init__(self, models_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._models_dir = models_dir
        self._clock = clock
        self._failing: dict[str, _Failing] = {}

    @property
    def errors(self) -> int:
        """Errors seen during the outages going on now (0: none is)."""
        return sum(failing.errors for failing in self._failing.values())

    def failed(self, what: str, exc: OSError) -> float:
        """Note a filesystem error of ``what``; the seconds to wait before retrying it."""
        failing = self._failing.get(what)
        if failing is None:
            failing = self._failing[what] = _Failing(self._clock())
            log.warning("%s cannot be read (%s: %s); nothing is unloaded for it, and the watcher retries with "
                        "backoff until it can", self._name(what), type(exc).__name__, exc)
        failing.errors += 1
        delay, failing.delay = failing.delay, min(failing.delay * 2, MAX_RETRY_S)
        return delay

    def recovered(self, what: str) -> None:
        """Note that ``what`` was read again; ends its outage, if one was going on."""
        failing = self._failing.pop(what, None)
        if failing is not None:
            log.info("%s can be read again after %.1f s (%d failed attempts)", self._name(what),
                     self._clock() - failing.since, failing.errors)

    def _name(self, what: str) -> str:
        return f"models directory {self._models_dir}" if what == _REPOSITORY else f"model {what}'s directory"


class RepositoryWatcher:
    """Reconciles models whose directories change. ``start()``, then ``await aclose()``."""

    def __init__(self, manager: Reconciler, models_dir: Path, *, settle_s: float = DEFAULT_SETTLE_S, poll: bool = False,
                 poll_interval_s: float = 0.5, rescan_s: float = DEFAULT_RESCAN_S) -> None:
        self._manager = manager
        self._models_dir = models_dir
        self._settle = SettleTracker(settle_s)
        self._poll = poll
        self._poll_interval_s = poll_interval_s
        self._rescan_s = rescan_s
        self._due: dict[str, float] = {}
        self.outage = Outage(models_dir)
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
        await self._touch_all()
        self.touch(_EVERY_MODEL, 1.0)

    async def _touch_all(self) -> None:
        """Ask for every model, on disk or held, to be reconciled; after a filesystem error, for this to be tried
        again after a backoff. Lists the models directory on a thread (slow on network filesystems)."""
        if self._stop.is_set():
            return
        try:
            names = set(await asyncio.to_thread(model_names, self._models_dir))
        except OSError as exc:
            self.touch(_EVERY_MODEL, self.outage.failed(_REPOSITORY, exc))
            return
        self.outage.recovered(_REPOSITORY)
        for name in names | set(self._manager.model_names()):
            self.touch(name)

    def touch(self, name: str, delay_s: float = 0.0) -> None:
        """Ask for model ``name`` to be reconciled after ``delay_s`` seconds (sooner requests win); ``""``: every
        model (the models directory listed again)."""
        due = time.monotonic() + delay_s
        self._due[name] = min(due, self._due.get(name, due))
        self._wake.set()

    async def _watch(self) -> None:
        """Touch the models whose files change; a watch that fails (the directory gone when it is armed) is
        armed again after a backoff, followed by a catch-up of everything."""
        while not self._stop.is_set():
            try:
                async for changes in watchfiles.awatch(self._models_dir, watch_filter=None, debounce=200, step=20,
                                                       stop_event=self._stop, force_polling=self._poll or None,
                                                       poll_delay_ms=round(self._poll_interval_s * 1000)):
                    for name in {self._model_of(Path(path)) for _, path in changes} - {None}:
                        self.touch(name)
                return  # the stop event ended it
            except OSError as exc:
                delay = self.outage.failed(_REPOSITORY, exc)
            except Exception:  # a watch lost some other way (watchfiles' own errors): rearm it as well
                log.exception("watching %s failed; watching again", self._models_dir)
                delay = MAX_RETRY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            await self._touch_all()

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
                if name == _EVERY_MODEL:
                    await self._touch_all()
                else:
                    await self._reconcile(name)
            timeout = min(self._due.values(), default=now + 3600) - time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.0))

    async def _reconcile(self, name: str) -> None:
        try:
            wait = await self._manager.reconcile(name, settle=self._settle)
        except OSError as exc:  # the repository cannot be read now: retried with backoff, logged once
            wait = self.outage.failed(_REPOSITORY if isinstance(exc, RepositoryUnreachable) else name, exc)
        except Exception:
            log.exception("reconciling model %s failed; retrying after the settle period", name)
            wait = max(self._settle.settle_s, 1.0)
        else:
            self.outage.recovered(_REPOSITORY)
            self.outage.recovered(name)
        if wait > 0:
            self.touch(name, wait + 0.01)

    async def _rescan(self) -> None:
        """Touch every model each ``rescan_s``. Never ends on an error: the rescan is what finds a version whose
        events were missed."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._rescan_s)
            try:
                await self._touch_all()
            except Exception:
                log.exception("rescanning %s failed; rescanning again in %.0f s", self._models_dir, self._rescan_s)

    async def aclose(self) -> None:
        """Stop watching; a reconcile in progress is cancelled."""
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
