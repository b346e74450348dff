"""The Open Inference Protocol's model-repository extension and Triton's ModelConfig and ModelStatistics, for both
bindings: neutral answers built from the manager's records, the model control and the inference statistics.

The gRPC binding (:mod:`server.edges.grpc.oip_repository`) and the REST binding
(:mod:`server.edges.http.oip_repository`) only turn these dataclasses into protobuf or JSON. Index states are the
version states' names, except FAILED, which is Triton's ``UNAVAILABLE`` with the load error as its reason. Load and
unload are :class:`server.models.control.ModelControl`'s (explicit mode only; FAILED_PRECONDITION otherwise). Never
blocks the loop; load and unload wait for the load or the drain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.core import errors
from server.core.config import DEFAULT_MAX_BATCH_SIZE
from server.core.lifecycle import VersionState
from server.edges.common.describe import ModelDescription, describe_model
from server.edges.common.oip_codec import INPUT, OUTPUT, PLATFORM, parse_version
from server.models.control import ModelControl
from server.models.manager import ModelManager
from server.ops.inference_stats import InferenceStats, VersionStats

REPOSITORY = ""
"""classifyd has one repository; a request may name it "" (every repository) only."""
UNLOAD_PARAMETERS = frozenset({"unload_dependents"})
"""What an unload may carry (tritonclient always sends it; classifyd's models have no dependents)."""
BACKENDS = {"torch": "pytorch", "onnxruntime": "onnxruntime"}
"""classifyd's runtime → Triton's backend name."""
LOADED = (VersionState.READY, VersionState.UNLOADING)
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
"""The protocol extensions served here, as ServerMetadata names them on both bindings."""


@dataclass(frozen=True)
class IndexRow:
    """One model version of the repository index."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class ConfigTensor:
    """An input or output of a model configuration (Triton's ModelInput / ModelOutput)."""

    name: str
    data_type: str
    dims: list[int]
    format: str = "FORMAT_NONE"
    label_filename: str = ""


@dataclass(frozen=True)
class ModelConfig:
    """The fields of Triton's ModelConfig that classifyd knows."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    max_queue_delay_microseconds: int
    inputs: list[ConfigTensor]
    outputs: list[ConfigTensor]


@dataclass(frozen=True)
class VersionStatistics:
    name: str
    version: str
    stats: VersionStats


class OipRepository:
    """Repository index, load, unload, model configuration and statistics over the daemon's parts."""

    def __init__(self, manager: ModelManager, control: ModelControl, stats: InferenceStats) -> None:
        self._manager = manager
        self._control = control
        self._stats = stats

    def index(self, repository: str = REPOSITORY, ready_only: bool = False) -> list[IndexRow]:
        """Every model version the daemon holds a record of (only READY ones with ``ready_only``); a model without
        any is one row with no version. Raises InvalidInput for a repository name other than ''."""
        _check_repository(repository)
        rows = []
        for record in self._manager.models():
            model = describe_model(record)
            rows += [_row(model.name, v.version, v.state, v.error) for v in reversed(model.versions)]
            if not model.versions:
                rows.append(IndexRow(model.name, "", "UNAVAILABLE", "no version directories"))
        return [r for r in rows if r.state == VersionState.READY.name] if ready_only else rows

    async def load(self, name: str, repository: str = REPOSITORY, parameters: Mapping[str, Any] | None = None) -> None:
        """Load model ``name`` (``ModelControl.load``). Raises InvalidInput for a parameter (configuration and
        file overrides are not supported) or another repository, and what ``ModelControl.load`` raises."""
        _check_repository(repository)
        if parameters:
            raise errors.InvalidInput(f"load parameters are not supported (got {', '.join(sorted(parameters))}): "
                                      "classifyd loads a model from its directory and model.toml only")
        await self._control.load(name)

    async def unload(self, name: str, repository: str = REPOSITORY,
                     parameters: Mapping[str, Any] | None = None) -> None:
        """Unload model ``name`` once its in-flight requests are answered (``ModelControl.unload``)."""
        _check_repository(repository)
        unknown = set(parameters or ()) - UNLOAD_PARAMETERS
        if unknown:
            raise errors.InvalidInput(f"unknown unload parameters: {', '.join(sorted(unknown))}; only "
                                      "unload_dependents is accepted (classifyd's models have no dependents)")
        await self._control.unload(name)

    def config(self, name: str, version_text: str = "") -> ModelConfig:
        """The configuration of a loaded model. Raises InvalidInput for a bad version string, ModelNotFound for
        an unknown model or version, ModelUnavailable when no manifest parsed (not loaded, or failed)."""
        version = parse_version(version_text)
        model = describe_model(self._manager.get(name))
        if version and model.version(version) is None:
            raise errors.ModelNotFound(f"model {model.name} has no version {version}")
        manifest = model.manifest
        if manifest is None:
            raise errors.ModelUnavailable(f"model {model.name} has no configuration yet: it is read from model.toml "
                                          "when a version loads")
        serving = model.serving
        batch = serving.max_batch_size if serving else manifest.batching.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        delay_ms = serving.max_delay_ms if serving else manifest.batching.max_delay_ms or 0.0
        runtime = (serving.runtime if serving else manifest.runtime) or "torch"
        return ModelConfig(model.name, PLATFORM, BACKENDS.get(runtime, runtime), batch, round(delay_ms * 1000),
                           [ConfigTensor(INPUT, "TYPE_STRING", [1])],
                           [ConfigTensor(OUTPUT, "TYPE_FP32", [manifest.num_classes], label_filename="labels.txt")])

    def statistics(self, name: str = "", version_text: str = "") -> list[VersionStatistics]:
        """Per loaded version (and every version that served since start): its counts and durations; every model
        when ``name`` is ''. Raises InvalidInput for a bad version string, ModelNotFound for an unknown model or
        a version with no statistics and no record."""
        version = parse_version(version_text)
        if not name:
            if version:
                raise errors.InvalidInput("a version needs a model name")
            return [s for record in self._manager.models() for s in self._of(describe_model(record), 0)]
        return self._of(describe_model(self._manager.get(name)), version)

    def _of(self, model: ModelDescription, version: int) -> list[VersionStatistics]:
        numbers = set(self._stats.versions(model.name)) | {v.version for v in model.versions if v.state in LOADED}
        if version:
            if version not in numbers and model.version(version) is None:
                raise errors.ModelNotFound(f"model {model.name} has no version {version}")
            numbers = {version}
        return [VersionStatistics(model.name, str(n), self._stats.of(model.name, n)) for n in sorted(numbers)]


def _row(name: str, version: int, state: VersionState, error: str) -> IndexRow:
    if state is VersionState.FAILED:
        return IndexRow(name, str(version), "UNAVAILABLE", error)
    return IndexRow(name, str(version), state.name, "")


def _check_repository(repository: str) -> None:
    if repository:
        raise errors.InvalidInput(f"unknown repository {repository[:100]!r}: classifyd serves one repository, "
                                  "named by leaving repository_name empty")
