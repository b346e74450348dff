"""The manager's side of model control explicit (:mod:`server.models.control`): a model nobody asked to load is
only listed, its versions as AVAILABLE records, and an unloaded model drains like a swap before it is listed again.

:class:`CatalogueSteps` is a mixin of :class:`server.models.manager.ModelManager`: it uses the manager's records
and state changes, and keeps these rules out of manager.py. Runs on the event loop; never blocks.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.core.lifecycle import VersionState
from server.models.source.repository import Fingerprint

NO_FILES: Fingerprint = ()
"""An AVAILABLE record's files: none tried yet."""


def retire_task_name(model: str) -> str:
    """The name of the task that releases a retired version of ``model`` (:meth:`CatalogueSteps.retired`)."""
    return f"retire {model}"


class CatalogueSteps:
    """The manager's catalogue steps (a mixin: ``self`` is the ModelManager)."""

    # provided by the manager
    _retiring: set[asyncio.Task[None]]

    def _move(self, record: Any, entry: Any, target: VersionState | None, reason: str = "") -> None:
        raise NotImplementedError

    def _retire(self, record: Any, entry: Any, reason: str) -> None:
        raise NotImplementedError

    def _new_record(self, number: int, files: Fingerprint) -> Any:
        raise NotImplementedError

    def _list_available(self, record: Any, on_disk: list[int]) -> float:
        """Model ``record`` is not to be loaded: its loaded versions retire (requests in flight finish first), its
        failed ones are dropped, and its other versions on disk are listed AVAILABLE (those gone from disk are
        dropped). Returns 0.0: nothing is pending."""
        for number, entry in list(record.versions.items()):
            if entry.state in (VersionState.READY, VersionState.CANDIDATE):  # a rollout's candidate goes too
                self._retire(record, entry, "unloaded on request")
            elif entry.state is VersionState.FAILED or (entry.state is VersionState.AVAILABLE
                                                          and number not in on_disk):
                del record.versions[number]
                self._move(record, entry, None)
        for number in sorted(set(on_disk) - set(record.versions)):
            entry = record.versions[number] = self._new_record(number, NO_FILES)
            self._move(record, entry, VersionState.AVAILABLE)
        return 0.0

    def evict(self, record: Any, reason: str) -> bool:
        """Retire the loaded versions of ``record`` (READY and CANDIDATE) as a swap does: they take no new requests
        and are released once their requests are answered (:meth:`retired`); the event's reason is ``reason``.
        The memory budget's eviction (server/models/memory_budget.py). Returns whether any version was loaded."""
        loaded = [e for e in record.versions.values() if e.state in (VersionState.READY, VersionState.CANDIDATE)]
        for entry in loaded:
            self._retire(record, entry, reason)
        return bool(loaded)

    async def retired(self, name: str) -> None:
        """Block until the versions of model ``name`` being retired now are released (their requests answered).
        A caller cancelled meanwhile (a client's deadline) leaves the releases running: they are the manager's."""
        tasks = [t for t in list(self._retiring) if t.get_name() == retire_task_name(name)]
        if tasks:
            await asyncio.wait(tasks)  # unlike gather, a cancelled wait does not cancel what it waits for

    @staticmethod
    def on_removed(name: str) -> None:
        """Called when the directory of model ``name`` is removed (model control forgets its load request)."""

    def _load_cut_short(self, record: Any, entry: Any) -> None:
        """A cancelled load (shutdown, a lazy load stopped) is not left LOADING: the attempt is dropped and its
        version listed AVAILABLE (it is on disk, not loaded), which the next reconcile loads or drops; a serving
        generation beside it keeps serving."""
        if record.versions.get(entry.version) is not entry:
            self._move(record, entry, None)
            return
        del record.versions[entry.version]
        self._move(record, entry, None)
        listed = record.versions[entry.version] = self._new_record(entry.version, NO_FILES)
        self._move(record, listed, VersionState.AVAILABLE)
