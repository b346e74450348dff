"""From a row of scores to the predictions a response lists.

Softmax models list their ``k`` best labels. Sigmoid (multi-label) models
list every label whose score reaches its threshold, best first, at most ``k``.
Tiled requests reduce their tiles' score rows to one row first. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.core.manifest import Manifest
from server.core.types import Prediction


def select(scores: np.ndarray, manifest: Manifest, labels: Sequence[str], k: int) -> list[Prediction]:
    """The predictions for one row of ``scores``: the ``k`` best, or for sigmoid the (at most ``k``) labels at or
    above their threshold, best first."""
    candidates = np.arange(len(scores))
    if manifest.activation == "sigmoid":
        candidates = candidates[scores >= np.asarray(manifest.thresholds, dtype=scores.dtype)]
    if k < len(candidates):
        candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    best = candidates[np.argsort(-scores[candidates], kind="stable")]
    return [Prediction(int(i), labels[i], float(scores[i])) for i in best]


def reduce_tiles(rows: Sequence[np.ndarray], how: str) -> np.ndarray:
    """One score row for a tiled image: each label's best (``max``) or average (``mean``) score over the tiles."""
    stacked = np.stack(rows)
    return stacked.max(axis=0) if how == "max" else stacked.mean(axis=0)
