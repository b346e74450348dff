"""How a version's ``model.toml`` layers over its model's: merged key by key, the version's keys winning.

Pure dictionaries, no files: :func:`server.core.manifest.load_manifest` reads the layers and validates the result.
Merging (rather than replacing) is what lets a version's manifest travel with its weights: the version's own file
pins what its weights need (its ``architecture``, its ``[input]``), and whatever it leaves out still comes from the
model's file. A layer cannot remove a key an earlier one sets; that is why a version that sets an architecture
other than the model's does not inherit the model's ``[model_args]`` (another constructor's arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARCHITECTURE_ARGS = "model_args"
"""The table that belongs to the architecture: dropped from earlier layers when a later one changes it."""

Origins = dict[str, Path]
"""Which file set each key of the merged manifest: ``"top_k"``, ``"input"`` and ``"input.mean"`` style keys."""


def merge_layers(layers: Sequence[tuple[Path, dict[str, Any]]]) -> tuple[dict[str, Any], Origins]:
    """The decoded ``layers`` (the model's file first, then the version's) merged key by key, and where each key
    came from. Tables (``[input]``, ``[batching]``, …) are merged key by key too; any other value is replaced."""
    merged: dict[str, Any] = {}
    origins: Origins = {}
    for path, raw in layers:
        changes_architecture = "architecture" in raw and raw["architecture"] != merged.get("architecture")
        if changes_architecture and ARCHITECTURE_ARGS in merged:
            _forget(merged, origins, ARCHITECTURE_ARGS)
        for key, value in raw.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                _forget(merged, origins, key)
                merged[key] = dict(value) if isinstance(value, dict) else value
            origins[key] = path
            if isinstance(value, dict):
                origins.update({f"{key}.{inner}": path for inner in value})
    return merged, origins


def origin_of(origins: Origins, key: str) -> Path | None:
    """The file that set ``key`` (``"input.mean"``), else the file that set its table, else None."""
    return origins.get(key) or origins.get(key.split(".")[0])


def _forget(merged: dict[str, Any], origins: Origins, key: str) -> None:
    """Remove ``key`` (and a table's keys) from what earlier layers set."""
    merged.pop(key, None)
    for known in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[known]
