"""A model version's life: its states, the events that report each change, and the one table of legal changes.

No torch, no grpc: the manager (:mod:`server.models.manager`) moves every version record through these
states with :func:`move`, and only along :data:`TRANSITIONS`; every edge, the metrics and the status page
render the states and events. A record is one attempt to load the files of one version (a *generation*):
``None`` stands for "the manager holds no such record", before the attempt starts and after the record is
dropped. Changed files of a serving version load as a new generation beside it; the old one is retired once
the new one is READY.

A load that raises anything (a load error, or any other exception: an ``AssertionError`` from a model's
constructor is a bad version, not a bad server) takes LOADING → FAILED with the exception's type and message;
only a cancellation (shutdown, or the caller of a reload gone) drops a LOADING record, and the next reconcile
tries its files again. Exceptions that end the process (``KeyboardInterrupt``, ``SystemExit``) still do.

Planned extensions, kept out of the enums until the proto enums (``classifier.v1`` ``VersionInfo.State`` and
``ModelEvent.Kind``), the status page and OIP readiness render them; each adds rows to :data:`TRANSITIONS`:

* **Runtime switch** (the same version reloaded onto another runtime): a new generation, as for changed
  files: ``None → LOADING → READY`` beside the serving generation, which then takes READY → UNLOADING. No
  new state; a new trigger, named in the events' reason.
* **Rollout candidate** (shadow or canary): a state ``CANDIDATE`` (loaded, sent shadow or canary traffic,
  not the serving version) with LOADING → CANDIDATE, CANDIDATE → READY (promoted) and CANDIDATE → UNLOADING
  (rejected), reported by new event kinds ``PROMOTED`` and ``REJECTED``.
* **In the catalogue, not loaded**: a state ``AVAILABLE`` with None → AVAILABLE (found on disk, loaded on
  demand), AVAILABLE → LOADING (first request or an explicit load), UNLOADING → AVAILABLE (evicted but kept
  in the catalogue) and AVAILABLE → None (removed from disk).
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


class EventKind(enum.Enum):
    """What a :class:`ModelEvent` reports. The values are the ``classifier.v1`` ``ModelEvent.Kind`` numbers."""

    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADED = 4


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
               "superseded by a newer version, replaced by a new generation, or removed from disk"),
    Transition(VersionState.UNLOADING, None, EventKind.UNLOADED,
               "its last in-flight request finished and its module was released"),
    Transition(VersionState.FAILED, None, None,
               "a new attempt replaces it, or its directory (or its model's) was removed"),
    Transition(VersionState.LOADING, None, None,
               "a cancellation cut the load short (shutdown, or the caller of a reload went away); the next "
               "reconcile tries the files again"),
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
