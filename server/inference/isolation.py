"""Failure isolation for batches: out-of-memory splitting and failure counting.

A batch that runs out of (CUDA) memory is split in halves and each half is
retried, down to single requests, before anything fails: a batch that is too
big for the device right now must not fail requests that fit on their own.
Any other exception fails the requests of that batch only (the service turns
it into INTERNAL); :class:`FailureLog` counts failures per model version and
logs each with the running count, so a model that keeps failing stands out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from server.inference.staging import Pixels, StagedBatch

log = logging.getLogger("classifyd.isolation")

Batch = Sequence[Pixels] | StagedBatch
Predict = Callable[[Batch], np.ndarray]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's out-of-memory error (CUDA or otherwise)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def predict_splitting_on_oom(predict: Predict, arrays: Batch,
                             splits: list[int]) -> list[np.ndarray | BaseException]:
    """One probability row per array; on out-of-memory, free cached memory and predict each half the same way.

    Blocks (run it on the inference thread). Appends the size of every split
    batch to ``splits``. A single request that still runs out of memory gets
    an out-of-memory error in its place (without traceback, so no tensor
    stays referenced); any other exception of ``predict`` is raised unchanged.
    """
    try:
        return list(predict(arrays))
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc)
    # Outside the except block, so the traceback (and the tensors it references) is released first.
    _release_cached_memory()
    if len(arrays) <= 1:
        return [torch.cuda.OutOfMemoryError(message)] * len(arrays)
    splits.append(len(arrays))
    half = len(arrays) // 2
    return (predict_splitting_on_oom(predict, arrays[:half], splits)
            + predict_splitting_on_oom(predict, arrays[half:], splits))


def _release_cached_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class FailureLog:
    """Counts failed batches per model version and logs each with its running counts. Event loop only."""

    def __init__(self) -> None:
        self._consecutive: dict[tuple[str, int], int] = {}
        self._total: dict[tuple[str, int], int] = {}

    def succeeded(self, model: str, version: int) -> None:
        """A batch of this version succeeded: its run of consecutive failures ends."""
        self._consecutive.pop((model, version), None)

    def failed(self, model: str, version: int, size: int, exc: BaseException, request_ids: Sequence[str]) -> int:
        """Record and log one failed batch; returns the version's consecutive failures."""
        key = (model, version)
        consecutive = self._consecutive[key] = self._consecutive.get(key, 0) + 1
        total = self._total[key] = self._total.get(key, 0) + 1
        ids = ", ".join(i for i in request_ids if i) or "none"
        log.error("model %s version %d: batch of %d failed (%d in a row, %d in all): %s: %s; request ids: %s",
                  model, version, size, consecutive, total, type(exc).__name__, exc, ids,
                  exc_info=exc if consecutive == 1 else None,  # the traceback once per run of failures
                  extra={"model": model, "version": version, "batch_size": size, "consecutive_failures": consecutive,
                         "request_ids": list(request_ids)})
        return consecutive

    def consecutive(self, model: str, version: int) -> int:
        """Failed batches of this version since its last success."""
        return self._consecutive.get((model, version), 0)

    def total(self, model: str, version: int) -> int:
        """Failed batches of this version since the daemon started."""
        return self._total.get((model, version), 0)
