"""Rollout decisions on the manager's side: which loaded version is held back as a CANDIDATE, and promoting,
rejecting and rolling back (the daemon's decision, or an operator's), each recorded in the version directory.

:class:`RolloutSteps` is a mixin of :class:`server.models.manager.ModelManager`: it uses the manager's records,
lock and state changes, and keeps the rollout rules out of manager.py. The scoring on live traffic is the
service's (:mod:`server.rollouts`); it calls :meth:`RolloutSteps.decide` once the rule of
:func:`server.core.rollout.verdict` has spoken. The decision file (:data:`server.core.rollout.DECISION_FILE`)
holds the decision, its figures and a digest of the version's files: a restart (or another ``--workers``
process) does not serve a rejected version again, and new files of the version (published again) void it.
Runs on the event loop; file reads and writes go to a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server.core.errors import PreconditionFailed
from server.core.lifecycle import VersionState
from server.core.rollout import DECISION_FILE, Scores
from server.models.catalogue import retire_task_name
from server.models.source.repository import Fingerprint, fingerprint, version_numbers

log = logging.getLogger("classifyd.rollout")


@dataclass(frozen=True)
class Decision:
    """A rollout's outcome as recorded in the version directory."""

    promoted: bool
    reason: str
    by: str
    """"rollout" (the daemon's rule) or "operator"."""
    files: str
    """:func:`files_digest` of the version's files when decided."""
    time_unix: float
    pending: bool = False
    """Not decided yet: the version is a candidate (after a restart it is one again, whatever serves)."""


def files_digest(files: Fingerprint) -> str:
    """A short digest of a version's fingerprint (paths, sizes, mtimes)."""
    return hashlib.sha256(repr(files).encode()).hexdigest()[:32]


def read_decision(version_dir: Path, files: Fingerprint) -> Decision | None:
    """The decision recorded for these very files; None when none is, or it was made for other files (a version
    published again) or cannot be read (logged: the version is then treated as undecided). Blocks."""
    path = version_dir / DECISION_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        decision = Decision(bool(raw["promoted"]), str(raw["reason"]), str(raw["by"]), str(raw["files"]),
                            float(raw["time_unix"]), bool(raw.get("pending", False)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s cannot be read (%s): the version's rollout is treated as undecided", path, exc)
        return None
    return decision if decision.files == files_digest(files) else None


def files_and_decision(version_dir: Path) -> tuple[Fingerprint, Decision | None]:
    """The version's fingerprint and the decision recorded for those files, read together (one thread hop for the
    manager). Blocks."""
    files = fingerprint(version_dir)
    return files, read_decision(version_dir, files)


def write_decision(version_dir: Path, decision: Decision) -> None:
    """Record ``decision`` atomically (a temporary file renamed over the old one). Blocks; raises OSError."""
    path = version_dir / DECISION_FILE
    temporary = path.with_name(f"{DECISION_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(decision), indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)


class RolloutSteps:
    """The manager's rollout steps (a mixin: ``self`` is the ModelManager)."""

    _models: dict[str, Any]
    _pre_decided: dict[tuple[str, int], Decision]
    _writing: dict[tuple[str, int], asyncio.Task[None]]

    # ----- hooks the manager calls while it loads and retires

    def _recorded(self, record: Any, number: int, files: Fingerprint, decision: Decision | None) -> Any | None:
        """Before loading ``number``: the REJECTED record of a version whose rejection is recorded for these
        ``files`` (``decision``: :func:`files_and_decision`), made now without loading it; else None (load it; a
        recorded promotion is remembered: it serves at once)."""
        entry = record.versions.get(number)
        if entry is not None and entry.state is VersionState.REJECTED and entry.fingerprint == files:
            return entry
        if entry is not None and entry.state is VersionState.CANDIDATE:  # published again during its rollout
            self._retire(record, entry, "its files changed during its rollout")
        if decision is None:
            return None
        if decision.promoted or decision.pending:
            self._pre_decided[(record.name, number)] = decision
            return None
        if entry is not None and entry.state in (VersionState.READY, VersionState.CANDIDATE):
            self._reject(record, entry, decision.reason, decision.by)  # decided meanwhile by another process
            return entry
        if entry is not None and entry.state is not VersionState.UNLOADING:
            self._drop(record, entry)
        rejected = self._new_record(number, files)
        rejected.error = f"rejected ({decision.by}): {decision.reason}"
        log.warning("model %s version %d is not loaded: its rollout rejected these files before (%s)", record.name,
                    number, decision.reason)
        record.versions[number] = rejected
        self._move(record, rejected, VersionState.REJECTED, f"rejection recorded earlier: {decision.reason}")
        return rejected

    def _loaded_state(self, record: Any, entry: Any, new_generation: bool) -> VersionState:
        """READY, or CANDIDATE for a newer version than the serving one of a model whose ``[rollout]`` scores it
        on live traffic first (not a new generation of the serving version, not one already promoted), and for
        a version that was a candidate, undecided, when the daemon stopped (its older versions load next)."""
        pre = self._pre_decided.pop((record.name, entry.version), None)
        serving = record.serving()
        spec = entry.manifest.rollout if entry.manifest else None
        if new_generation or spec is None or not spec.scored or (pre is not None and not pre.pending):
            return VersionState.READY
        if pre is None and (serving is None or serving.version > entry.version):
            return VersionState.READY
        log.info("model %s version %d is a %s candidate beside version %s (decision %s after %d compared "
                 "requests)", record.name, entry.version, spec.mode, serving.version if serving else "none yet",
                 spec.decision, spec.min_requests)
        if pre is None:  # recorded as pending: a restart scores it again rather than serve it
            decision = Decision(False, "a candidate, not decided yet", "rollout", files_digest(entry.fingerprint),
                                time.time(), pending=True)
            self._writing[(record.name, entry.version)] = asyncio.get_running_loop().create_task(
                self._write(record, entry, decision))
        return VersionState.CANDIDATE

    def _settle_candidates(self, record: Any, on_disk: set[int]) -> None:
        """Retire every candidate but the newest (a newer version replaced it), and a candidate whose directory is
        gone; drop the REJECTED records of directories that are gone."""
        candidates = sorted((v for v in record.versions.values() if v.state is VersionState.CANDIDATE),
                            key=lambda v: v.version)
        newest_ready = max((v.version for v in record.versions.values() if v.state is VersionState.READY),
                           default=0)
        for entry in candidates:
            if entry is not candidates[-1] or entry.version not in on_disk or entry.version < newest_ready:
                self._retire(record, entry, "replaced by a newer version during its rollout"
                             if entry.version in on_disk else "removed from disk during its rollout")
        for number, entry in list(record.versions.items()):
            if entry.state is VersionState.REJECTED and number not in on_disk:
                self._drop(record, entry)

    def _drop(self, record: Any, entry: Any) -> None:
        if record.versions.get(entry.version) is entry:
            del record.versions[entry.version]
        self._move(record, entry, None)

    # ----- queries

    def candidate(self, name: str) -> Any | None:
        """Model ``name``'s candidate record (loaded, state CANDIDATE), or None."""
        record = self._models.get(name)
        if record is None or record.removed:
            return None
        found = [v for v in record.versions.values() if v.state is VersionState.CANDIDATE and v.loaded]
        return max(found, key=lambda v: v.version, default=None)

    def report_scores(self, name: str, version: int, scores: Scores) -> None:
        """Keep the live figures of a candidate's rollout on its record (GetModel, the status page)."""
        record = self._models.get(name)
        entry = record.versions.get(version) if record is not None else None
        if entry is not None and entry.state is VersionState.CANDIDATE:
            entry.scores = scores

    # ----- decisions

    async def decide(self, name: str, version: int, promote: bool, reason: str, *, by: str = "rollout") -> None:
        """Promote (CANDIDATE → READY) or reject (CANDIDATE → REJECTED, released once its requests finish) the
        candidate ``version`` of ``name``, and record it. Raises ModelNotFound, or PreconditionFailed when
        ``version`` is not the model's candidate (already decided, replaced, never one)."""
        record = self.get(name)  # type: ignore[attr-defined]
        async with record.lock:
            entry = record.versions.get(version)
            if entry is None or entry.state is not VersionState.CANDIDATE:
                state = "not on disk" if entry is None else entry.state.name
                raise PreconditionFailed(f"model {record.name} version {version} is not a rollout candidate "
                                         f"({state}); only a CANDIDATE can be promoted or rejected")
            await self._record(record, entry, promote, reason, by)
            if promote:
                log.info("model %s version %d promoted (%s): %s", record.name, version, by, reason)
                self._move(record, entry, VersionState.READY, f"promoted ({by}): {reason}")
                self._keep_after_promotion(record, entry)
            else:
                self._reject(record, entry, reason, by)

    def _keep_after_promotion(self, record: Any, promoted: Any) -> None:
        """The older READY versions are kept or retired by ``keep_versions``, as after any swap (without reading
        the disk: a version being copied there meanwhile waits for the watcher's settle rule)."""
        keep = promoted.manifest.keep_versions if promoted.manifest else 1
        ready = sorted((v.version for v in record.versions.values() if v.state is VersionState.READY), reverse=True)
        self._retire_all_but(record, set(ready[:keep]), set(record.versions))

    async def reject_serving(self, name: str, reason: str, *, by: str = "operator") -> int:
        """Roll model ``name`` back: reject its serving version (READY → REJECTED, released after its requests)
        so that the previous version serves (loaded again if it was unloaded). Returns the rejected version.
        Raises ModelNotFound, or PreconditionFailed when no version serves or none older is on disk."""
        record = self.get(name)  # type: ignore[attr-defined]
        async with record.lock:
            serving = record.serving()
            if serving is None:
                raise PreconditionFailed(f"model {record.name}: no version serves, so there is nothing to roll back")
            older = [v for v in await asyncio.to_thread(version_numbers, record.directory) if v < serving.version]
            usable = [v for v in older if record.versions.get(v) is None
                      or record.versions[v].state is not VersionState.REJECTED]
            if not usable:
                raise PreconditionFailed(f"model {record.name}: version {serving.version} serves and no older "
                                         "version that was not rejected is on disk to roll back to")
            await self._record(record, serving, False, reason, by)
            self._reject(record, serving, reason, by)
        await self.reconcile(record.name)  # type: ignore[attr-defined]
        return serving.version

    async def _record(self, record: Any, entry: Any, promoted: bool, reason: str, by: str) -> None:
        """Write the decision file (after the pending record, when that is still being written)."""
        pending = self._writing.pop((record.name, entry.version), None)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        await self._write(record, entry, Decision(promoted, reason, by, files_digest(entry.fingerprint), time.time()))

    @staticmethod
    async def _write(record: Any, entry: Any, decision: Decision) -> None:
        """Write a decision file; a write that fails is logged (the decision still holds in this process)."""
        try:
            await asyncio.to_thread(write_decision, record.directory / str(entry.version), decision)
        except OSError as exc:
            log.error("model %s version %d: cannot record the rollout decision (%s); a restart will score it "
                      "again", record.name, entry.version, exc)

    def _reject(self, record: Any, entry: Any, reason: str, by: str) -> None:
        log.warning("model %s version %d rejected (%s): %s", record.name, entry.version, by, reason)
        entry.error = f"rejected ({by}): {reason}"
        self._move(record, entry, VersionState.REJECTED, entry.error)
        loaded, entry.loaded = entry.loaded, None
        if loaded is not None:
            task = asyncio.get_running_loop().create_task(self._release_when_drained(loaded),
                                                          name=retire_task_name(record.name))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _release_when_drained(self, loaded: Any) -> None:
        await loaded.drained()
        await self._release(loaded)

    # provided by the manager
    _retiring: set[asyncio.Task[None]]

    def _move(self, record: Any, entry: Any, target: VersionState | None, reason: str = "") -> None:
        raise NotImplementedError

    def _retire(self, record: Any, entry: Any, reason: str) -> None:
        raise NotImplementedError

    def _retire_all_but(self, record: Any, kept: set[int], on_disk: set[int]) -> None:
        raise NotImplementedError

    async def _release(self, loaded: Any) -> None:
        raise NotImplementedError

    def _new_record(self, number: int, files: Fingerprint) -> Any:
        raise NotImplementedError

