"""Comparing a rollout candidate's answers with the serving version's, and the running score of a rollout.

Labels are compared by their text, so a candidate that orders its labels differently is compared correctly; a
candidate whose label set differs cannot be compared row by row and is left to an operator's decision. numpy only;
nothing here blocks.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from server.core.manifest import Manifest
from server.core.rollout import Scores


@dataclass(frozen=True)
class Comparison:
    """How one request's two answers compare."""

    agreement: float
    """1.0 or 0.0 for softmax (same top-1 label?); the Jaccard overlap of the reported label sets for sigmoid."""
    topk_overlap: float
    mean_abs_diff: float


class LabelMap:
    """The candidate's scores in the serving version's label order; ``differ`` when the label sets differ."""

    def __init__(self, serving: Manifest, candidate: Manifest) -> None:
        self.differ = sorted(serving.labels) != sorted(candidate.labels) or \
            len(set(serving.labels)) != len(serving.labels)
        self.identical = not self.differ and list(serving.labels) == list(candidate.labels)
        """The same labels in the same order: the candidate may answer for the serving version (canary)."""
        position = {label: i for i, label in enumerate(candidate.labels)}
        self._order = None if self.differ else np.asarray([position[label] for label in serving.labels])
        self._serving, self._candidate = serving, candidate
        thresholds = np.asarray(candidate.thresholds) if candidate.activation == "sigmoid" else None
        self._candidate_thresholds = None if thresholds is None or self._order is None else thresholds[self._order]

    def compare(self, serving_row: np.ndarray, candidate_row: np.ndarray) -> Comparison:
        """Compare one answer of each version (full score rows, each in its own label order). Call only when the
        label sets match (not ``differ``)."""
        assert self._order is not None
        mine = np.asarray(candidate_row, dtype=np.float64)[self._order]
        theirs = np.asarray(serving_row, dtype=np.float64)
        k = min(self._serving.top_k, len(theirs))
        top_theirs, top_mine = _top(theirs, k), _top(mine, k)
        overlap = len(top_theirs & top_mine) / k
        if self._serving.activation == "sigmoid" and self._candidate.activation == "sigmoid":
            reported_theirs = set(np.flatnonzero(theirs >= np.asarray(self._serving.thresholds)).tolist())
            reported_mine = set(np.flatnonzero(mine >= self._candidate_thresholds).tolist())
            union = reported_theirs | reported_mine
            agreement = len(reported_theirs & reported_mine) / len(union) if union else 1.0
        else:
            agreement = 1.0 if int(np.argmax(theirs)) == int(np.argmax(mine)) else 0.0
        return Comparison(agreement, overlap, float(np.mean(np.abs(theirs - mine))))


def _top(row: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-row, kind="stable")[:k].tolist())


TIMES_KEPT = 512
"""Per-item times kept per version and batch size: the compute ratio compares their medians."""


class PassTimes:
    """Per-item forward-pass times of one version by batch size, the last :data:`TIMES_KEPT` of each. Medians, not
    means: a pass that the operating system preempted (a busy machine) does not swing the ratio."""

    def __init__(self) -> None:
        self._by_size: dict[int, deque[float]] = {}

    def add(self, per_item_s: float, batch_items: int) -> None:
        self._by_size.setdefault(batch_items, deque(maxlen=TIMES_KEPT)).append(per_item_s)

    def median(self, batch_items: int | None = None) -> float | None:
        """At ``batch_items`` (None: over every size); None without a sample."""
        if batch_items is not None:
            times = self._by_size.get(batch_items)
            return statistics.median(times) if times else None
        every = [t for times in self._by_size.values() for t in times]
        return statistics.median(every) if every else None

    def sizes(self) -> dict[int, int]:
        return {size: len(times) for size, times in self._by_size.items()}


@dataclass
class ScoreBoard:
    """The running figures of one candidate's rollout. Fed on the event loop."""

    labels_differ: bool = False
    compared: int = 0
    errors: int = 0
    _agreement: float = 0.0
    _overlap: float = 0.0
    _abs_diff: float = 0.0
    serving: PassTimes = field(default_factory=PassTimes)
    """The serving version's reference passes on the shadow lane."""
    candidate: PassTimes = field(default_factory=PassTimes)

    def add(self, comparison: Comparison) -> None:
        self.compared += 1
        self._agreement += comparison.agreement
        self._overlap += comparison.topk_overlap
        self._abs_diff += comparison.mean_abs_diff

    def failed(self) -> None:
        """The candidate failed on a sampled request."""
        self.errors += 1

    def compute_ratio(self) -> float | None:
        """The candidate's median time per item over the serving version's, batch size by batch size (weighted by
        the candidate's passes at each size); over every size when they share none. None before both ran."""
        shared = {size: n for size, n in self.candidate.sizes().items() if self.serving.median(size) is not None}
        if shared:
            mine = sum(n * (self.candidate.median(size) or 0.0) for size, n in shared.items())
            theirs = sum(n * (self.serving.median(size) or 0.0) for size, n in shared.items())
        else:
            mine, theirs = self.candidate.median() or 0.0, self.serving.median() or 0.0
        return mine / theirs if mine > 0 and theirs > 0 else None

    def scores(self) -> Scores:
        n = self.compared
        ratio = self.compute_ratio()
        return Scores(compared=n, agreement=self._agreement / n if n else 0.0,
                      topk_overlap=self._overlap / n if n else 0.0,
                      mean_abs_diff=self._abs_diff / n if n else 0.0, errors=self.errors,
                      compute_ratio=ratio, labels_differ=self.labels_differ)
