"""The model manager: which versions of which models are loaded, and which serves.

It knows nothing of batching or gRPC. A request resolves its version with
:meth:`ModelManager.resolve` at the moment its batch is formed, so putting a
new version into service is one reference change between batches.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.errors import ModelNotFound, ModelUnavailable
from server.manifest import Manifest, ManifestError, load_manifest
from server.runtime import InferenceThread, LoadedVersion
from server.weights import WeightsError, build_model

log = logging.getLogger("classifyd.models")
_VERSION_DIR = re.compile(r"^[0-9]+$")


class VersionState(enum.Enum):
    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADING = 4


@dataclass
class VersionRecord:
    """What the manager knows of one version directory."""

    version: int
    state: VersionState
    error: str = ""
    loaded: LoadedVersion | None = None
    manifest: Manifest | None = None


@dataclass
class ModelRecord:
    """One model directory and its versions."""

    name: str
    directory: Path
    versions: dict[int, VersionRecord] = field(default_factory=dict)

    def serving(self) -> VersionRecord | None:
        """The newest READY version, the one requests without a pinned version get."""
        ready = [v for v in self.versions.values() if v.state is VersionState.READY]
        return max(ready, key=lambda v: v.version, default=None)

    def latest_manifest(self) -> Manifest | None:
        """The manifest of the serving version, else of the newest version that parsed."""
        serving = self.serving()
        if serving and serving.manifest:
            return serving.manifest
        parsed = [v for v in self.versions.values() if v.manifest]
        return max(parsed, key=lambda v: v.version).manifest if parsed else None


@dataclass(frozen=True)
class ManagerSettings:
    """How the manager loads models."""

    models_dir: Path
    device: torch.device
    default_max_batch_size: int = 32
    default_max_delay_ms: float = 0.0


Listener = Callable[[str], None]


class ModelManager:
    """Loads models from the repository and answers which version serves a request."""

    def __init__(self, settings: ManagerSettings, inference: InferenceThread) -> None:
        self.settings = settings
        self._inference = inference
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifyd-load")
        self._models: dict[str, ModelRecord] = {}
        self._listeners: list[Listener] = []
        self.default_model: str | None = None

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(model_name)`` on the event loop whenever a model's versions change state."""
        self._listeners.append(listener)

    def _notify(self, name: str) -> None:
        for listener in self._listeners:
            listener(name)

    async def load_repository(self) -> None:
        """Scan the models directory and load the newest loadable version of each model.

        A model that fails to load is recorded as FAILED (with its error) and logged; others still load.
        """
        for directory in sorted(p for p in self.settings.models_dir.iterdir() if p.is_dir()):
            if not directory.name.startswith("."):
                await self.load_model(directory.name)
        self.default_model = self._choose_default()

    async def load_model(self, name: str) -> ModelRecord:
        """Load the newest version of ``name`` that loads; fall back to older ones on failure."""
        record = self._models.setdefault(name, ModelRecord(name, self.settings.models_dir / name))
        versions = version_numbers(record.directory)
        if not versions:
            log.error("model %s: no version directories (expected %s/<N>/)", name, record.directory)
        for version in sorted(versions, reverse=True):
            if (await self.load_version(name, version)).state is VersionState.READY:
                break
        return record

    async def load_version(self, name: str, version: int) -> VersionRecord:
        """Load, warm up and publish one version. Never raises for a bad version: it becomes FAILED."""
        record = self._models[name]
        entry = VersionRecord(version, VersionState.LOADING)
        record.versions[version] = entry
        self._notify(name)
        try:
            entry.loaded = await self._build(record, version, entry)
            await self._inference.run(entry.loaded.warm_up)
        except (ManifestError, WeightsError, RuntimeError, ValueError, TypeError, OSError) as exc:
            entry.state, entry.error, entry.loaded = VersionState.FAILED, str(exc), None
            log.error("model %s version %d failed to load: %s", name, version, exc)
        else:
            entry.state = VersionState.READY
            log.info("model %s version %d ready on %s", name, version, entry.loaded.device)
        self._notify(name)
        return entry

    async def _build(self, record: ModelRecord, version: int, entry: VersionRecord) -> LoadedVersion:
        version_dir = record.directory / str(version)
        loop = asyncio.get_running_loop()
        entry.manifest = await loop.run_in_executor(self._loader, load_manifest, version_dir)
        module = await loop.run_in_executor(self._loader, self._build_module, version_dir, entry.manifest)
        batching = entry.manifest.batching
        return LoadedVersion(
            name=record.name,
            version=version,
            manifest=entry.manifest,
            module=module,
            device=self.settings.device,
            max_batch_size=batching.max_batch_size or self.settings.default_max_batch_size,
            max_delay_ms=self.settings.default_max_delay_ms if batching.max_delay_ms is None else batching.max_delay_ms,
        )

    def _build_module(self, version_dir: Path, manifest: Manifest) -> torch.nn.Module:
        return build_model(version_dir, manifest).to(self.settings.device)

    def _choose_default(self) -> str | None:
        flagged = sorted(n for n, r in self._models.items() if (m := r.latest_manifest()) and m.is_default)
        if len(flagged) > 1:
            log.warning("several models have default = true (%s); using %s", ", ".join(flagged), flagged[0])
        if flagged:
            return flagged[0]
        return next(iter(self._models)) if len(self._models) == 1 else None

    def models(self) -> list[ModelRecord]:
        """Every known model, sorted by name."""
        return [self._models[name] for name in sorted(self._models)]

    def get(self, name: str) -> ModelRecord:
        """The model called ``name`` ('' = the default model). Raises ModelNotFound."""
        resolved = name or self.default_model
        if resolved is None:
            raise ModelNotFound("no model named in the request and no default model is configured")
        record = self._models.get(resolved)
        if record is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {resolved!r}; known models: {known}")
        return record

    def resolve(self, name: str, version: int = 0) -> LoadedVersion:
        """The loaded version a request should run on. Raises ModelNotFound or ModelUnavailable."""
        record = self.get(name)
        if version < 0:
            raise ModelNotFound(f"model {record.name}: version must be >= 0, got {version}")
        entry = record.serving() if version == 0 else record.versions.get(version)
        if entry is None and version:
            raise ModelNotFound(f"model {record.name} has no loaded version {version}")
        if entry is None or entry.loaded is None or entry.state is not VersionState.READY:
            state = "no version is ready" if version == 0 else f"version {version} is {entry.state.name}"
            raise ModelUnavailable(f"model {record.name}: {state}")
        return entry.loaded

    async def aclose(self) -> None:
        """Release every loaded version and stop the loader thread."""
        for record in self._models.values():
            for entry in record.versions.values():
                if entry.loaded:
                    entry.loaded.release()
                    entry.loaded = None
        self._loader.shutdown(wait=True)


def version_numbers(model_dir: Path) -> list[int]:
    """Numbered version directories of a model; anything else (``.tmp-3``, ``samples``) is ignored."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name))
