"""A model version's life: its states, the events that report each change, and the one table of legal changes.

No torch, no grpc: the manager (:mod:`server.models.manager`) moves every version record through these
states with :func:`move`, and only along :data:`TRANSITIONS`; every edge, the metrics and the status page
render the states and events. A record is one attempt to load the files of one version (a *generation*):
``None`` stands for "the manager holds no such record", before the attempt starts and after the record is
dropped. Changed files of a serving version load as a new generation beside it; the old one is retired once
the new one is READY.

A load that raises anything (a load error, or any other exception: an ``AssertionError`` from a model's
constructor is a bad version, not a bad server) takes LOADING → FAILED with the exception's type and message;
only a cancellation (shutdown, or the caller of a reload gone) drops a LOADING record (LOADING → None), its version
listed AVAILABLE again (None → AVAILABLE), and the next reconcile tries its files again. Exceptions that end the
process (``KeyboardInterrupt``, ``SystemExit``) still do.

**Evicted, kept in the catalogue** (``--max-loaded-bytes``, :mod:`server.models.memory_budget`): no new rows. An
eviction is an unload: READY → UNLOADING → None (event UNLOADED, reason ``evicted ...``) → AVAILABLE, and a request
loads the model again on demand (``--lazy-load``: AVAILABLE → LOADING).

**Runtime switch** (``runtime = "auto"``, :mod:`server.models.loader.runtime_choice`): no transition. The version
keeps its record, generation and state (it served throughout); its runtime object is swapped in place on the
inference thread, between batches, and the manager emits a READY event whose reason tells the outcome
(``runtime switched to onnxruntime (2.4× eager)``, or ``runtime stays torch: ...``).

**In the catalogue, not loaded** (``--model-control explicit``, :mod:`server.models.control`): the versions of a
model that nobody asked to load are records in state ``AVAILABLE``: None → AVAILABLE (found on disk, or its model
was unloaded and its versions released), AVAILABLE → LOADING (an explicit load) and AVAILABLE → None (removed from
disk, or its model is loaded and the version is not among those it keeps). An unload retires the loaded versions as
a swap does (READY → UNLOADING → None, requests in flight finish first); the released versions are then listed
AVAILABLE again.

**Rollouts** (``[rollout]`` shadow or canary, :mod:`server.models.rollout`): a new version that passes every gate
while another serves becomes a ``CANDIDATE`` (LOADING → CANDIDATE): loaded and warm, sent shadow (or canary)
traffic, not the serving version, not counted in ``keep_versions``. Its rollout's decision, or an operator's,
takes it CANDIDATE → READY (event PROMOTED: it serves) or CANDIDATE → REJECTED (event REJECTED: released, the
figures in its error). The decision is recorded in the version directory, so after a restart a rejected version
goes None → REJECTED without loading; new files of it (published again) drop the record (REJECTED → None) and it
loads afresh. A newer version arriving during a rollout retires the candidate (CANDIDATE → UNLOADING). A rollback
rejects the serving version (READY → REJECTED) and the previous one serves.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol


class VersionState(enum.Enum):
    """Where a version record stands. The values are the ``classifier.v1`` ``VersionInfo.State`` numbers."""

    LOADING = 1
    """Being loaded, warmed up, validated and tuned; not serving yet."""
    READY = 2
    """Loaded; serves requests (the newest READY version serves unpinned ones)."""
    FAILED = 3
    """Could not be loaded; the record's ``error`` says why."""
    UNLOADING = 4
    """Retired: takes no new batches, finishes its in-flight requests, then is released."""
    CANDIDATE = 5
    """Loaded and warm, scored on live traffic (``[rollout]`` shadow or canary), not the serving version."""
    REJECTED = 6
    """Its rollout rejected it (or an operator did): released, kept as a record whose ``error`` holds the figures,
    and not loaded again until its files change."""
    AVAILABLE = 7
    """In the repository's catalogue, not loaded (``--model-control explicit``): loaded only when asked."""


class EventKind(enum.Enum):
    """What a :class:`ModelEvent` reports. The values are the ``classifier.v1`` ``ModelEvent.Kind`` numbers."""

    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADED = 4
    CANDIDATE = 5
    PROMOTED = 6
    REJECTED = 7
    AVAILABLE = 8


@dataclass(frozen=True)
class ModelEvent:
    """Something that happened to a model version."""

    model: str
    version: int
    kind: EventKind
    reason: str = ""
    serving: bool = False
    """Whether ``version`` serves unpinned requests once this change is made (another generation of the same
    version number included); never for UNLOADED: an unloaded generation does not serve."""
    serving_version: int | None = None
    """The version that serves the model's unpinned requests once this change is made; None: none does."""
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Transition:
    """One legal change of a version record's state, and the event it emits (None: none)."""

    source: VersionState | None
    """None: the manager holds no record yet."""
    target: VersionState | None
    """None: the record is dropped."""
    event: EventKind | None
    trigger: str
    """What makes the manager take it."""


TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, VersionState.LOADING, EventKind.LOADING,
               "a version directory is found, or the files of a known version changed (a new generation; a "
               "serving generation keeps serving beside it), or a forced reload"),
    Transition(VersionState.LOADING, VersionState.READY, EventKind.READY,
               "manifest, build, warm-up, validation and autotune succeeded"),
    Transition(VersionState.LOADING, VersionState.FAILED, EventKind.FAILED,
               "the load raised: a load error (manifest, weights, build, warm-up, validation) or any other "
               "exception (a model constructor's AssertionError, a bug in model code)"),
    Transition(VersionState.READY, VersionState.UNLOADING, None,
               "superseded by a newer version, replaced by a new generation, removed from disk, its model unloaded "
               "(explicit), or evicted by the memory budget (--max-loaded-bytes)"),
    Transition(VersionState.UNLOADING, None, EventKind.UNLOADED,
               "its last in-flight request finished and its module was released"),
    Transition(VersionState.FAILED, None, None,
               "a new attempt replaces it, or its directory (or its model's) was removed"),
    Transition(VersionState.LOADING, None, None,
               "a cancellation cut the load short (shutdown, or the caller of a reload went away); the next "
               "reconcile tries the files again"),
    Transition(VersionState.LOADING, VersionState.CANDIDATE, EventKind.CANDIDATE,
               "it passed every gate and the model's [rollout] (shadow or canary) scores it on live traffic "
               "before it serves; another version serves meanwhile"),
    Transition(VersionState.CANDIDATE, VersionState.READY, EventKind.PROMOTED,
               "its rollout promoted it (agreement, error rate and compute ratio within the limits), or an "
               "operator did (PromoteVersion): it serves"),
    Transition(VersionState.CANDIDATE, VersionState.REJECTED, EventKind.REJECTED,
               "its rollout rejected it (the figures in its error), or an operator did (RejectVersion); it is "
               "released once its in-flight shadow and canary requests finish"),
    Transition(VersionState.READY, VersionState.REJECTED, EventKind.REJECTED,
               "an operator rolled the model back (RollbackModel) or rejected the serving version: it is released "
               "after its in-flight requests, and the previous version serves"),
    Transition(VersionState.CANDIDATE, VersionState.UNLOADING, None,
               "a newer version replaced it during its rollout, or its directory was removed"),
    Transition(None, VersionState.REJECTED, EventKind.REJECTED,
               "found on disk with a rejection recorded for these very files (a restart, another --workers "
               "process): not loaded"),
    Transition(VersionState.REJECTED, None, None,
               "its files changed (published again: the recorded decision no longer applies) or its directory "
               "was removed"),
    Transition(None, VersionState.AVAILABLE, EventKind.AVAILABLE,
               "model control explicit: a version directory of a model not asked to load is found, or its model "
               "was unloaded and the version released; any mode: its model was evicted by the memory budget"),
    Transition(VersionState.AVAILABLE, VersionState.LOADING, EventKind.LOADING,
               "its model is asked to load (RepositoryModelLoad, LoadModel), or a request for it loads it on demand "
               "(--lazy-load)"),
    Transition(VersionState.AVAILABLE, None, None,
               "its directory (or its model's) was removed, or its model loaded and keeps other versions"),
)
"""Every legal change; anything else is a bug in the manager and raises :class:`IllegalTransition`."""

_TABLE: dict[tuple[VersionState | None, VersionState | None], Transition] = {
    (t.source, t.target): t for t in TRANSITIONS}


class IllegalTransition(RuntimeError):
    """A state change that :data:`TRANSITIONS` does not allow."""


def transition(source: VersionState | None, target: VersionState | None) -> Transition:
    """The row of :data:`TRANSITIONS` from ``source`` to ``target``. Raises IllegalTransition when there is none."""
    step = _TABLE.get((source, target))
    if step is None:
        names = [s.name if s is not None else "None" for s in (source, target)]
        raise IllegalTransition(f"a version cannot go from {names[0]} to {names[1]}")
    return step


class Stateful(Protocol):
    """What :func:`move` changes: a version record's state, and whether the manager holds it."""

    state: VersionState
    """The current state while ``held``; the last one once dropped."""
    held: bool
    """False before the record's first transition and after it is dropped."""


def move(record: Stateful, target: VersionState | None) -> Transition:
    """Change ``record``'s state to ``target`` (None: drop it) and return the transition taken, whose event
    the caller emits. Raises IllegalTransition (the record unchanged) when the table has no such row."""
    step = transition(record.state if record.held else None, target)
    if target is None:
        record.held = False
    else:
        record.state, record.held = target, True
    return step
