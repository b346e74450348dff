"""Failure isolation: model code's exceptions kept to what raised them, out-of-memory splitting, failure counting.

Model code (a constructor on the loader thread, a forward pass on the inference thread) may raise anything.
:func:`contained` runs it so that what reaches asyncio is an ordinary exception: ``StopIteration`` cannot be set
on an asyncio future (the awaiting task would hang, and shutdown with it), and a ``CancelledError`` or a
custom ``BaseException`` would mean something else there; each becomes :class:`ModelCodeError`. Only the
exceptions that end the process (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``) pass unchanged.

A batch that runs out of (CUDA) memory is split in halves and each half is
retried, down to single requests, before anything fails: a batch that is too
big for the device right now must not fail requests that fit on their own.
Any other exception fails the requests of that batch only (the batch pipeline
turns it into InferenceFailed, INTERNAL at the edges); :class:`FailureLog` counts failures per model version and
logs each with the running count, so a model that keeps failing stands out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from server.inference.staging import Pixels, StagedBatch
from server.ops.logs import CLIENT_TEXT_LIMIT, client_text

log = logging.getLogger("classifyd.isolation")

T = TypeVar("T")
Batch = Sequence[Pixels] | StagedBatch
Predict = Callable[[Batch], np.ndarray]
PROCESS_ENDING = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""What :func:`contained` lets through unchanged: these end the process (or a generator), as they should."""


class ModelCodeError(RuntimeError):
    """Model code raised what must not cross into asyncio as it is (StopIteration, CancelledError, a custom
    BaseException). The message names the original type; ``__cause__`` is the original."""


def contained(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` for an executor: returns its result or raises its exception, except that StopIteration
    and any BaseException other than :data:`PROCESS_ENDING` are raised as ModelCodeError. Blocks as ``fn``."""
    try:
        return fn(*args)
    except PROCESS_ENDING:
        raise
    except StopIteration as exc:
        raise ModelCodeError(describe(exc)) from exc
    except Exception:
        raise
    except BaseException as exc:
        raise ModelCodeError(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """``"Type: message"`` for an exception (the type alone when it has no message); a ModelCodeError's own
    message, which already names the original type."""
    if isinstance(exc, ModelCodeError):
        return str(exc)
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


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
        """Record and log one failed batch; returns the version's consecutive failures. ``request_ids`` are the
        clients' own strings: they enter the log escaped and capped (:func:`server.ops.logs.client_text`)."""
        key = (model, version)
        consecutive = self._consecutive[key] = self._consecutive.get(key, 0) + 1
        total = self._total[key] = self._total.get(key, 0) + 1
        ids = ", ".join(client_text(i) for i in request_ids if i) or "none"
        log.error("model %s version %d: batch of %d failed (%d in a row, %d in all): %s; request ids: %s",
                  model, version, size, consecutive, total, describe(exc), ids,
                  exc_info=exc if consecutive == 1 else None,  # the traceback once per run of failures
                  extra={"model": model, "version": version, "batch_size": size, "consecutive_failures": consecutive,
                         "request_ids": [i[:CLIENT_TEXT_LIMIT] for i in request_ids]})
        return consecutive
