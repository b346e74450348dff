"""The validation gate: a version with ``samples/<label>/*`` images must classify them well enough to serve.

Reads and preprocesses samples on the loader thread, predicts on the inference
thread. Raises :class:`ValidationError` when accuracy is below the manifest's
``min_accuracy`` or a sample folder names no label.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from server.errors import InvalidInput
from server.preprocess import preprocess
from server.runtime import InferenceThread, LoadedVersion

log = logging.getLogger("classifyd.models")
SAMPLES_DIR = "samples"
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ValidationError(ValueError):
    """The version's validation samples are unusable or not classified well enough."""


def read_samples(version: LoadedVersion, samples_dir: Path) -> tuple[list[np.ndarray], list[int]]:
    """Preprocessed sample images and their label indices. Blocks on file reads and decoding."""
    index = {label: i for i, label in enumerate(version.labels)}
    arrays: list[np.ndarray] = []
    truth: list[int] = []
    for folder in sorted(p for p in samples_dir.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise ValidationError(f"{folder}: sample folder names no label of the model")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES):
            try:
                arrays.append(preprocess(path.read_bytes(), version.manifest.input))
            except InvalidInput as exc:
                raise ValidationError(f"{path}: {exc}") from None
            truth.append(index[folder.name])
    return arrays, truth


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
    correct = 0
    size = version.max_batch_size
    for start in range(0, len(arrays), size):
        probabilities = await inference.run(version.predict, arrays[start:start + size])
        correct += int(np.sum(probabilities.argmax(axis=1) == np.asarray(truth[start:start + size])))
    accuracy = correct / len(arrays)
    minimum = version.manifest.min_accuracy
    log.info("model %s version %d: validation accuracy %.3f on %d samples (min_accuracy %.3f)", version.name,
             version.version, accuracy, len(arrays), minimum)
    if accuracy < minimum:
        raise ValidationError(f"validation accuracy {accuracy:.3f} on {len(arrays)} samples is below "
                              f"min_accuracy {minimum:.3f}")
    return accuracy
