"""One description of a model, built once from the manager's record and rendered by every edge.

gRPC ``classifier.v1`` renders it as ``ModelInfo``, HTTP as the JSON of ``/v1/models`` and the status page, and
both Open Inference Protocol bindings take their model metadata from it, so a model's versions, states, labels and
batching read the same wherever they are asked for. Reads the record only; never blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.batching.curve import BatchCurve
from server.batching.online import TuningSnapshot
from server.core.lifecycle import VersionState
from server.core.manifest import Manifest
from server.core.rollout import RolloutSpec, Scores
from server.models.loader.runtime_choice import RuntimeChoice
from server.models.manager import ModelRecord, VersionRecord
from server.models.memory import loaded_bytes


@dataclass(frozen=True)
class VersionDescription:
    """One version of a model and where it stands."""

    version: int
    state: VersionState
    error: str
    generation: int
    validation_accuracy: float | None
    num_labels: int | None
    """From this version's own manifest; None when it did not parse."""


@dataclass(frozen=True)
class ServingDescription:
    """How the serving version runs: its batching, measured batch curve and numeric precision."""

    version: int
    max_batch_size: int
    max_delay_ms: float
    latency_target_ms: float
    batch_curve: BatchCurve | None
    precision: str
    precision_note: str
    runtime: str
    """What runs the forward pass (server/inference/runtimes.py): "torch" or "onnxruntime"."""
    batch_tuning: TuningSnapshot | None = None
    runtime_choice: RuntimeChoice | None = None
    """Why the version runs on ``runtime``, with the measured speeds (``runtime = "auto"``); None otherwise."""
    """The online cap tuner's state (server/batching/online.py); None when the cap does not move while serving."""
    device: str = ""
    """Where the version runs ("cpu", "cuda:1"): its manifest's ``device`` placed (server/inference/placement.py)."""
    loaded_bytes: int = 0
    """Its memory measured after warm-up (server/models/memory.py); 0 when not measured."""


@dataclass(frozen=True)
class RolloutDescription:
    """A model's rollout candidate (docs/rollout.md): its ``[rollout]`` and its live figures so far."""

    version: int
    spec: RolloutSpec
    scores: Scores | None
    """None before the first comparison."""


@dataclass(frozen=True)
class ModelDescription:
    """A model: its versions (newest first), the serving version, its manifest and how it serves."""

    name: str
    versions: tuple[VersionDescription, ...]
    serving_version: int
    """0 when no version is ready."""
    manifest: Manifest | None
    """The serving version's manifest, else the newest that parsed; None when none did."""
    serving: ServingDescription | None
    """None unless the serving version is loaded."""

    @property
    def ready_versions(self) -> list[int]:
        """The versions in state READY, newest first."""
        return [v.version for v in self.versions if v.state is VersionState.READY]

    rollout: RolloutDescription | None = None
    """The candidate of a shadow or canary rollout; None when there is none."""

    def version(self, number: int) -> VersionDescription | None:
        """The version called ``number``, or None."""
        return next((v for v in self.versions if v.version == number), None)


def describe_model(record: ModelRecord) -> ModelDescription:
    """The description of ``record`` as it stands now."""
    serving = record.serving()
    versions = tuple(_describe_version(v) for v in sorted(record.versions.values(), key=lambda v: -v.version))
    return ModelDescription(record.name, versions, serving.version if serving else 0, record.latest_manifest(),
                            _describe_serving(serving), _describe_rollout(record))


def _describe_rollout(record: ModelRecord) -> RolloutDescription | None:
    candidates = [v for v in record.versions.values() if v.state is VersionState.CANDIDATE and v.manifest]
    if not candidates:
        return None
    entry = max(candidates, key=lambda v: v.version)
    assert entry.manifest is not None
    return RolloutDescription(entry.version, entry.manifest.rollout, entry.scores)


def _describe_version(entry: VersionRecord) -> VersionDescription:
    return VersionDescription(entry.version, entry.state, entry.error, entry.generation, entry.validation_accuracy,
                              entry.manifest.num_classes if entry.manifest else None)


def _describe_serving(entry: VersionRecord | None) -> ServingDescription | None:
    if entry is None or entry.loaded is None:
        return None
    loaded = entry.loaded
    return ServingDescription(entry.version, loaded.max_batch_size, loaded.max_delay_ms,
                              loaded.manifest.batching.latency_target_ms or 0.0, loaded.batch_curve,
                              loaded.precision, loaded.precision_note,
                              loaded.runtime.name if loaded.runtime else "torch",
                              loaded.tuner.snapshot() if loaded.tuner is not None else None, entry.runtime_choice,
                              str(loaded.device), loaded_bytes(loaded))
