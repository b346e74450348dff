"""The images a version is warmed up with and a non-torch runtime is checked on (issue 16's correctness gate).

Blank inputs prove nothing: a runtime that gets every real image wrong can still agree on a black one. So the gate
compares PyTorch's and the other runtime's scores on the version's own images when it has some, in this order:
its validation samples (``samples/<label>/*``, one label at a time, decoded only up to :data:`MAX_IMAGES`), a
``warmup/`` directory of sample images (which the warm-up uses
too, instead of blank inputs), else seeded synthetic noise images. Everything here blocks (file reads, decoding):
run it on the loader thread, or in the background job. Raises ValidationError naming an image that cannot be read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.core.manifest import Manifest
from server.inference.runtime import LoadedVersion
from server.models.loader.validation import SAMPLE_SUFFIXES, SAMPLES_DIR, read_image, sample_files

WARMUP_DIR = "warmup"
MAX_IMAGES = 32
"""The gate and the warm-up use at most this many images (tiles count one each): enough to exercise the model,
few enough that the check stays seconds."""
SYNTHETIC_IMAGES = 8
SYNTHETIC_SEED = 1234


@dataclass(frozen=True)
class GateInputs:
    """Preprocessed ``H x W x C`` arrays and what they are, for the gate's message."""

    arrays: list[np.ndarray]
    names: list[str]
    """One per array: the file name (a tile's with its index), or ``synthetic image N``."""
    kind: str
    """``validation samples``, ``warmup/ images`` or ``seeded synthetic images``."""


def warmup_images(manifest: Manifest, version_dir: Path) -> list[np.ndarray]:
    """The version's ``warmup/`` images preprocessed as requests are (tiles of a tiled model each one array), at
    most :data:`MAX_IMAGES`; empty when it has no such directory. Raises ValidationError for an unreadable image."""
    return [array for array, _ in _read_warmup(manifest, version_dir / WARMUP_DIR)]


def gate_inputs(version: LoadedVersion, version_dir: Path) -> GateInputs:
    """What the correctness gate compares the runtimes on: the validation samples, else ``warmup/``, else
    :data:`SYNTHETIC_IMAGES` seeded noise images. Raises ValidationError for an unreadable image."""
    samples = version_dir / SAMPLES_DIR
    if samples.is_dir():
        flat: list[np.ndarray] = []
        for path in round_robin(sample_files(version, samples)):  # every label is checked, not the first few
            flat.extend(read_image(path, version.manifest))
            if len(flat) >= MAX_IMAGES:  # decode no more than the gate compares
                break
        flat = flat[:MAX_IMAGES]
        if flat:
            return GateInputs(flat, [f"sample {i}" for i in range(len(flat))], "validation samples")
    warmup = _read_warmup(version.manifest, version_dir / WARMUP_DIR)
    if warmup:
        return GateInputs([a for a, _ in warmup], [name for _, name in warmup], "warmup/ images")
    spec = version.manifest.input
    noise = np.random.default_rng(SYNTHETIC_SEED).integers(
        0, 256, size=(SYNTHETIC_IMAGES, spec.height, spec.width, spec.channels), dtype=np.uint8)
    return GateInputs(list(noise), [f"synthetic image {i}" for i in range(len(noise))], "seeded synthetic images")


def round_robin(files: list[tuple[Path, int]]) -> list[Path]:
    """``files`` (path, label) reordered one label at a time: the first of each label, then the second, ..."""
    by_label: dict[int, list[Path]] = {}
    for path, label in files:
        by_label.setdefault(label, []).append(path)
    return [path for row in itertools.zip_longest(*by_label.values()) for path in row if path is not None]


def _read_warmup(manifest: Manifest, folder: Path) -> list[tuple[np.ndarray, str]]:
    if not folder.is_dir():
        return []
    found: list[tuple[np.ndarray, str]] = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES):
        arrays = read_image(path, manifest)
        found.extend((array, path.name if len(arrays) == 1 else f"{path.name} tile {i}")
                     for i, array in enumerate(arrays))
        if len(found) >= MAX_IMAGES:
            break
    return found[:MAX_IMAGES]
