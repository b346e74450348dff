"""The validation gate: a version with ``samples/<label>/*`` images must classify them well enough to serve.

Reads and preprocesses samples on the loader thread, predicts on the inference
thread. A model with ``[tiling]`` is validated as it serves: each sample is cut
into tiles and the tiles' scores are reduced to one row. Raises
:class:`ValidationError` when accuracy is below the manifest's ``min_accuracy``
or a sample folder names no label.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from server.core.errors import InvalidInput
from server.core.manifest import Manifest
from server.core.outputs import reduce_tiles
from server.inference.preprocess import preprocess, preprocess_tiles
from server.inference.runtime import InferenceThread, LoadedVersion

log = logging.getLogger("classifyd.models")
SAMPLES_DIR = "samples"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ValidationError(ValueError):
    """The version's validation samples are unusable or not classified well enough."""


def read_samples(version: LoadedVersion, samples_dir: Path) -> tuple[list[list[np.ndarray]], list[int]]:
    """Preprocessed sample images (each one array, or its tiles) and their label indices.

    Blocks on file reads and decoding."""
    files = sample_files(version, samples_dir)
    return [read_image(path, version.manifest) for path, _ in files], [label for _, label in files]


def sample_files(version: LoadedVersion, samples_dir: Path) -> list[tuple[Path, int]]:
    """The sample image files with their label indices, folder by folder in name order. Blocks on directory reads;
    raises ValidationError for a folder that names no label of the model."""
    index = {label: i for i, label in enumerate(version.labels)}
    files: list[tuple[Path, int]] = []
    for folder in sorted(p for p in samples_dir.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise ValidationError(f"{folder}: sample folder names no label of the model")
        files.extend((path, index[folder.name])
                     for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES))
    return files


def read_image(path: Path, manifest: Manifest) -> list[np.ndarray]:
    """One image file preprocessed as requests are: one array, or one per tile of a ``[tiling]`` model. Blocks on
    the read and decoding; raises ValidationError naming the file when it cannot be decoded."""
    try:
        if manifest.tiling is None:
            return [preprocess(path.read_bytes(), manifest.input)]
        return [array for _, array in preprocess_tiles(path.read_bytes(), manifest.input, manifest.tiling)]
    except InvalidInput as exc:
        raise ValidationError(f"{path}: {exc}") from None


async def validate_version(version: LoadedVersion, version_dir: Path, loader: Executor,
                           inference: InferenceThread) -> float | None:
    """Top-1 accuracy on the version's samples (None when it has none). Raises ValidationError below the bar."""
    samples_dir = version_dir / SAMPLES_DIR
    if not samples_dir.is_dir():
        return None
    loop = asyncio.get_running_loop()
    arrays, truth = await loop.run_in_executor(loader, read_samples, version, samples_dir)
    if not arrays:
        raise ValidationError(f"{samples_dir}: no sample images (expected samples/<label>/*.png or *.jpg)")
    flat = [a for sample in arrays for a in sample]
    size = version.max_batch_size
    rows: list[np.ndarray] = []
    for start in range(0, len(flat), size):
        rows.extend(await inference.run(version.predict, flat[start:start + size]))
    correct, used = 0, 0
    how = version.manifest.tiling.reduce if version.manifest.tiling else "max"
    for sample, label in zip(arrays, truth, strict=True):
        scores = reduce_tiles(rows[used:used + len(sample)], how)
        used += len(sample)
        correct += int(scores.argmax() == label)
    accuracy = correct / len(arrays)
    minimum = version.manifest.min_accuracy
    log.info("model %s version %d: validation accuracy %.3f on %d samples (min_accuracy %.3f)", version.name,
             version.version, accuracy, len(arrays), minimum)
    if accuracy < minimum:
        raise ValidationError(f"validation accuracy {accuracy:.3f} on {len(arrays)} samples is below "
                              f"min_accuracy {minimum:.3f}")
    return accuracy
