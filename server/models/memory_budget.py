"""A memory budget per daemon process (``--max-loaded-bytes``) and loads on demand (``--lazy-load``).

**Budget.** Every version is measured after its load (:mod:`server.models.memory`). With a budget, loads take turns;
before a load the model's size when last loaded (if known) is made room for, and after it the measured size is:
while the versions held (loaded, or retired and not yet released) plus the new one exceed the budget, the least
recently used *idle* model is evicted: not the model loading, not one with ``keep_loaded = true``, none of whose
loaded versions holds a request (being prepared, queued or computed), not one the manager is changing now. An
evicted model is retired as an explicit unload is (READY → UNLOADING → released, event UNLOADED with the reason
``evicted ...``) and its versions are listed AVAILABLE: it stays in the catalogue. In poll and none modes it stays
unloaded until a request loads it (``--lazy-load``); in explicit mode it is no longer "asked for" (LoadModel or a
lazy load brings it back). When nothing can be evicted the new version is released and FAILED with a message
naming the budget and what is loaded; the loaded models keep serving. A version larger than the whole budget
fails the same way. A model whose size is known from its last load and cannot be made room for fails before its
load builds anything; a refused model is loaded on demand again only once the versions held change or after
REFUSED_RETRY_S. In poll and none modes a budget needs ``--lazy-load`` (the CLI's rule).

**On demand.** With ``--lazy-load`` a request for a model whose versions are all AVAILABLE loads it (explicit
mode: an implicit LoadModel) and waits within its deadline; requests for the same model share the one load; the
answer is marked ``cold_start``. A deadline that passes first answers DEADLINE_EXCEEDED; the load carries on. The
model is not evicted while requests wait on its load (until they hold their version). :meth:`MemoryBudget.aclose`
(called by the manager's ``aclose``) stops the loads on demand at shutdown.

Runs on the event loop; the waits are for loads and drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from server.core import errors
from server.core.lifecycle import VersionState
from server.inference.runtime import LoadedVersion
from server.models.control import EXPLICIT, ModelControl
from server.models.manager import ModelManager, ModelRecord
from server.models.memory import BudgetExceeded
from server.ops.memory_metrics import MemoryFigures

log = logging.getLogger("classifyd.models")
LIVE = (VersionState.READY, VersionState.CANDIDATE)
REFUSED_RETRY_S = 30.0
"""A model refused for want of room is loaded on demand again only once the versions held change (something was
released or loaded) or after this many seconds: not a full load per request."""


class MemoryBudget:
    """The budget over a manager's loads and the on-demand loads of its requests. Construct it after the
    :class:`ModelControl` (it narrows the control's choice of models to load)."""

    def __init__(self, manager: ModelManager, control: ModelControl, max_bytes: int | None = None, *,
                 lazy: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.lazy = lazy
        self._manager = manager
        self._control = control
        self._clock = clock
        self._used: dict[str, float] = {}
        """Per model: when a request last resolved it (or it loaded): the least recent is evicted first."""
        self._evicted: set[str] = set()
        """Poll and none modes: models evicted and not loaded since (explicit mode forgets the request instead)."""
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._listings: set[asyncio.Task[None]] = set()
        self._refused: dict[str, tuple[float, frozenset[int]]] = {}
        """Models whose last load failed only because nothing could be evicted then, with when and the versions held
        then (ids): a lazy load tries again once they changed or REFUSED_RETRY_S passed."""
        self._waiting: Counter[str] = Counter()
        """Per model: requests whose load on demand is under way or just done: not evicted before they resolve."""
        self.evictions: Counter[str] = Counter()
        manager.memory.on_stop(self.aclose)
        if max_bytes is not None:
            manager.memory.admission = self
            chosen = manager.wanted
            manager.wanted = lambda name: chosen(name) and name not in self._evicted

    # ----- the budget (server.models.memory.Admission)

    def figures(self) -> MemoryFigures:
        """For /metrics; safe from the exporter's thread (a copy that raced the loop is retried)."""
        for _ in range(3):
            try:
                held = sorted((v.name, v.version, size) for v, size in self._manager.memory.held().items())
                return MemoryFigures(held, dict(self.evictions), self.max_bytes or 0)
            except RuntimeError:  # the loop changed the set of versions while it was copied
                continue
        return MemoryFigures(evictions=dict(self.evictions), budget_bytes=self.max_bytes or 0)

    async def before(self, name: str, expected: int, *, known: bool) -> None:
        """Make room for ``expected`` bytes of model ``name`` before it loads, as far as evictions allow; the
        measured size decides (:meth:`admit`), except that a size ``known`` from the model's last load that cannot
        fit fails at once (BudgetExceeded), before the load builds anything."""
        assert self.max_bytes is not None
        if expected > self.max_bytes:  # a version larger than the budget fails alone, evicting nothing
            if known:
                raise self._refuse(name, f"model {name} needed {expected} bytes when it last loaded, more than the "
                                         f"whole memory budget (--max-loaded-bytes {self.max_bytes})")
            return
        if not await self._make_room(name, expected, None) and known:
            raise self._refuse(name, self._no_room(name, expected, None, "needed", "when it last loaded"))

    async def admit(self, name: str, version: LoadedVersion, size: int) -> None:
        """Evict until ``version`` (``size`` bytes) fits. Raises BudgetExceeded when it cannot."""
        assert self.max_bytes is not None
        if size > self.max_bytes:
            raise self._refuse(name, f"model {name} version {version.version} needs {size} bytes after warm-up, "
                                     f"more than the whole memory budget (--max-loaded-bytes {self.max_bytes}); "
                                     f"loaded: {self._listing(version)}", version)
        if not await self._make_room(name, size, version):
            raise self._refuse(name, self._no_room(name, size, version, "needs", "after warm-up"), version)
        self._refused.pop(name, None)
        self._used[name] = self._clock()

    def _no_room(self, name: str, size: int, version: LoadedVersion | None, needs: str, when: str) -> str:
        return (f"model {name} {needs} {size} bytes {when} and would exceed the memory budget (--max-loaded-bytes "
                f"{self.max_bytes}): {self._in_use(version)} bytes held by {self._listing(version)}; none of them "
                "can be evicted now (keep_loaded = true, requests in flight or queued, or being loaded)")

    def _refuse(self, name: str, message: str, version: LoadedVersion | None = None) -> BudgetExceeded:
        """Record the refusal of model ``name`` (``version``: the one refused, released next) and return it."""
        self._refused[name] = (self._clock(), self._held_ids(version))
        return BudgetExceeded(message)

    def _held_ids(self, excluding: LoadedVersion | None = None) -> frozenset[int]:
        return frozenset(id(v) for v in self._manager.memory.held() if v is not excluding)

    def _check_retry(self, record: ModelRecord) -> None:
        """Raise ModelUnavailable unless model ``record``, refused for want of room, may be loaded on demand again
        now: the versions held changed since, or REFUSED_RETRY_S passed."""
        when, held = self._refused[record.name]
        if self._held_ids() == held and self._clock() - when < REFUSED_RETRY_S:
            why = "; ".join(f"version {v.version}: {v.error}" for v in record.versions.values() if v.error)
            raise errors.ModelUnavailable(f"model {record.name} is not loaded: its last load was refused for want "
                                          f"of room ({why or 'the memory budget'}); it is tried again once the "
                                          f"loaded models change, or {REFUSED_RETRY_S:g} s after")

    async def _make_room(self, name: str, size: int, version: LoadedVersion | None) -> bool:
        """Evict least recently used idle models until ``size`` more bytes fit; False when they cannot."""
        assert self.max_bytes is not None
        while self._in_use(version) + size > self.max_bytes:
            victim = self._victim(name)
            if victim is None:
                return False
            await self._evict(victim, f"evicted to make room for model {name} ({size} bytes; --max-loaded-bytes "
                                      f"{self.max_bytes})")
        return True

    def _in_use(self, excluding: LoadedVersion | None) -> int:
        return sum(size for v, size in self._manager.memory.held().items() if v is not excluding)

    def _listing(self, excluding: LoadedVersion | None) -> str:
        held = [f"{v.name} version {v.version} ({size} bytes)" for v, size in self._manager.memory.held().items()
                if v is not excluding]
        return ", ".join(sorted(held)) or "nothing"

    def _victim(self, loading: str) -> ModelRecord | None:
        """The least recently used model that may be evicted now, or None. A model whose requests wait on its load
        on demand (or have not yet taken their lease after it) is not."""
        candidates = [r for r in self._manager.models()
                      if r.name != loading and not self._waiting[r.name] and self._evictable(r)]
        return min(candidates, key=lambda r: self._used.get(r.name, 0.0), default=None)

    @staticmethod
    def _evictable(record: ModelRecord) -> bool:
        live = [v for v in record.versions.values() if v.state in LIVE and v.loaded is not None]
        return (bool(live) and not record.lock.locked()  # a reconcile is changing it: leave it be
                and not any(v.manifest is not None and v.manifest.keep_loaded for v in live)
                and not any(v.loaded is not None and v.loaded.leases for v in live))

    async def _evict(self, record: ModelRecord, reason: str) -> None:
        """Unload ``record`` (idle: its release is immediate), then list its versions AVAILABLE in a task of its own:
        the caller holds the loads' turn, and a load of ``record`` that started meanwhile holds its lock waiting
        for that turn."""
        self._unwant(record.name)
        self.evictions[record.name] += 1
        log.warning("model %s: %s", record.name, reason)
        self._manager.evict(record, reason)
        task = asyncio.get_running_loop().create_task(self._list(record.name))  # runs even if this load is cancelled
        self._listings.add(task)
        task.add_done_callback(self._listings.discard)
        await self._manager.retired(record.name)  # a cancelled wait leaves the release running (catalogue.py)

    def _unwant(self, name: str) -> None:
        """The next reconcile of ``name`` lists it AVAILABLE rather than loading it."""
        if self._control.mode == EXPLICIT:
            self._control.forget(name)
        else:
            self._evicted.add(name)

    async def _list(self, name: str) -> None:
        await self._manager.retired(name)
        try:
            await self._manager.reconcile(name)  # lists its versions AVAILABLE
        except OSError as exc:  # the repository is unreadable: the watcher lists it once it is back
            log.warning("model %s: evicted, but its directory cannot be read now: %s", name, exc)

    # ----- requests

    async def resolve(self, model: str, number: int, deadline: float | None) -> tuple[LoadedVersion, bool]:
        """The version that serves a request for ``model`` and version ``number`` (:meth:`ModelManager.resolve`)
        and whether it was loaded for it (a cold start, ``--lazy-load``; ``deadline`` in time.monotonic seconds).
        Blocks the calling task during such a load. Raises ModelNotFound, ModelUnavailable (the model could not
        be loaded: why), DeadlineExpired (the load outlasted the deadline)."""
        cold = False
        try:
            version = self._manager.resolve(model, number)
        except (errors.ModelUnavailable, errors.ModelNotFound):  # a pinned version of an unloaded model: NOT_FOUND
            record = self._manager.get(model)  # NOT_FOUND for an unknown model
            if self.lazy and record.name not in self._loads and record.name in self._refused:
                self._check_retry(record)
            elif not self.lazy or not (record.name in self._loads or _catalogued_only(record)):
                raise
            self._waiting[record.name] += 1  # pinned until this request has its version (service.py leases it next)
            try:
                await self._load_within(record.name, deadline)
                version, cold = self._manager.resolve(model, number), True
            finally:
                self._waiting[record.name] -= 1
                if not self._waiting[record.name]:
                    del self._waiting[record.name]
        self._used[version.name] = self._clock()
        return version, cold

    async def _load_within(self, name: str, deadline: float | None) -> None:
        task = self._loads.get(name)
        if task is None:
            task = self._loads[name] = asyncio.get_running_loop().create_task(self._load(name))
            task.add_done_callback(lambda done: self._load_done(name, done))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise errors.DeadlineExpired(f"model {name} is not loaded and its load on demand (a cold start) did not "
                                         "finish within the request's deadline; the load carries on: retry") from None

    def _load_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # retrieved: each waiting request got it

    async def aclose(self) -> None:
        """Cancel the loads on demand and the listings after evictions (shutdown) and wait for them to stop."""
        tasks = [*self._loads.values(), *self._listings]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _load(self, name: str) -> None:
        """Load model ``name`` on demand. Raises ModelUnavailable with the reason it did not load."""
        log.info("model %s: loading on demand (--lazy-load)", name)
        await self._manager.retired(name)  # an eviction or unload under way finishes first
        try:
            if name in self._refused:  # its FAILED version is dropped and listed AVAILABLE, so it loads afresh
                self._unwant(name)
                await self._manager.reconcile(name)
            if self._control.mode == EXPLICIT:
                await self._control.load(name)
            else:
                self._evicted.discard(name)
                await self._manager.reconcile(name)
        except errors.ClassifydError as exc:
            raise errors.ModelUnavailable(f"model {name} could not be loaded on demand: {exc}") from None
        except OSError as exc:
            raise errors.ModelUnavailable(f"model {name} could not be loaded on demand: the model repository cannot "
                                          f"be read ({exc.strerror or exc})") from None
        record = self._manager.get(name)
        if record.serving() is None:
            failed = "; ".join(f"version {v.version}: {v.error}" for v in record.versions.values() if v.error)
            raise errors.ModelUnavailable(f"model {name} could not be loaded on demand: {failed or 'no version'}")


def _catalogued_only(record: ModelRecord) -> bool:
    """Whether nothing of ``record`` is loaded or loading and it is in the catalogue (versions AVAILABLE, or being
    released by an eviction or unload): a lazy load may start. A failed model is not retried per request."""
    states = {v.state for v in record.versions.values()}
    return not states & {VersionState.LOADING, VersionState.READY, VersionState.CANDIDATE} and \
        (not states or bool(states & {VersionState.AVAILABLE, VersionState.UNLOADING}))
