"""Load ONE version of a model: manifest → build → warm-up → validation → autotune.

TF Serving's *loader*: it knows nothing of states, leases or which version serves (the manager, which calls
it for every version it loads) and nothing of where versions come from (the source). ``python -m server
check`` calls it directly, so a version is checked exactly as the daemon loads it. Files are read and modules
built on the loader's own thread; warm-up, validation and autotune run on the inference thread, one forward
pass at a time, so versions already serving keep answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from server.core.config import BatchingDefaults
from server.core.manifest import Manifest, ManifestError, load_manifest
from server.inference.isolation import contained, describe
from server.inference.runtime import InferenceThread, LoadedVersion
from server.models.loader.autotune import TunePlan, plan_for, tune
from server.models.loader.build import build_for_serving
from server.models.loader.validation import ValidationError, validate_version
from server.models.loader.weights import WeightsError

T = TypeVar("T")

LOAD_ERRORS = (ManifestError, WeightsError, ValidationError, RuntimeError, ValueError, TypeError, OSError, KeyError)
"""What a bad version directory is expected to raise while it loads: :class:`LoadFailed` carries its message
as it is. Any other exception (an AssertionError or IndexError from a model's constructor) fails the version
too, its type named in the message and its traceback logged: a bad version must never take the server down."""


@dataclass(frozen=True)
class LoadSettings:
    """Where versions run and the batching of manifests that set none."""

    device: torch.device
    batching: BatchingDefaults = field(default_factory=BatchingDefaults)
    trust_code: bool = False  # allow python: architectures, which execute files of the repository


@dataclass(frozen=True)
class Loaded:
    """A version that passed every step: it can serve."""

    version: LoadedVersion
    validation_accuracy: float | None
    """Top-1 accuracy on the version's ``samples/``; None when it has none."""
    seconds: float
    """How long the load took, from the manifest to the end of autotune."""


class LoadFailed(Exception):
    """The version cannot serve; the message says why (a load error's own message; ``Type: message`` for any
    other exception, which is ``__cause__``)."""

    def __init__(self, message: str, manifest: Manifest | None, *, unexpected: bool = False) -> None:
        super().__init__(message)
        self.manifest = manifest
        """The manifest as far as it was read (resolved for the architecture once built); None if it did not parse."""
        self.unexpected = unexpected
        """Not one of :data:`LOAD_ERRORS`: a bug in model code (or in classifyd), worth its traceback in the log."""


class VersionLoader:
    """Loads versions one at a time on its loader thread. ``await load(...)``; ``close()`` when done."""

    def __init__(self, settings: LoadSettings, inference: InferenceThread) -> None:
        self.settings = settings
        self._inference = inference
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifyd-load")

    async def load(self, name: str, number: int, version_dir: Path, *,
                   on_manifest: Callable[[Manifest], None] | None = None) -> Loaded:
        """Load, warm up, validate and tune version ``number`` of model ``name`` from ``version_dir``.

        Blocks the calling task only (the steps run on the loader and inference threads). ``on_manifest`` is
        called with the manifest as soon as it is read, and again once the build has resolved its input spec
        (the manager shows it while the version loads). Raises LoadFailed for any exception, after releasing
        what was built (the module, its device memory). BaseExceptions (cancellation, KeyboardInterrupt,
        SystemExit) propagate, the built version released too.
        """
        seen = on_manifest or (lambda manifest: None)
        started = time.monotonic()
        manifest: Manifest | None = None
        loaded: LoadedVersion | None = None
        try:
            manifest = await self._on_thread(load_manifest, version_dir)
            seen(manifest)
            loaded, plan = await self._build(name, number, version_dir, manifest)
            manifest = loaded.manifest
            seen(manifest)
            await self._inference.run(loaded.warm_up)
            accuracy = await validate_version(loaded, version_dir, self._thread, self._inference)
            await tune(loaded, self._inference, plan)
        except Exception as exc:
            await self._release_failed(loaded, exc)
            expected = isinstance(exc, LOAD_ERRORS)
            raise LoadFailed(str(exc) if expected else describe(exc), manifest, unexpected=not expected) from exc
        except BaseException:
            if loaded is not None:
                loaded.release()
            raise
        return Loaded(loaded, accuracy, time.monotonic() - started)

    async def _release_failed(self, loaded: LoadedVersion | None, exc: BaseException) -> None:
        """Release what a failed load built: the version's module, and whatever the frames of the traceback
        still hold (a module whose constructor or warm-up raised), then the device memory they held."""
        if loaded is not None:
            loaded.release()
        traceback.clear_frames(exc.__traceback__)  # the traceback text stays; the frames' locals go
        with contextlib.suppress(RuntimeError):  # the loader thread is already closed: the daemon is stopping
            await self._on_thread(_free_memory, self.settings.device)

    async def _build(self, name: str, number: int, version_dir: Path,
                     manifest: Manifest) -> tuple[LoadedVersion, TunePlan]:
        """The module built on the loader thread, as a version with its batching plan. Once this returns, only
        the version holds the module, so releasing the version releases it."""
        module, manifest = await self._on_thread(build_for_serving, version_dir, manifest, self.settings.device,
                                                 self.settings.trust_code)
        plan = plan_for(manifest.batching, self.settings.batching.autotune, self.settings.batching.max_batch_size,
                        self.settings.device.type)
        return self._loaded_version(name, number, manifest, module, plan), plan

    def _loaded_version(self, name: str, number: int, manifest: Manifest, module: nn.Module,
                        plan: TunePlan) -> LoadedVersion:
        """The built module as a version, with the manifest's batching or the server's defaults."""
        batching, defaults = manifest.batching, self.settings.batching
        return LoadedVersion(
            name=name,
            version=number,
            manifest=manifest,
            module=module,
            device=self.settings.device,
            max_batch_size=plan.cap,
            max_delay_ms=defaults.max_delay_ms if batching.max_delay_ms is None else batching.max_delay_ms,
            max_queue=batching.max_queue or defaults.max_queue,
        )

    async def _on_thread(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the loader thread; model code's StopIteration or BaseException (a constructor's)
        arrives as ModelCodeError (:func:`server.inference.isolation.contained`)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, contained, fn, *args)

    def close(self) -> None:
        """Wait for the step running on the loader thread, then stop the thread."""
        self._thread.shutdown(wait=True)


def _free_memory(device: torch.device) -> None:
    """Collect what a failed load left unreachable and, on CUDA, return the cached blocks. Blocks (gc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
