"""The version lifecycle of server.core.lifecycle: the transition table and the one function that applies it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from server.core.lifecycle import TRANSITIONS, EventKind, IllegalTransition, VersionState, move, transition

LOADING, READY, FAILED, UNLOADING = VersionState.LOADING, VersionState.READY, VersionState.FAILED, \
    VersionState.UNLOADING

LEGAL = {
    (None, LOADING): EventKind.LOADING,
    (LOADING, READY): EventKind.READY,
    (LOADING, FAILED): EventKind.FAILED,
    (READY, UNLOADING): None,
    (UNLOADING, None): EventKind.UNLOADED,
    (FAILED, None): None,
    (LOADING, None): None,
    # rollouts (server/models/rollout.py)
    (LOADING, VersionState.CANDIDATE): EventKind.CANDIDATE,
    (VersionState.CANDIDATE, READY): EventKind.PROMOTED,
    (VersionState.CANDIDATE, VersionState.REJECTED): EventKind.REJECTED,
    (READY, VersionState.REJECTED): EventKind.REJECTED,
    (VersionState.CANDIDATE, UNLOADING): None,
    (None, VersionState.REJECTED): EventKind.REJECTED,
    (VersionState.REJECTED, None): None,
    # model control explicit (server/models/control.py)
    (None, VersionState.AVAILABLE): EventKind.AVAILABLE,
    (VersionState.AVAILABLE, LOADING): EventKind.LOADING,
    (VersionState.AVAILABLE, None): None,
}
STAGES: list[VersionState | None] = [None, *VersionState]


@dataclass
class Record:
    state: VersionState = LOADING
    held: bool = False


def record_at(state: VersionState | None) -> Record:
    return Record() if state is None else Record(state, True)


def test_the_table_is_exactly_the_designed_transitions_each_once() -> None:
    pairs = [(t.source, t.target) for t in TRANSITIONS]
    assert len(pairs) == len(set(pairs))
    assert {pair: t.event for pair, t in zip(pairs, TRANSITIONS, strict=True)} == LEGAL
    assert all(t.trigger for t in TRANSITIONS)


@pytest.mark.parametrize(("source", "target"), list(LEGAL), ids=lambda s: s.name if s else "None")
def test_every_legal_transition_moves_the_record_and_names_its_event(source: VersionState | None,
                                                                   target: VersionState | None) -> None:
    record = record_at(source)
    step = move(record, target)
    assert (step.source, step.target, step.event) == (source, target, LEGAL[(source, target)])
    assert step is transition(source, target)
    assert record.held is (target is not None)
    if target is not None:
        assert record.state is target
    elif source is not None:
        assert record.state is source  # a dropped record keeps its last state


@pytest.mark.parametrize(("source", "target"),
                         [pair for pair in itertools.product(STAGES, STAGES) if pair not in LEGAL],
                         ids=lambda s: s.name if s else "None")
def test_every_other_change_is_refused_and_leaves_the_record_as_it_was(source: VersionState | None,
                                                                      target: VersionState | None) -> None:
    record = record_at(source)
    before = (record.state, record.held)
    with pytest.raises(IllegalTransition, match="cannot go from"):
        move(record, target)
    assert (record.state, record.held) == before


def test_a_whole_life_load_serve_retire_release() -> None:
    record = Record()
    events = [move(record, target).event for target in (LOADING, READY, UNLOADING, None)]
    assert events == [EventKind.LOADING, EventKind.READY, None, EventKind.UNLOADED]
    with pytest.raises(IllegalTransition, match="from None to READY"):
        move(record, READY)  # a released record never comes back: a new attempt is a new record


def test_every_state_is_reached_and_every_event_is_emitted() -> None:
    assert {t.target for t in TRANSITIONS} - {None} == set(VersionState)
    assert {t.event for t in TRANSITIONS} - {None} == set(EventKind)


def test_a_failed_load_is_reported_and_replaced_by_a_new_attempt() -> None:
    failed, retry = Record(), Record()
    assert [move(failed, target).event for target in (LOADING, FAILED)] == [EventKind.LOADING, EventKind.FAILED]
    assert move(failed, None).event is None and not failed.held  # dropped silently: the new attempt reports
    assert move(retry, LOADING).event is EventKind.LOADING
    with pytest.raises(IllegalTransition, match="from FAILED to READY"):
        move(record_at(FAILED), READY)  # a failed attempt never serves: new files are a new record


def test_a_cancelled_load_is_dropped_without_an_event_and_any_exception_fails_it() -> None:
    assert transition(LOADING, None).event is None and "cancel" in transition(LOADING, None).trigger
    assert "any other exception" in transition(LOADING, FAILED).trigger  # not only the expected load errors


def test_a_rollout_candidate_is_promoted_or_rejected_and_a_rejection_outlives_a_restart() -> None:
    candidate, rejected = VersionState.CANDIDATE, VersionState.REJECTED
    promoted = Record()
    assert [move(promoted, t).event for t in (LOADING, candidate, READY)] == \
        [EventKind.LOADING, EventKind.CANDIDATE, EventKind.PROMOTED]
    refused = Record()
    assert [move(refused, t).event for t in (LOADING, candidate, rejected, None)] == \
        [EventKind.LOADING, EventKind.CANDIDATE, EventKind.REJECTED, None]
    assert move(Record(), rejected).event is EventKind.REJECTED  # a restart finds the recorded rejection
    with pytest.raises(IllegalTransition, match="from REJECTED to READY"):
        move(record_at(rejected), READY)  # served again only as new files: a new record
