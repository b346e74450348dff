"""How much memory each loaded version holds, measured once per load (``loaded_bytes``).

:class:`MeasuredLoader` wraps the manager's :class:`~server.models.loader.pipeline.VersionLoader`: around each load
(manifest, build, warm-up, validation, autotune) it samples the process and records the version's size:

- **CPU**: the bytes of the module's parameters and buffers (exact; shared storage counted once) plus the growth of
  the process's resident memory (``/proc/self/statm``) during the load *beyond* those bytes: what warm-up, an
  ONNX session (a second runtime's copy of the weights) and the allocator kept. Growth below the parameter bytes
  counts as zero, so the size is never less than the parameters.
- **GPU**: the growth of ``torch.cuda.memory_allocated`` on the version's device, at least the parameter bytes.

Stability: torch's one-time start-up costs (thread pools, kernel libraries) would land on the first load. Before
the first measured load the loader runs a tiny forward pass on the inference thread of the device and takes its
baselines only afterwards. Limits: a load that reuses memory the allocator kept from an earlier, released version
shows little growth (the size is then close to the parameters); loads that overlap (no budget: several models load
concurrently at start-up) may see each other's growth; a runtime switched in the background after the load
(``runtime = "auto"``) is not re-measured. With a memory budget (:mod:`server.models.memory_budget`) loads take
turns, so each measure sees only its own load, and room is made before a load for the size the model had when it
was last loaded (else for its files' size: the weights at least).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from server.inference.devices import InferenceThreads
from server.inference.placement import files_bytes
from server.inference.runtime import LoadedVersion
from server.models.loader.pipeline import Loaded, LoadFailed, VersionLoader
from server.ops.heap import collect_released

log = logging.getLogger("classifyd.models")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SIZES: weakref.WeakKeyDictionary[LoadedVersion, int] = weakref.WeakKeyDictionary()
"""Every measured version's size, for the descriptions and metrics (:func:`loaded_bytes`)."""


def loaded_bytes(version: LoadedVersion) -> int:
    """The size measured when ``version`` loaded; 0 when it was not measured."""
    return _SIZES.get(version, 0)


class Admission(Protocol):
    """What decides whether a measured version may stay loaded (the memory budget)."""

    async def before(self, name: str, expected: int, *, known: bool) -> None:
        """Make room for model ``name`` about to load (``expected``: its size when last loaded (``known``), else its
        files'). Raises BudgetExceeded when a known size cannot fit: the load would be refused after it."""

    async def admit(self, name: str, version: LoadedVersion, size: int) -> None:
        """Make room for ``version`` of ``size`` bytes; raise BudgetExceeded when it cannot stay."""


class BudgetExceeded(Exception):
    """A measured version does not fit the memory budget; the message says why."""


def resident_bytes() -> int:
    """The process's resident memory now (0 where ``/proc`` is missing). Reads one small file."""
    try:
        return int(Path("/proc/self/statm").read_bytes().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def parameter_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters and buffers; tensors sharing storage are counted once."""
    storages: dict[tuple[str, int], int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def sample() -> tuple[int, dict[int, int]]:
    """What a load's growth is measured against: resident memory, and the CUDA bytes allocated per GPU (none
    before CUDA is initialised: a version's device may be any GPU, ``device`` in its manifest)."""
    cuda = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = {index: torch.cuda.memory_allocated(index) for index in range(torch.cuda.device_count())}
    return resident_bytes(), cuda


def prime(device: torch.device) -> None:
    """One tiny forward pass (convolution, batch norm, linear) so torch's one-time costs are paid before the first
    baseline. Blocks for milliseconds (plus CUDA context creation on a GPU); run it on the inference thread."""
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 2)).eval().to(device)
    with torch.inference_mode():
        module(torch.zeros(2, 3, 16, 16, device=device)).softmax(1)


def measured_size(version: LoadedVersion, baseline: tuple[int, dict[int, int]]) -> int:
    """The size of a version just loaded, from the :func:`sample` taken before its load (rules above)."""
    params = parameter_bytes(version.module)
    rss, cuda = sample()
    if version.device.type == "cuda":
        index = version.device.index if version.device.index is not None else torch.cuda.current_device()
        return max(params, cuda.get(index, 0) - baseline[1].get(index, 0))
    return params + max(0, rss - baseline[0] - params)


class MeasuredLoader:
    """A :class:`VersionLoader` that measures each version it loads and asks :attr:`admission` (when set) whether it
    may stay. ``await load(...)`` as the loader's; ``close()`` when done."""

    def __init__(self, loader: VersionLoader, inference: InferenceThreads) -> None:
        self._loader = loader
        self._inference = inference
        self._mine: weakref.WeakSet[LoadedVersion] = weakref.WeakSet()
        self.last: dict[str, int] = {}
        """Per model: the size of its version loaded last, the estimate for its next load."""
        self._primed: set[str] = set()
        self._turns = asyncio.Lock()
        self.admission: Admission | None = None
        self._stops: list[Callable[[], Awaitable[None]]] = []

    async def load(self, name: str, number: int, version_dir: Path, **options: Any) -> Loaded:
        """:meth:`VersionLoader.load`, measured; with an admission loads take turns, the version is admitted after
        its measure, and one that cannot stay is released and raises LoadFailed with the admission's reason. Any
        exception of the measure or the admission is a LoadFailed too, and a cancellation propagates: either way
        the version built is released first."""
        turn = self._turns if self.admission is not None else contextlib.nullcontext()
        async with turn:
            try:
                baseline = await self._prepare(name, version_dir)
            except BudgetExceeded as exc:
                raise LoadFailed(str(exc), None) from None
            except Exception as exc:
                raise LoadFailed(f"{type(exc).__name__}: {exc}", None, unexpected=True) from exc
            loaded = await self._loader.load(name, number, version_dir, **options)
            try:
                self._measure(name, number, loaded, baseline)
                if self.admission is not None:
                    await self.admission.admit(name, loaded.version, self.last[name])
            except BudgetExceeded as exc:
                await self._release(loaded.version)
                raise LoadFailed(str(exc), loaded.version.manifest) from None
            except Exception as exc:
                await self._release(loaded.version)
                raise LoadFailed(f"{type(exc).__name__}: {exc}", loaded.version.manifest, unexpected=True) from exc
            except BaseException:  # cancelled (a shutdown): what was built goes, whatever cancels this task next
                await asyncio.shield(self._release(loaded.version))
                raise
            return loaded

    async def _prepare(self, name: str, version_dir: Path) -> tuple[int, dict[int, int]]:
        """Prime the device once, make room (with an admission), and return the baseline the load is measured
        against. Raises BudgetExceeded when the model's known size cannot be made room for."""
        device = self._loader.settings.device
        if str(device) not in self._primed:
            await self._inference.for_device(device).run(prime, device)
            self._primed.add(str(device))
        if self.admission is not None:  # the size last measured, else the files' (the weights at least)
            known = self.last.get(name)
            expected = known or await asyncio.to_thread(files_bytes, version_dir)
            await self.admission.before(name, expected, known=known is not None)
        return sample()

    def _measure(self, name: str, number: int, loaded: Loaded, baseline: tuple[int, dict[int, int]]) -> None:
        size = measured_size(loaded.version, baseline)
        _SIZES[loaded.version] = self.last[name] = size
        self._mine.add(loaded.version)
        log.info("model %s version %d holds %d bytes (parameters and buffers %d)", name, number, size,
                 parameter_bytes(loaded.version.module))

    async def _release(self, version: LoadedVersion) -> None:
        await self._inference.for_version(version).run(version.release)
        await collect_released()  # on a settled heap: what the refused version left in cycles (ops/heap.py)

    def on_stop(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Have :meth:`stop` await ``stop()``: model control's and the memory budget's own tasks."""
        self._stops.append(stop)

    async def stop(self) -> None:
        """Stop the work started around the loads (loads on demand, explicit loads and unloads): the manager's
        first step of shutting down, before it releases the versions."""
        for stop in self._stops:
            await stop()

    def held(self) -> dict[LoadedVersion, int]:
        """Every version this loader measured that is not yet released, and its size."""
        return {v: _SIZES.get(v, 0) for v in list(self._mine) if not v.released}

    def close(self) -> None:
        """Stop the loader thread (:meth:`VersionLoader.close`); blocks for its current step."""
        self._loader.close()
