"""The model manager: which versions of which models are loaded, and which serves.

TF Serving's *manager*: the source (:mod:`server.models.source`) says which versions exist on disk, the loader
(:mod:`server.models.loader.pipeline`) loads one version, and the manager keeps the states, the leases and the
events. Every state change follows the lifecycle table of :mod:`server.core.lifecycle`. It knows nothing of
batching or gRPC. A request resolves its version with :meth:`ModelManager.resolve` when its batch is formed, so
putting a new version into service is one reference change between batches. Requests hold a lease on the
versions they use (:meth:`LoadedVersion.lease`): a retired version is released only once its last request has
finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.core.config import (
    DEFAULT_CACHE_DIR,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_DELAY_MS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_RUNTIME,
    AutotuneDefaults,
    BatchingDefaults,
)
from server.core.errors import ModelNotFound, ModelUnavailable
from server.core.input_changes import check_preprocessing
from server.core.lifecycle import EventKind, ModelEvent, VersionState, move
from server.core.manifest import Manifest
from server.core.rollout import Scores
from server.inference.devices import InferenceThreads
from server.inference.runtime import LoadedVersion
from server.models.catalogue import CatalogueSteps, retire_task_name
from server.models.loader.autotune import TuneQueue
from server.models.loader.pipeline import Loaded, LoadFailed, LoadSettings, VersionLoader
from server.models.loader.runtime_choice import ChoiceSettings, RuntimeChoice, RuntimeChooser
from server.models.memory import MeasuredLoader
from server.models.rollout import RolloutSteps, files_and_decision
from server.models.source.repository import (
    Fingerprint,
    SettleTracker,
    fingerprint,
    model_names,
    model_present,
    version_numbers,
)
from server.ops.heap import collect_released

log = logging.getLogger("classifyd.models")


@dataclass(eq=False)
class VersionRecord:
    """What the manager knows of one attempt to load one version directory (one generation of it)."""

    version: int
    state: VersionState = VersionState.LOADING
    """Changed only by :func:`server.core.lifecycle.move`."""
    held: bool = False
    """Whether the manager holds the record: from its first transition until it is dropped."""
    error: str = ""
    loaded: LoadedVersion | None = None
    manifest: Manifest | None = None
    generation: int = 0
    fingerprint: Fingerprint = ()
    failed_fingerprint: Fingerprint | None = None
    validation_accuracy: float | None = None
    runtime_choice: RuntimeChoice | None = None
    """Why the version runs on its runtime, with the speeds measured (``runtime = "auto"``); None otherwise."""
    scores: Scores | None = None
    """A CANDIDATE's rollout figures so far (server/rollouts.py)."""

    def is_current(self, current: Fingerprint) -> bool:
        """Whether these files were already tried (loaded, or failed to load)."""
        return current in (self.fingerprint, self.failed_fingerprint)


@dataclass
class ModelRecord:
    """One model directory and its versions."""

    name: str
    directory: Path
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    removed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    announced: int | None = None
    """The serving version the last event told of (None: none serves), so the next change is told once."""

    def serving(self) -> VersionRecord | None:
        """The newest READY version, the one requests without a pinned version get."""
        ready = [v for v in list(self.versions.values()) if v.state is VersionState.READY]  # /metrics' thread too
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
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    default_max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    default_max_queue: int = DEFAULT_MAX_QUEUE
    autotune: AutotuneDefaults = field(default_factory=AutotuneDefaults)
    trust_code: bool = False  # allow python: architectures, which execute files of the repository
    cache_dir: Path = DEFAULT_CACHE_DIR  # ONNX exports (runtime = "onnxruntime")
    default_runtime: str = DEFAULT_RUNTIME  # for manifests that set no runtime

    def loading(self) -> LoadSettings:
        """What the loader needs of these settings."""
        batching = BatchingDefaults(max_batch_size=self.default_max_batch_size, max_delay_ms=self.default_max_delay_ms,
                                    max_queue=self.default_max_queue, autotune=self.autotune)
        return LoadSettings(self.device, batching, self.trust_code, self.cache_dir, self.default_runtime)


Listener = Callable[[ModelEvent], None]


class ModelManager(RolloutSteps, CatalogueSteps):
    """Loads models from the repository, swaps versions, and answers which version serves a request."""

    def __init__(self, settings: ManagerSettings, inference: InferenceThreads) -> None:
        self.settings = settings
        self._inference = inference
        self._loader = self.memory = MeasuredLoader(VersionLoader(settings.loading(), inference), inference)
        self._models: dict[str, ModelRecord] = {}
        self._listeners: list[Listener] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._tuning = TuneQueue(inference)
        loading = settings.loading()
        self.runtimes = RuntimeChooser(ChoiceSettings(settings.cache_dir, settings.trust_code, loading.batching),
                                       inference, self._tuning, self._runtime_chosen, fingerprint)
        self._starting = False  # the initial load: readiness first, batch curves measured afterwards
        self._started = False  # the initial load has ended: an unknown model is unknown, not still loading
        self._pre_decided = {}  # (model, version) → a decision recorded for the files being loaded (rollout.py)
        self._writing = {}  # (model, version) → the candidate's pending record being written (rollout.py)
        self._on_disk = {}  # model → its version numbers on disk at its last reconcile (rollout.py)
        self.default_model: str | None = None
        self.wanted: Callable[[str], bool] = lambda name: True  # to be loaded? (no: listed AVAILABLE; control.py)

    # ----- events and state changes

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` on the event loop for every model event."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _move(self, record: ModelRecord, entry: VersionRecord, target: VersionState | None, reason: str = "") -> None:
        """Every state change: along the lifecycle table (IllegalTransition otherwise), then its event if any.
        A listener that raises is logged and skipped: the change is made whatever its observers do."""
        kind = move(entry, target).event
        if kind is None:
            return
        serving = record.serving()
        number = serving.version if serving is not None else None
        reason = self._tell_serving(record, kind, reason, number)
        # an unloaded generation never serves, even when another generation of its number does
        now_serving = number == entry.version and kind is not EventKind.UNLOADED
        self._tell(ModelEvent(record.name, entry.version, kind, reason, now_serving, number))

    def _runtime_chosen(self, loaded: LoadedVersion, choice: RuntimeChoice, headline: str) -> None:
        """The background runtime choice of ``loaded`` ended (server/models/loader/runtime_choice.py): record it and
        tell it as a READY event with ``headline`` as reason; no state changes (the version served throughout)."""
        for record in self._models.values():
            for entry in record.versions.values():
                if entry.loaded is loaded:
                    entry.runtime_choice = choice
                    serving = record.serving()
                    self._tell(ModelEvent(record.name, entry.version, EventKind.READY, headline, serving is entry,
                                          serving.version if serving else None))

    def _tell(self, event: ModelEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("model event listener %r failed on %s", listener, event)

    @staticmethod
    def _tell_serving(record: ModelRecord, kind: EventKind, reason: str, number: int | None) -> str:
        """``reason`` with which version serves now: after every change of it (told once), and on every unload.
        A FAILED reason stays the load error alone (it is the version's error too)."""
        if kind is EventKind.FAILED or (number == record.announced and kind is not EventKind.UNLOADED):
            return reason
        told = "no version serves now" if number is None else \
            f"version {number} {'serves' if number == record.announced else 'now serves'}"
        record.announced = number
        return f"{reason}; {told}" if reason else told

    # ----- loading and swapping

    async def load_repository(self) -> None:
        """Load every model of the repository now (no settle period: the daemon is starting).

        The models load concurrently (their heavy steps still take turns on the loader and inference threads,
        so small models do not wait behind a big one's every step), and a version goes READY before its batch
        curve is measured: it serves with its provisional cap while the measurements run afterwards, one at a
        time (:meth:`tuned` waits for them). A version that fails to load is FAILED and the other models load
        and serve all the same; a model whose directory cannot be read now is logged and left to the watcher.
        Raises OSError only when the models directory itself cannot be listed."""
        names = await asyncio.to_thread(model_names, self.settings.models_dir)
        self._starting = True
        try:
            await asyncio.gather(*(self._load_at_start(name) for name in names))
        finally:
            self._starting = False
            self._started = True

    async def _load_at_start(self, name: str) -> None:
        try:
            await self.reconcile(name)
        except Exception:  # one unreadable model directory must not keep the others down
            log.exception("model %s: cannot read its directory; the repository watcher tries again", name)

    async def tuned(self) -> None:
        """Block until the batch curves deferred by :meth:`load_repository` are measured."""
        await self._tuning.wait()

    async def reconcile(self, name: str, *, settle: SettleTracker | None = None, force: bool = False) -> float:
        """Bring model ``name`` in line with its directory.

        Loads new and changed versions (newest first, until the manifest's ``keep_versions`` are ready),
        retires versions that are superseded or removed, and unloads the model when its directory is gone.
        With ``settle``, files that changed within the settle period are left for later. ``force`` reloads
        versions even when their files did not change. Returns the seconds after which to look again
        (0.0 when nothing is pending). Never raises for a bad version: it becomes FAILED. Raises OSError
        when the repository cannot be read (RepositoryUnreachable when the models directory itself is gone): a
        filesystem outage, which removes nothing.
        """
        directory = self.settings.models_dir / name
        if not await asyncio.to_thread(model_present, self.settings.models_dir, name):  # slow on network filesystems
            await self._remove_model(name)
            return 0.0
        record = self._models.get(name)
        if record is None or record.removed:
            record = self._models[name] = ModelRecord(name, directory)
        async with record.lock:
            if record.removed:  # removed while this call waited for the lock: a later call starts a new record
                return 0.0
            on_disk = await asyncio.to_thread(version_numbers, record.directory)
            if not self.wanted(name):
                return self._list_available(record, on_disk)
            wait, kept = await self._load_newest(record, on_disk, settle, force)
            if wait == 0.0 or not any(v.state is VersionState.READY for v in record.versions.values()):
                self._retire_all_but(record, kept, set(on_disk))
        self.default_model = self._choose_default()
        return wait

    async def _load_newest(self, record: ModelRecord, on_disk: list[int], settle: SettleTracker | None,
                           force: bool) -> tuple[float, set[int]]:
        if not on_disk:
            log.warning("model %s: no version directories yet (expected %s/<N>/)", record.name, record.directory)
        wait, kept, keep, self._on_disk[record.name] = 0.0, set(), 1, on_disk
        for number in sorted(on_disk, reverse=True):
            if len(kept) >= keep:
                break
            entry = await self._consider(record, number, settle, force)
            if isinstance(entry, float):
                wait = entry if wait == 0.0 else min(wait, entry)
                current = record.versions.get(number)
                if current and current.state is VersionState.READY:
                    kept.add(number)
            elif entry is not None and entry.state is VersionState.READY:
                kept.add(number)
                keep = max(keep, entry.manifest.keep_versions if entry.manifest else 1)
        return wait, kept

    async def _consider(self, record: ModelRecord, number: int, settle: SettleTracker | None,
                        force: bool) -> VersionRecord | float | None:
        """Load one version if its files are new or changed and have settled; else say how long to wait."""
        current, decision = await asyncio.to_thread(files_and_decision, record.directory / str(number))
        entry = record.versions.get(number)
        if entry is not None and entry.state is not VersionState.UNLOADING and entry.is_current(current) and not force:
            return self._follow(record, entry, decision)  # rollout.py: decided meanwhile by another process
        recorded = self._recorded(record, number, current, decision)  # rollout.py: a recorded rejection
        if recorded is not None:
            return recorded
        remaining = settle.remaining((record.name, number), current) if settle else 0.0
        if remaining > 0:
            return remaining
        return await self._load_version(record, number, current)

    async def _load_version(self, record: ModelRecord, number: int, files: Fingerprint) -> VersionRecord:
        """Load a version with the loader; on success it serves, on failure the old state stays.

        Changed files of a READY version load as a new generation beside it, which keeps serving meanwhile."""
        previous = record.versions.get(number)
        serving_copy = previous if previous is not None and previous.state is VersionState.READY else None
        entry = VersionRecord(number, fingerprint=files, generation=(previous.generation if previous else 0) + 1)
        if serving_copy is None:
            if previous is not None and previous.state is VersionState.AVAILABLE:  # model control: asked to load
                entry, entry.fingerprint, entry.generation = previous, files, 1
            elif previous is not None and previous.state is not VersionState.UNLOADING:
                self._move(record, previous, None)  # a failed or cut-short attempt, replaced by this one
            record.versions[number] = entry
        self._move(record, entry, VersionState.LOADING, f"generation {entry.generation}" if serving_copy else "")
        def seen(manifest: Manifest) -> None:
            entry.manifest = manifest
        try:
            loaded = await self._loader.load(record.name, number, record.directory / str(number), on_manifest=seen,
                                             defer_tune=self._starting, accept=self._preprocessing_gate(record, number))
        except LoadFailed as exc:  # any exception of the load: the loader has released what it built
            return self._load_failed(record, entry, serving_copy, exc)
        except asyncio.CancelledError:
            self._load_cut_short(record, entry)
            raise
        return self._load_succeeded(record, entry, serving_copy, loaded)

    @staticmethod
    def _preprocessing_gate(record: ModelRecord, number: int) -> Callable[[Manifest], None]:
        """What the loader calls with the version's resolved manifest: raises PreprocessingChanged when the version
        would take over from the serving version (a newer number, or new files of the serving one) with other
        preprocessing that its own model.toml does not acknowledge. Older versions (kept for pinning, or a
        rollback's) are not compared."""
        def accept(manifest: Manifest) -> None:
            serving = record.serving()
            if serving is None or serving.manifest is None or number < serving.version:
                return
            changes = check_preprocessing(serving.version, serving.manifest, manifest)
            if changes:
                log.warning("model %s version %d: preprocessing changed from version %d (acknowledged by "
                            "preprocessing_changed = true): %s", record.name, number, serving.version,
                            ", ".join(changes))
        return accept

    def _load_succeeded(self, record: ModelRecord, entry: VersionRecord, serving_copy: VersionRecord | None,
                        loaded: Loaded) -> VersionRecord:
        entry.loaded, entry.manifest = loaded.version, loaded.version.manifest
        entry.validation_accuracy = loaded.validation_accuracy
        record.versions[entry.version] = entry
        if serving_copy is not None and serving_copy.loaded:
            self._retire(record, serving_copy, f"generation {serving_copy.generation} retired, replaced by "
                                               f"generation {entry.generation}")
        log.info("model %s version %d ready on %s (generation %d, %.2f s)", record.name, entry.version,
                 loaded.version.device, entry.generation, loaded.seconds)
        self._move(record, entry, self._loaded_state(record, entry, serving_copy is not None))
        if loaded.pending_tune is not None:
            self._tuning.schedule(loaded.version, loaded.pending_tune)
        entry.runtime_choice = self.runtimes.schedule(loaded.version, record.directory / str(entry.version),
                                                      entry.fingerprint)
        return entry

    def _load_failed(self, record: ModelRecord, entry: VersionRecord, serving_copy: VersionRecord | None,
                     exc: LoadFailed) -> VersionRecord:
        message = str(exc)
        log.error("model %s version %d failed to load: %s", record.name, entry.version, message,
                  exc_info=exc.__cause__ if exc.unexpected else None)  # a bug in model code: where it raised
        if serving_copy is not None:  # changed files of a serving version: the loaded files keep serving
            serving_copy.error = f"reload failed: {message}"
            serving_copy.failed_fingerprint = entry.fingerprint
            self._move(record, entry, VersionState.FAILED, message)
            self._move(record, entry, None)  # the new generation is dropped; the serving one stays
            return serving_copy
        entry.error = message
        entry.failed_fingerprint, entry.fingerprint = entry.fingerprint, ()
        self._move(record, entry, VersionState.FAILED, message)
        return entry

    # ----- retiring and removing

    def _retire_all_but(self, record: ModelRecord, kept: set[int], on_disk: set[int]) -> None:
        for number, entry in list(record.versions.items()):
            if number in kept:
                continue
            if entry.state is VersionState.READY:
                self._retire(record, entry, "removed from disk" if number not in on_disk else "superseded")
            elif entry.state is VersionState.AVAILABLE or (entry.state is VersionState.FAILED
                                                             and number not in on_disk):
                del record.versions[number]
                self._move(record, entry, None)
        self._settle_candidates(record, on_disk)  # rollout.py: replaced candidates, vanished rejected versions

    def _retire(self, record: ModelRecord, entry: VersionRecord, reason: str) -> None:
        """Stop routing new batches to ``entry``; release it once its in-flight requests are done."""
        self.runtimes.cancel(entry.loaded)  # a version on its way out never switches runtime
        self._move(record, entry, VersionState.UNLOADING)
        task = asyncio.get_running_loop().create_task(self._finish_retire(record, entry, reason),
                                                      name=retire_task_name(record.name))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _finish_retire(self, record: ModelRecord, entry: VersionRecord, reason: str) -> None:
        loaded = entry.loaded
        if loaded is not None:
            await loaded.drained()
            await self._release(loaded)
        entry.loaded = None
        if record.versions.get(entry.version) is entry:
            del record.versions[entry.version]
        log.info("model %s version %d unloaded (%s)", record.name, entry.version, reason)
        self._move(record, entry, None, reason)

    async def _remove_model(self, name: str) -> None:
        record = self._models.get(name)
        if record is None or record.removed:
            return
        async with record.lock:
            record.removed = True
            self.on_removed(name)
            for entry in list(record.versions.values()):
                if entry.state in (VersionState.READY, VersionState.CANDIDATE):
                    self._retire(record, entry, "model directory removed")
                elif entry.state in (VersionState.FAILED, VersionState.AVAILABLE, VersionState.REJECTED):
                    del record.versions[entry.version]
                    self._move(record, entry, None)
        log.info("model %s removed: unloading after in-flight requests finish", name)
        self.default_model = self._choose_default()

    @staticmethod
    def _new_record(number: int, files: Fingerprint) -> VersionRecord:
        return VersionRecord(number, fingerprint=files)

    def _choose_default(self) -> str | None:
        live = {n: r for n, r in self._models.items() if not r.removed}
        flagged = sorted(n for n, r in live.items() if (m := r.latest_manifest()) and m.is_default)
        if len(flagged) > 1:
            log.warning("several models have default = true (%s); using %s", ", ".join(flagged), flagged[0])
        if flagged:
            return flagged[0]
        return next(iter(live)) if len(live) == 1 else None

    # ----- queries

    def model_names(self) -> list[str]:
        """The names of :meth:`models`, for the repository watcher."""
        return [record.name for record in self.models()]

    def models(self) -> list[ModelRecord]:
        """Every model in the repository (removed ones excluded), sorted by name."""
        return [m for _, m in sorted(self._models.items()) if not m.removed]  # one copy: safe off the loop

    def get(self, name: str) -> ModelRecord:
        """The model called ``name`` ('' = the default model). Raises ModelNotFound; ModelUnavailable instead while
        the repository's first load runs (the default is chosen, and a model is known, once it has been read: a
        daemon, or a ``--workers`` process that replaces a dead one, accepts requests while it loads)."""
        resolved = name or self.default_model
        if resolved is None:
            self._refuse_while_starting("no model named in the request")
            raise ModelNotFound("no model named in the request and no default model is configured")
        record = self._models.get(resolved)
        if record is None or record.removed:
            self._refuse_while_starting(f"model {resolved!r}")
            known = ", ".join(r.name for r in self.models()) or "none"
            raise ModelNotFound(f"unknown model {resolved!r}; known models: {known}")
        return record

    def _refuse_while_starting(self, what: str) -> None:
        if not self._started:
            raise ModelUnavailable(f"{what}: the daemon is starting and its model repository is still loading; "
                                   "retry shortly")

    def resolve(self, name: str, version: int = 0) -> LoadedVersion:
        """The loaded version a request should run on. Raises ModelNotFound or ModelUnavailable."""
        record = self.get(name)
        if version < 0:
            raise ModelNotFound(f"model {record.name}: version must be >= 0, got {version}")
        if not self.wanted(record.name):  # unloaded or evicted: no new request, even while its versions drain
            raise ModelUnavailable(f"model {record.name} is not loaded (--model-control explicit): load it first "
                                   "(RepositoryModelLoad, LoadModel, python -m client load)")
        entry = record.serving() if version == 0 else record.versions.get(version)
        if entry is None and version:
            raise ModelNotFound(f"model {record.name} has no loaded version {version}")
        if entry is None and any(v.state is VersionState.LOADING for v in record.versions.values()):
            raise ModelUnavailable(f"model {record.name} is loading; retry shortly")
        if entry is None or entry.loaded is None or entry.state is not VersionState.READY:
            state = "no version is ready" if entry is None else f"version {version} is {entry.state.name}"
            raise ModelUnavailable(f"model {record.name}: {state}")
        return entry.loaded

    async def aclose(self) -> None:
        """Stop the loads on demand, release every loaded version and stop the loader thread."""
        await self.memory.stop()
        for task in list(self._retiring):
            task.cancel()
        self._tuning.cancel()
        await self.runtimes.aclose()
        for record in self._models.values():
            for entry in record.versions.values():
                if entry.loaded:
                    await self._release(entry.loaded, collect=False)  # the process is ending: no collection
                    entry.loaded = None
        await asyncio.to_thread(self._loader.close)  # waits for the loader thread's current step

    async def _release(self, loaded: LoadedVersion, *, collect: bool = True) -> None:
        """Release ``loaded`` on the inference thread (torch and the CUDA cache block), or here once that
        thread has stopped; then, with ``collect``, what it left in reference cycles on a settled heap
        (server/ops/heap.py: a worker thread's full collection)."""
        try:
            await self._inference.for_version(loaded).run(loaded.release)
        except RuntimeError:  # the inference thread was shut down first
            loaded.release()
        if collect:
            await collect_released()
