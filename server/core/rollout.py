"""A model's ``[rollout]``: how a new version goes live (at once, or scored on live traffic first), parsed and
validated; and the decision rule that promotes or rejects a scored candidate.

Pure: no files, no torch. :func:`server.core.manifest.load_manifest` calls :func:`parse_rollout` on the merged
manifest and :func:`check_not_weaker` on the model directory's own table, so a version's manifest can make its
rollout stricter but never skip or weaken the model's (docs/rollout.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("immediate", "shadow", "canary")
"""How a new version goes live; later is stricter except that ``shadow`` (answers nobody) is stricter than
``canary`` (answers some): the order of :data:`_MODE_RANK`."""
DECISIONS = ("auto", "manual")
DECISION_FILE = ".rollout-decision.json"
"""The file in a version directory that records a rollout's decision; not part of the version's files (the
repository's fingerprint and the watcher leave it out), so writing it reloads nothing."""

_MODE_RANK = {"immediate": 0, "canary": 1, "shadow": 2}
_KEYS = {"mode", "shadow_percent", "shadow_max_share", "canary_percent", "min_requests", "min_agreement",
         "max_error_rate", "max_compute_ratio", "decision"}


class RolloutError(ValueError):
    """A bad ``[rollout]`` key; the manifest parser names the file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = f"rollout.{key}"
        self.message = message


@dataclass(frozen=True)
class RolloutSpec:
    """A validated ``[rollout]`` table."""

    mode: str = "immediate"
    shadow_percent: float = 100.0
    """The share of live requests (percent) the candidate also computes, for comparison."""
    shadow_max_share: float = 0.2
    """The most of the inference thread's time shadow work may take (0..1)."""
    canary_percent: float = 0.0
    """canary mode: the share of unpinned live requests (percent) the candidate answers."""
    min_requests: int = 500
    """Compared requests before the decision."""
    min_agreement: float = 0.98
    max_error_rate: float = 0.01
    max_compute_ratio: float = 1.5
    decision: str = "auto"

    @property
    def scored(self) -> bool:
        """Whether a new version is scored on live traffic before it serves everyone."""
        return self.mode != "immediate"


# key → (kind, lowest, highest, stricter): "up" means a larger value is stricter, "down" a smaller one
_NUMBERS: dict[str, tuple[type, float, float, str]] = {
    "shadow_percent": (float, 0.0, 100.0, "up"),
    "shadow_max_share": (float, 0.0, 1.0, "down"),
    "canary_percent": (float, 0.0, 100.0, "down"),
    "min_requests": (int, 1, 10**9, "up"),
    "min_agreement": (float, 0.0, 1.0, "up"),
    "max_error_rate": (float, 0.0, 1.0, "down"),
    "max_compute_ratio": (float, 0.0, 1e6, "down"),
}


def parse_rollout(raw: Any) -> RolloutSpec:
    """Validate a decoded ``[rollout]`` table (None: absent). Raises RolloutError naming the key."""
    if raw is None:
        return RolloutSpec()
    if not isinstance(raw, dict):
        raise RolloutError("", "must be a table")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise RolloutError(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
    values: dict[str, Any] = {}
    for key, choices in (("mode", MODES), ("decision", DECISIONS)):
        if key in raw and raw[key] not in choices:
            raise RolloutError(key, f"must be one of {', '.join(choices)}; got {raw[key]!r}")
        if key in raw:
            values[key] = raw[key]
    for key, (kind, low, high, _) in _NUMBERS.items():
        if key in raw:
            values[key] = _number(key, raw[key], kind, low, high)
    spec = RolloutSpec(**values)
    if spec.mode == "canary" and not spec.canary_percent > 0:
        raise RolloutError("canary_percent", 'mode = "canary" needs canary_percent > 0 (the share of live '
                                             "requests the candidate answers)")
    if spec.scored and not (spec.shadow_percent > 0 and spec.shadow_max_share > 0):
        raise RolloutError("shadow_percent", "a scored rollout needs shadow_percent > 0 and shadow_max_share > 0: "
                                             "without compared requests it could never be decided")
    return spec


def rollout_of(manifest: dict[str, Any], path: Path, error: Callable[[Path, str, str], Exception],
               governing: dict[str, Any] | None = None) -> RolloutSpec:
    """The ``[rollout]`` of a decoded manifest, checked against ``governing`` (the model directory's decoded
    manifest) when given. Raises ``error(path, message, key)`` (the manifest parser's ManifestError)."""
    try:
        spec = parse_rollout(manifest.get("rollout"))
        return spec if governing is None else check_not_weaker(governing.get("rollout"), spec)
    except RolloutError as exc:
        raise error(path, exc.message, exc.key) from None


def _number(key: str, value: Any, kind: type, low: float, high: float) -> float | int:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or (kind is int and not isinstance(value, int)):
        raise RolloutError(key, f"must be {'an integer' if kind is int else 'a number'}")
    if not low <= value <= high:
        raise RolloutError(key, f"must be between {low:g} and {high:g}; got {value}")
    return kind(value)


def check_not_weaker(governing_raw: Any, effective: RolloutSpec) -> RolloutSpec:
    """``effective`` (the version's merged table), checked against ``governing_raw`` (the model directory's own
    ``[rollout]`` table, None: absent). Raises RolloutError when it skips or weakens it: an earlier mode, an
    automatic decision where the model's is manual, or a threshold on the lenient side."""
    governing = parse_rollout(governing_raw)
    if _MODE_RANK[effective.mode] < _MODE_RANK[governing.mode]:
        raise RolloutError("mode", f"{effective.mode!r} would skip the model's {governing.mode!r} rollout: a "
                                   "version's model.toml may make its rollout stricter, never weaker")
    if governing.decision == "manual" and effective.decision != "manual":
        raise RolloutError("decision", "the model's model.toml asks for a manual decision; a version's may not "
                                       "make it automatic")
    for key, (_, _, _, stricter) in _NUMBERS.items():
        mine, theirs = getattr(effective, key), getattr(governing, key)
        if (mine < theirs) if stricter == "up" else (mine > theirs):
            raise RolloutError(key, f"{mine:g} is more lenient than the model's {theirs:g}: a version's model.toml "
                                    "may make its rollout stricter, never weaker")
    return effective


@dataclass(frozen=True)
class Scores:
    """What a rollout measured so far."""

    compared: int
    agreement: float
    """Mean top-1 agreement (sigmoid: Jaccard of the label sets; 0..1)."""
    topk_overlap: float
    mean_abs_diff: float
    errors: int
    """Sampled requests the candidate failed on."""
    compute_ratio: float | None
    """The candidate's compute time per item over the serving version's; None before both were measured."""
    labels_differ: bool = False

    @property
    def error_rate(self) -> float:
        attempts = self.compared + self.errors
        return self.errors / attempts if attempts else 0.0

    def describe(self) -> str:
        ratio = "n/a" if self.compute_ratio is None else f"{self.compute_ratio:.2f}"
        return (f"agreement {self.agreement:.3f} over {self.compared} requests, top-k overlap "
                f"{self.topk_overlap:.3f}, mean |dp| {self.mean_abs_diff:.4f}, error rate {self.error_rate:.4f}, "
                f"compute ratio {ratio}")


def verdict(spec: RolloutSpec, scores: Scores) -> tuple[bool, str] | None:
    """The decision rule: None while undecided (too few requests, or a manual decision), else (promote?, why).
    A candidate whose error rate already exceeds the limit over ``min_requests`` attempts is rejected at once."""
    attempts = scores.compared + scores.errors
    if spec.decision == "manual" or scores.labels_differ or attempts < spec.min_requests:
        return None
    failures = []
    if scores.agreement < spec.min_agreement:
        failures.append(f"agreement {scores.agreement:.3f} < min_agreement {spec.min_agreement:g}")
    if scores.error_rate > spec.max_error_rate:
        failures.append(f"error rate {scores.error_rate:.4f} > max_error_rate {spec.max_error_rate:g}")
    if scores.compute_ratio is not None and scores.compute_ratio > spec.max_compute_ratio:
        failures.append(f"compute ratio {scores.compute_ratio:.2f} > max_compute_ratio {spec.max_compute_ratio:g}")
    if failures:
        return False, "; ".join(failures) + f" ({scores.describe()})"
    return True, scores.describe()
