"""Load ONE version of a model: manifest → build → warm-up → validation → autotune.

TF Serving's *loader*: it knows nothing of states, leases or which version serves (the manager, which calls
it for every version it loads) and nothing of where versions come from (the source). ``python -m server
check`` calls it directly, so a version is checked exactly as the daemon loads it. Files are read and modules
built on the loader's own thread, on the device the manifest's ``device`` places it on
(:mod:`server.inference.placement`); warm-up, validation and autotune run on that device's inference thread
(:mod:`server.inference.devices`), one forward pass at a time, so versions already serving keep answering. At
start-up the manager defers autotune past readiness (``load(defer_tune=True)``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from server.core.config import DEFAULT_CACHE_DIR, DEFAULT_RUNTIME, BatchingDefaults
from server.core.manifest import ONNX_ARCHITECTURE, RUNTIME_UNSET, Manifest, ManifestError, load_manifest
from server.inference.devices import InferenceThreads
from server.inference.isolation import contained, describe
from server.inference.placement import place_version, settle, use_device
from server.inference.runtime import LoadedVersion, choose_version_threads
from server.inference.runtimes import OnnxRuntime
from server.inference.threads import without_team
from server.models.loader import onnx
from server.models.loader.autotune import TunePlan, plan_for, tune
from server.models.loader.build import build_for_serving
from server.models.loader.gate import gate_inputs, warmup_images
from server.models.loader.validation import ValidationError, validate_version
from server.models.loader.weights import WeightsError
from server.ops.heap import collect_everything

T = TypeVar("T")
log = logging.getLogger("classifyd.models")

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
    cache_dir: Path = DEFAULT_CACHE_DIR  # ONNX exports of runtime = "onnxruntime" versions
    default_runtime: str = DEFAULT_RUNTIME  # for manifests that set no runtime


@dataclass(frozen=True)
class Loaded:
    """A version that passed every step: it can serve."""

    version: LoadedVersion
    validation_accuracy: float | None
    """Top-1 accuracy on the version's ``samples/``; None when it has none."""
    seconds: float
    """How long the load took, from the manifest to the end of autotune (or of validation when deferred)."""
    pending_tune: TunePlan | None = None
    """The batch-curve measurement left for after readiness (``load(defer_tune=True)``); None when done or
    not needed."""


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

    def __init__(self, settings: LoadSettings, inference: InferenceThreads) -> None:
        self.settings = settings
        self._inference = inference
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifyd-load",
                                          initializer=without_team)  # only inference threads get OpenMP teams

    async def load(self, name: str, number: int, version_dir: Path, *,
                   on_manifest: Callable[[Manifest], None] | None = None, defer_tune: bool = False,
                   accept: Callable[[Manifest], None] | None = None) -> Loaded:
        """Load, warm up, validate and tune version ``number`` of model ``name`` from ``version_dir``.

        Blocks the calling task only (the steps run on the loader and inference threads). ``on_manifest`` is
        called with the manifest as soon as it is read, and again once the build has resolved its input spec
        (the manager shows it while the version loads). ``accept`` is called with the resolved manifest before
        the warm-up and raises (a ValueError) to refuse the version (the manager's preprocessing gate). With
        ``defer_tune`` the batch-curve measurement is left to the caller (:attr:`Loaded.pending_tune`) unless
        the manifest sets a ``latency_target_ms``, which needs the curve before the first batch. Each step is
        logged (INFO, ``loading: ...``). Raises LoadFailed for any exception, after releasing what was built
        (the module, its device memory). BaseExceptions (cancellation, KeyboardInterrupt, SystemExit)
        propagate, the built version released too.
        """
        seen = on_manifest or (lambda manifest: None)
        started = time.monotonic()
        manifest: Manifest | None = None
        loaded: LoadedVersion | None = None
        pending: TunePlan | None = None
        try:
            _step(name, number, f"reading the manifest and weights in {version_dir}")
            manifest = await self._on_thread(load_manifest, version_dir)
            placed = await self._on_thread(place_version, manifest.device, self.settings.device, version_dir)
            try:  # asked CUDA; "auto" counts the files' size on its GPU until the weights are built there
                _step(name, number, f"on {placed.device} ({placed.why})")
                manifest = resolve_runtime(manifest, dataclasses.replace(self.settings, device=placed.device))
                seen(manifest)
                loaded, plan = await self._build(name, number, version_dir, manifest, placed.device)
            finally:
                settle(placed)
            manifest = loaded.manifest
            seen(manifest)
            if accept is not None:
                accept(manifest)
            images = await self._on_thread(warmup_images, loaded.manifest, version_dir)
            _step(name, number, f"warm-up at batch size {loaded.max_batch_size}"
                                + (f" on {len(images)} warmup/ image(s)" if images else ""))
            await self._inference.for_version(loaded).run(use_device, loaded.device)  # its thread's CUDA device
            await self._inference.for_version(loaded).run(loaded.warm_up, images)
            await choose_version_threads(loaded, self._inference.for_version(loaded), images)  # a pass per call
            _step(name, number, "validation on its samples/ (if any)")
            accuracy = await validate_version(loaded, version_dir, self._thread, self._inference.for_version(loaded))
            pending = await self._tune_now_or_later(loaded, plan, defer_tune)
        except Exception as exc:
            await self._release_failed(loaded, exc)
            expected = isinstance(exc, LOAD_ERRORS)
            raise LoadFailed(str(exc) if expected else describe(exc), manifest, unexpected=not expected) from exc
        except BaseException:
            if loaded is not None:
                self._release_soon(loaded)
            raise
        return Loaded(loaded, accuracy, time.monotonic() - started, pending)

    def _release_soon(self, loaded: LoadedVersion) -> None:
        """Release a version whose load was cancelled, without waiting: ``release()`` takes the version's lock,
        which a forward pass on the inference thread may hold for a while, and the event loop must not wait for
        it. On the loader thread; inline only once that thread is closed (the daemon is stopping)."""
        try:
            self._thread.submit(loaded.release)
        except RuntimeError:  # cannot schedule new futures after shutdown
            loaded.release()

    async def _tune_now_or_later(self, loaded: LoadedVersion, plan: TunePlan, defer: bool) -> TunePlan | None:
        """Measure the curve now, or return the plan to measure it after readiness. A latency target needs its
        curve before the first batch, so such a version is always measured now."""
        if not plan.measure:
            return None
        if defer and loaded.manifest.batching.latency_target_ms is None:
            return plan
        _step(loaded.name, loaded.version, f"autotune (budget {plan.budget_s:g} s)")
        await tune(loaded, self._inference.for_version(loaded), plan)
        return None

    async def _release_failed(self, loaded: LoadedVersion | None, exc: BaseException) -> None:
        """Release what a failed load built: the version's module, and whatever the frames of the traceback
        still hold (a module whose constructor or warm-up raised), then the device memory they held."""
        traceback.clear_frames(exc.__traceback__)  # the traceback text stays; the frames' locals go
        try:  # on the loader thread: releasing and collecting block (torch, gc, the CUDA cache)
            await self._on_thread(_free_memory, loaded.device if loaded else self.settings.device, loaded)
        except RuntimeError:  # the loader thread is already closed: the daemon is stopping
            if loaded is not None:
                loaded.release()

    async def _build(self, name: str, number: int, version_dir: Path, manifest: Manifest,
                     device: torch.device) -> tuple[LoadedVersion, TunePlan]:
        """The module built on the loader thread (or the ONNX session opened, exported and verified there), as a
        version with its batching plan. Once this returns, only the version holds the module, so releasing the
        version releases it."""
        plan = plan_for(manifest.batching, self.settings.batching.autotune, self.settings.batching.max_batch_size,
                        device.type)
        if manifest.architecture == ONNX_ARCHITECTURE:
            _step(name, number, "opening model.onnx in ONNX Runtime")
            runtime, fixed_batch = await self._on_thread(onnx.open_shipped, version_dir, manifest)
            if fixed_batch == 1:  # a graph exported for one image: batches of one
                plan = dataclasses.replace(plan, cap=1, measure=False, choose_cap=False, ceiling=1)
            return self._loaded_version(name, number, manifest, nn.Identity(), plan, device, runtime), plan
        try:
            module, manifest = await self._on_thread(build_for_serving, version_dir, manifest, device,
                                                     self.settings.trust_code)
        except WeightsError as exc:
            raise _with_architecture_origin(exc, number, version_dir, manifest) from None
        loaded = self._loaded_version(name, number, manifest, module, plan, device)
        if manifest.runtime == "onnxruntime":
            await self._switch_to_onnx(loaded, version_dir)
        return loaded, plan

    async def _switch_to_onnx(self, loaded: LoadedVersion, version_dir: Path) -> None:
        """Export (or find in the cache) and verify the version's module on the loader thread, then serve it through
        ONNX Runtime and drop the module. Raises WeightsError (the version fails: an explicit runtime is a promise)."""
        _step(loaded.name, loaded.version, f"ONNX export (cache {self.settings.cache_dir}) and verification")
        module = loaded.module
        loaded.runtime = await self._on_thread(onnx.exported_runtime, module, version_dir, loaded.manifest,
                                               self.settings.cache_dir)
        inputs = await self._on_thread(gate_inputs, loaded, version_dir)
        worst = await self._on_thread(onnx.verify, loaded, inputs)
        log.info("model %s version %d serves through ONNX Runtime; largest probability difference from PyTorch "
                 "%.2g on %d %s (tolerance %g)", loaded.name, loaded.version, worst, len(inputs.arrays), inputs.kind,
                 onnx.TOLERANCE)
        loaded.module = nn.Identity()

    def _loaded_version(self, name: str, number: int, manifest: Manifest, module: nn.Module,
                        plan: TunePlan, device: torch.device, runtime: OnnxRuntime | None = None) -> LoadedVersion:
        """The built module as a version, with the manifest's batching or the server's defaults."""
        batching, defaults = manifest.batching, self.settings.batching
        return LoadedVersion(
            name=name,
            version=number,
            manifest=manifest,
            module=module,
            device=device,
            max_batch_size=plan.cap,
            max_delay_ms=defaults.max_delay_ms if batching.max_delay_ms is None else batching.max_delay_ms,
            max_queue=batching.max_queue or defaults.max_queue,
            runtime=runtime,
        )

    async def _on_thread(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the loader thread; model code's StopIteration or BaseException (a constructor's)
        arrives as ModelCodeError (:func:`server.inference.isolation.contained`)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, contained, fn, *args)

    def close(self) -> None:
        """Wait for the step running on the loader thread, then stop the thread."""
        self._thread.shutdown(wait=True)


def resolve_runtime(manifest: Manifest, settings: LoadSettings) -> Manifest:
    """``manifest`` with its runtime resolved: the daemon's ``--default-runtime`` when it sets none, and "auto"
    as "torch" off the CPU (ONNX Runtime's GPU providers are not used: PyTorch serves on CUDA)."""
    runtime = manifest.runtime if manifest.runtime != RUNTIME_UNSET else settings.default_runtime
    if runtime == "auto" and settings.device.type != "cpu":
        runtime = "torch"
    if runtime == "onnxruntime" and manifest.compile != "off":  # a --default-runtime cannot override compile
        runtime = "torch"
    return manifest if runtime == manifest.runtime else dataclasses.replace(manifest, runtime=runtime)


def _step(name: str, number: int, what: str) -> None:
    log.info("model %s version %d loading: %s", name, number, what)


def _with_architecture_origin(exc: WeightsError, number: int, version_dir: Path, manifest: Manifest) -> WeightsError:
    """A version that takes its architecture from the model-level model.toml (it has none of its own) and whose
    weights do not fit it: most likely that shared file changed under it. Say so, and how to pin the version."""
    origin = manifest.origins.get("architecture")
    if origin is None or origin.parent == version_dir or exc.untrusted is not None:  # code refused: not a misfit
        return exc
    return WeightsError(f"version {number} has no architecture of its own: the model-level {origin} says "
                        f"{manifest.architecture!r}, and version {number}'s weights do not fit it: {exc}; if "
                        f"version {number} was made for another architecture, put a {origin.name} naming it in "
                        f"{version_dir}/ (a version's manifest travels with its weights: docs/manifest.md)",
                        file_outputs=exc.file_outputs, file_in_channels=exc.file_in_channels)


def _free_memory(device: torch.device, loaded: LoadedVersion | None = None) -> None:
    """Release ``loaded``, collect what a failed load left unreachable and, on CUDA, return the cached blocks.
    Blocks (gc): run it on the loader thread."""
    if loaded is not None:
        loaded.release()
    collect_everything()  # an unload meanwhile may have frozen part of what the failed load built (ops/heap.py)
    if device.type == "cuda":
        torch.cuda.empty_cache()
