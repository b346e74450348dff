"""Rollout decisions on the manager's side: which loaded version is held back as a CANDIDATE, and promoting,
rejecting and rolling back (the daemon's decision, or an operator's), each recorded in the version directory.

:class:`RolloutSteps` is a mixin of :class:`server.models.manager.ModelManager`: it uses the manager's records,
lock and state changes, and keeps the rollout rules out of manager.py. The scoring on live traffic is the
service's (:mod:`server.rollouts`); it calls :meth:`RolloutSteps.decide` once the rule of
:func:`server.core.rollout.verdict` has spoken. The decision file (:data:`server.core.rollout.DECISION_FILE`)
holds the decision, its figures and a digest of the version directory's own files: a restart (or another
``--workers`` process, or replica on a shared volume) follows it, and new files of the version (published again)
void it. The first final decision written wins (:func:`record_decision`); a process that finds one on disk for a
version it is still scoring applies it (:meth:`RolloutSteps._follow`). Runs on the event loop; file reads and
writes go to a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
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
    """A short digest of the version directory's own files in a fingerprint (paths, sizes, mtimes): the model's
    shared files (``model.toml``, ``labels.<lang>.txt`` beside the versions) are left out, so editing them voids
    no decision."""
    own = tuple(entry for entry in files if len(Path(entry[0]).parts) > 1)
    return hashlib.sha256(repr(own).encode()).hexdigest()[:32]


def _read(path: Path) -> Decision | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Decision(bool(raw["promoted"]), str(raw["reason"]), str(raw["by"]), str(raw["files"]),
                        float(raw["time_unix"]), bool(raw.get("pending", False)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s cannot be read (%s): the version's rollout is treated as undecided", path, exc)
        return None


def read_decision(version_dir: Path, files: Fingerprint) -> Decision | None:
    """The decision recorded for these very files; None when none is, or it was made for other files (a version
    published again) or cannot be read (logged: the version is then treated as undecided). Blocks."""
    decision = _read(version_dir / DECISION_FILE)
    return decision if decision is not None and decision.files == files_digest(files) else None


def files_and_decision(version_dir: Path) -> tuple[Fingerprint, Decision | None]:
    """The version's fingerprint and the decision recorded for those files, read together (one thread hop for the
    manager). Blocks."""
    files = fingerprint(version_dir)
    return files, read_decision(version_dir, files)


def record_decision(version_dir: Path, decision: Decision, *, over_promotion: bool = False) -> Decision:
    """Record ``decision`` unless a final decision for the same files is there already, and return the decision
    that holds: the first final decision written wins (another ``--workers`` process or replica may have decided
    first), except that ``over_promotion`` (a rollback) replaces a recorded promotion. A pending record never
    replaces a final one. Checked and written under an exclusive ``flock`` of the version directory; the file is
    written atomically (a temporary file renamed over the old one) and synced with its directory. Blocks; raises
    OSError (a read-only repository: nothing recorded)."""
    path = version_dir / DECISION_FILE
    directory = os.open(version_dir, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        held = _read(path)
        if held is not None and held.files == decision.files and not held.pending and \
                not (over_promotion and held.promoted and not decision.promoted):
            return held
        temporary = path.with_name(f"{DECISION_FILE}.{os.getpid()}.tmp")
        with temporary.open("w", encoding="utf-8") as out:
            out.write(json.dumps(asdict(decision), indent=1) + "\n")
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(path)
        os.fsync(directory)
        return decision
    finally:
        os.close(directory)  # releases the lock


class RolloutSteps:
    """The manager's rollout steps (a mixin: ``self`` is the ModelManager)."""

    _models: dict[str, Any]
    _pre_decided: dict[tuple[str, int], Decision]
    _writing: dict[tuple[str, int], asyncio.Task[Decision]]
    _on_disk: dict[str, list[int]]
    """Each model's version numbers on disk as its last reconcile listed them (set by the manager)."""
    runtimes: Any

    # ----- hooks the manager calls while it loads and retires

    def _follow(self, record: Any, entry: Any, decision: Decision | None) -> Any:
        """``entry``'s files are already loaded: apply a final ``decision`` recorded for them meanwhile by another
        process (``--workers``, a replica on the same volume) to a CANDIDATE (promoted or rejected) or a READY
        version (a rollback rejected it); returns ``entry``."""
        if decision is None or decision.pending or entry.loaded is None:
            return entry
        if entry.state is VersionState.CANDIDATE or (entry.state is VersionState.READY and not decision.promoted):
            log.info("model %s version %d: %s recorded by another process", record.name, entry.version,
                     "a promotion" if decision.promoted else "a rejection")
            self._apply(record, entry, decision)
        return entry

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
        """READY, or CANDIDATE for a version of a model whose ``[rollout]`` scores it on live traffic first: newer
        than the serving version, or (nothing serves yet: a start) than an older version that may serve; not a new
        generation of the serving version, not one already promoted; and a version that was a candidate,
        undecided, when the daemon stopped. Older versions load next; when none of them can serve, the candidate
        does (:meth:`_settle_candidates`)."""
        pre = self._pre_decided.pop((record.name, entry.version), None)
        serving = record.serving()
        spec = entry.manifest.rollout if entry.manifest else None
        if spec is not None and spec.scored:
            self._track(self._warn_if_read_only(record, entry))
        if new_generation or spec is None or not spec.scored or (pre is not None and not pre.pending):
            return VersionState.READY
        if pre is None and (serving.version > entry.version if serving is not None
                            else not self._older_may_serve(record, entry.version)):
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

    def _older_may_serve(self, record: Any, number: int) -> bool:
        """Whether a version older than ``number`` is on disk that is not known to be rejected or broken."""
        bad = (VersionState.REJECTED, VersionState.FAILED)
        return any(v < number and (record.versions.get(v) is None or record.versions[v].state not in bad)
                   for v in self._on_disk.get(record.name, ()))

    def _settle_candidates(self, record: Any, on_disk: set[int]) -> None:
        """Retire every candidate but the newest (a newer version replaced it: recorded, so that a restart does
        not score it again), and a candidate whose directory is gone; serve the remaining candidate when no
        version serves (nothing older could); drop the REJECTED records of directories that are gone."""
        candidates = sorted((v for v in record.versions.values() if v.state is VersionState.CANDIDATE),
                            key=lambda v: v.version)
        newest_ready = max((v.version for v in record.versions.values() if v.state is VersionState.READY),
                           default=0)
        for entry in candidates:
            if entry is not candidates[-1] or entry.version not in on_disk or entry.version < newest_ready:
                replaced = entry.version in on_disk
                self._retire(record, entry, "replaced by a newer version during its rollout" if replaced
                             else "removed from disk during its rollout")
                if replaced:
                    self._record_later(record, entry, Decision(
                        False, "replaced by a newer version during its rollout", "rollout",
                        files_digest(entry.fingerprint), time.time()))
            elif not newest_ready and entry.loaded is not None:
                log.warning("model %s version %d: no other version can serve, so the candidate serves undecided",
                            record.name, entry.version)
                self._move(record, entry, VersionState.READY, "served undecided: no other version can serve")
        for number, entry in list(record.versions.items()):
            if entry.state is VersionState.REJECTED and number not in on_disk:
                self._drop(record, entry)

    def _record_later(self, record: Any, entry: Any, decision: Decision) -> None:
        self._track(self._write(record, entry, decision))

    def _track(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _warn_if_read_only(record: Any, entry: Any) -> None:
        """A loud warning when a version of a scored rollout mode loads from a directory the daemon cannot write:
        no decision can be recorded there (docs/rollout.md#the-decision-file)."""
        version_dir = record.directory / str(entry.version)
        if not await asyncio.to_thread(os.access, version_dir, os.W_OK):
            log.error("model %s version %d: [rollout] mode %r but %s is read-only: no rollout decision can be "
                      "recorded, so a restart scores a candidate again and every --workers process or replica "
                      "decides for itself; give the daemon write access or use mode = \"immediate\"", record.name,
                      entry.version, entry.manifest.rollout.mode, version_dir)

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

    def in_use(self, loaded: Any) -> bool:
        """Whether ``loaded`` (a LoadedVersion) is still its model's CANDIDATE or a READY version."""
        record = self._models.get(loaded.name)
        entry = record.versions.get(loaded.version) if record is not None and not record.removed else None
        return entry is not None and entry.loaded is loaded and \
            entry.state in (VersionState.CANDIDATE, VersionState.READY)

    def report_scores(self, loaded: Any, scores: Scores) -> None:
        """Keep the live figures of a candidate's rollout (``loaded``: its LoadedVersion) on its record (GetModel,
        the status page)."""
        record = self._models.get(loaded.name)
        entry = record.versions.get(loaded.version) if record is not None else None
        if entry is not None and entry.state is VersionState.CANDIDATE and entry.loaded is loaded:
            entry.scores = scores

    # ----- decisions

    async def decide(self, name: str, version: int, promote: bool, reason: str, *, by: str = "rollout",
                     loaded: Any = None) -> None:
        """Promote (CANDIDATE → READY) or reject (CANDIDATE → REJECTED, released once its requests finish) the
        candidate ``version`` of ``name`` (when ``loaded`` is given: that very LoadedVersion, not files published
        again since), and record it; when another process recorded a decision first, that one is applied instead.
        Raises ModelNotFound, or PreconditionFailed when ``version`` is not the model's candidate (already decided,
        replaced, never one)."""
        record = self.get(name)  # type: ignore[attr-defined]
        async with record.lock:
            entry = record.versions.get(version)
            if entry is None or entry.state is not VersionState.CANDIDATE or \
                    (loaded is not None and entry.loaded is not loaded):
                state = "not on disk" if entry is None else entry.state.name
                raise PreconditionFailed(f"model {record.name} version {version} is not a rollout candidate "
                                         f"({state}); only a CANDIDATE can be promoted or rejected")
            held = await self._record(record, entry, Decision(promote, reason, by, files_digest(entry.fingerprint),
                                                              time.time()))
            if held.by != by or held.reason != reason:
                log.info("model %s version %d was decided first by another process", record.name, version)
            self._apply(record, entry, held)

    def _apply(self, record: Any, entry: Any, decision: Decision) -> None:
        if decision.promoted and entry.state is VersionState.CANDIDATE:
            log.info("model %s version %d promoted (%s): %s", record.name, entry.version, decision.by,
                     decision.reason)
            self._move(record, entry, VersionState.READY, f"promoted ({decision.by}): {decision.reason}")
            self._keep_after_promotion(record, entry)
        elif not decision.promoted:
            self._reject(record, entry, decision.reason, decision.by)

    def _keep_after_promotion(self, record: Any, promoted: Any) -> None:
        """The older READY versions are kept or retired by ``keep_versions``, as after any swap (without reading
        the disk: a version being copied there meanwhile waits for the watcher's settle rule)."""
        keep = promoted.manifest.keep_versions if promoted.manifest else 1
        ready = sorted((v.version for v in record.versions.values() if v.state is VersionState.READY), reverse=True)
        self._retire_all_but(record, set(ready[:keep]), set(record.versions))

    async def reject_serving(self, name: str, reason: str, *, by: str = "operator",
                             expected: int | None = None) -> int:
        """Roll model ``name`` back: reject its serving version (``expected``, when given: checked under the lock)
        once the previous usable version is READY (loaded again first if it was unloaded); the rejected one is
        released after its requests. Returns the rejected version. Raises ModelNotFound, or PreconditionFailed when
        no version (or not ``expected``) serves, or no older version can serve."""
        record = self.get(name)  # type: ignore[attr-defined]
        async with record.lock:
            serving = record.serving()
            if serving is None:
                raise PreconditionFailed(f"model {record.name}: no version serves, so there is nothing to roll back")
            if expected is not None and serving.version != expected:
                raise PreconditionFailed(f"model {record.name}: version {expected} does not serve (version "
                                         f"{serving.version} does); nothing was rejected")
            if await self._previous_ready(record, serving.version) is None:
                raise PreconditionFailed(f"model {record.name}: version {serving.version} serves and no older "
                                         "version that was not rejected can serve to roll back to")
            held = await self._record(record, serving, Decision(False, reason, by,
                                                                files_digest(serving.fingerprint), time.time()),
                                      over_promotion=True)
            self._reject(record, serving, held.reason, held.by)
        await self.reconcile(record.name)  # type: ignore[attr-defined]
        return serving.version

    async def _previous_ready(self, record: Any, number: int) -> Any | None:
        """The newest READY version older than ``number``, loading the newest older one that can serve (not
        rejected, in memory or on disk; not failed with the same files) when none is loaded; None when none can."""
        older = sorted((v for v in await asyncio.to_thread(version_numbers, record.directory) if v < number),
                       reverse=True)
        for v in older:
            entry = record.versions.get(v)
            if entry is not None and entry.state is VersionState.READY and entry.loaded is not None:
                return entry
            if entry is not None and entry.state in (VersionState.REJECTED, VersionState.LOADING):
                continue
            files, decision = await asyncio.to_thread(files_and_decision, record.directory / str(v))
            if (decision is not None and not decision.promoted and not decision.pending) or \
                    (entry is not None and entry.state is VersionState.FAILED and entry.is_current(files)):
                continue
            loaded = await self._load_version(record, v, files)
            if loaded.state is VersionState.READY:
                return loaded
        return None

    async def _record(self, record: Any, entry: Any, decision: Decision, *, over_promotion: bool = False) -> Decision:
        """Write a final decision file (after the pending record, when that is still being written); returns the
        decision that holds (another process's, when it recorded one first)."""
        pending = self._writing.pop((record.name, entry.version), None)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        return await self._write(record, entry, decision, over_promotion=over_promotion)

    @staticmethod
    async def _write(record: Any, entry: Any, decision: Decision, *, over_promotion: bool = False) -> Decision:
        """Record a decision (:func:`record_decision`); returns the one that holds. A write that fails is logged
        (the decision still holds in this process): loudly for a read-only repository, where no decision can be
        recorded at all."""
        try:
            return await asyncio.to_thread(record_decision, record.directory / str(entry.version), decision,
                                           over_promotion=over_promotion)
        except OSError as exc:
            read_only = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
            log.error("model %s version %d: cannot record the rollout decision (%s)%s", record.name, entry.version,
                      exc, ": the repository is read-only, so no rollout decision is ever recorded: a restart "
                      "scores the version again and every --workers process or replica decides for itself; give "
                      "the daemon write access to the model directory or use mode = \"immediate\""
                      if read_only else "; a restart will score it again")
            return decision

    def _reject(self, record: Any, entry: Any, reason: str, by: str) -> None:
        log.warning("model %s version %d rejected (%s): %s", record.name, entry.version, by, reason)
        entry.error = f"rejected ({by}): {reason}"
        self._move(record, entry, VersionState.REJECTED, entry.error)
        self.runtimes.cancel(entry.loaded)  # a rejected version never switches runtime
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

    async def _load_version(self, record: Any, number: int, files: Fingerprint) -> Any:
        raise NotImplementedError

    def _new_record(self, number: int, files: Fingerprint) -> Any:
        raise NotImplementedError
