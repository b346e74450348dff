"""What changed between two versions' resolved preprocessing, as a person reads it.

A model is only as good as the preprocessing it was trained with: a new version whose input differs from the
serving version's (another resize, filter or normalisation) changes every answer silently. The model manager
refuses such a swap unless the new version's own ``model.toml`` says ``preprocessing_changed = true``, and
``python -m server check`` prints the same comparison. Pure: compares :class:`InputSpec` values only.
"""

from __future__ import annotations

from collections.abc import Callable

from server.core.manifest import MANIFEST_NAME, InputSpec, Manifest

_ASPECTS: tuple[tuple[str, Callable[[InputSpec], object]], ...] = (
    ("color", lambda s: s.color),
    ("size", lambda s: f"{s.height}x{s.width}"),
    ("crop", lambda s: s.crop),
    ("resize", lambda s: s.resize if s.crop == "center" else None),  # unused without a centre crop
    ("interpolation", lambda s: s.interpolation),
    ("mean", lambda s: [round(v, 6) for v in s.mean]),
    ("std", lambda s: [round(v, 6) for v in s.std]),
)


class PreprocessingChanged(ValueError):
    """A new version's preprocessing differs from the serving version's, and its manifest does not say so."""


def input_changes(old: InputSpec, new: InputSpec) -> list[str]:
    """Each aspect of the input that differs, as ``"resize 248 → 256"``; empty when the same image gives the same
    tensor. ``resize`` counts only where both crop the centre (it is unused otherwise)."""
    changes = []
    for name, value in _ASPECTS:
        before, after = value(old), value(new)
        if before != after and before is not None and after is not None:
            changes.append(f"{name} {before} → {after}")
    return changes


def describe_changes(changes: list[str], serving: int) -> str:
    """The refusal's message: the differences, and how to acknowledge them."""
    return (f"preprocessing differs from serving version {serving}: {', '.join(changes)}; set "
            f"preprocessing_changed = true in the new version's own {MANIFEST_NAME} if this is intended")


def check_preprocessing(serving: int, old: Manifest, new: Manifest) -> list[str]:
    """The changes from ``old`` (the manifest of serving version ``serving``) to ``new``; empty or acknowledged
    by ``new.preprocessing_changed``. Raises PreprocessingChanged (a ValueError) naming them otherwise."""
    changes = input_changes(old.input, new.input)
    if changes and not new.preprocessing_changed:
        raise PreprocessingChanged(describe_changes(changes, serving))
    return changes
