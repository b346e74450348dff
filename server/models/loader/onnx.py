"""ONNX Runtime for a version: ``architecture = "onnx"`` (a shipped model.onnx) or ``runtime = "onnxruntime"``
(the built module exported, cached and verified against itself).

Everything here blocks (file reads, export, session creation, forward passes): run it on the loader thread.
Raises WeightsError with a message saying what is wrong.

The export cache lives outside the watched repository (``--cache-dir``) and holds portable ONNX files only (never
graphs optimised for one CPU: ONNX Runtime optimises when the session opens). Its key covers the weights' bytes,
the manifest keys that shape the module, and the torch, onnx and onnxruntime versions, so a restart reuses the
export and an upgrade redoes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from server.core.manifest import Manifest
from server.inference.runtime import LoadedVersion
from server.inference.runtimes import OnnxRuntime, open_session
from server.inference.threads import process_threads
from server.models.loader.custom_code import PREFIX
from server.models.loader.gate import GateInputs
from server.models.loader.weights import WeightsError, find_weights

log = logging.getLogger("classifyd.models")

TOLERANCE = 1e-4
"""Largest absolute difference allowed between a probability from ONNX Runtime and PyTorch's for the same input;
top-1 must also agree wherever PyTorch's top two differ by more than this."""
EXPORT_BATCH = 2  # the dynamo exporter specialises a batch of 1 as a constant: trace with two


def onnx_threads() -> int:
    """ONNX Runtime's intra-op threads: the process's torch thread count, as the host rule (or --torch-threads)
    applied it (the calling thread's own count may be a version's smaller one: server/inference/threads.py)."""
    return process_threads()


def open_shipped(version_dir: Path, manifest: Manifest) -> tuple[OnnxRuntime, int | None]:
    """The version's model.onnx in a session, checked against ``[input]`` and the labels; with the graph's fixed
    batch size (None when dynamic). Raises WeightsError."""
    path = find_weights(version_dir, manifest)
    if path.suffix != ".onnx":
        raise WeightsError(f'{path}: architecture = "onnx" serves a .onnx file; found {path.name}')
    runtime = _opened(path, "it")
    return runtime, check_graph(runtime, manifest, path)


def _opened(path: Path, what: str) -> OnnxRuntime:
    """``path`` in an ONNX Runtime session; raises WeightsError with ONNX Runtime's reason."""
    try:
        return OnnxRuntime(open_session(path, onnx_threads()), str(path))
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own Exception subclasses (InvalidProtobuf, Fail, ...)
        raise WeightsError(f"{path}: ONNX Runtime cannot load {what}: {exc}") from None


def check_graph(runtime: OnnxRuntime, manifest: Manifest, path: Path) -> int | None:
    """Check the graph's input (NCHW, channels/height/width of ``[input]``) and output width against the manifest;
    return its fixed batch size, None when dynamic. Raises WeightsError naming the mismatch."""
    spec, graph = manifest.input, runtime.input
    want = (spec.channels, spec.height, spec.width)
    if len(graph.dims) != 4:
        raise WeightsError(f"{path}: input {graph.name!r} has {len(graph.dims)} dimensions; classifyd feeds "
                           f"N x C x H x W (NCHW) = N x {want[0]} x {want[1]} x {want[2]}")
    got = graph.dims[1:]
    if got != want and all(d is not None for d in got):
        layout = " (it looks NHWC; export it NCHW)" if got == (spec.height, spec.width, spec.channels) else ""
        raise WeightsError(f"{path}: input {graph.name!r} takes N x {got[0]} x {got[1]} x {got[2]} but [input] "
                           f"gives N x {want[0]} x {want[1]} x {want[2]} (color {spec.color!r}, size "
                           f"{spec.height}x{spec.width}){layout}")
    if graph.classes is not None and graph.classes != manifest.num_classes:
        raise WeightsError(f"{path}: the graph outputs {graph.classes} scores per image but there are "
                           f"{manifest.num_classes} labels: the label count must equal the output width")
    batch = graph.dims[0]
    if batch is not None and batch != 1:
        raise WeightsError(f"{path}: input {graph.name!r} has a fixed batch of {batch}; export it with a dynamic "
                           "batch dimension (or a batch of 1)")
    return batch


def cache_key(files: list[Path], manifest: Manifest) -> str:
    """Hex digest of ``files``' bytes (the weights, and a ``python:`` architecture's code), the manifest keys that
    shape the module and the library versions. Blocks (reads the files)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    spec = manifest.input
    shape = {"architecture": manifest.architecture, "num_classes": manifest.num_classes,
             "model_args": manifest.model_args, "input": [spec.channels, spec.height, spec.width],
             "versions": [torch.__version__, onnx.__version__, ort.__version__]}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def exported_runtime(module: nn.Module, version_dir: Path, manifest: Manifest, cache_dir: Path) -> OnnxRuntime:
    """The module as an ONNX Runtime session: from the cache when its key is there, else exported into it.
    Raises WeightsError when neither exporter manages."""
    path, _ = cached_export(module, version_dir, manifest, cache_dir)
    return open_export(path)


def open_export(path: Path) -> OnnxRuntime:
    """A cached export in an ONNX Runtime session with the host rule's threads. Raises WeightsError."""
    return _opened(path, "the export")


def cached_export(module: nn.Module, version_dir: Path, manifest: Manifest, cache_dir: Path) -> tuple[Path, bool]:
    """The path of the module's ONNX export in ``cache_dir``, exported there unless the cache holds it already;
    with whether it was exported now (False: a cache hit). Raises WeightsError when neither exporter manages."""
    files = [find_weights(version_dir, manifest)]
    if manifest.architecture.startswith(PREFIX):  # its code shapes the module as much as its weights
        files += sorted(version_dir.glob("*.py")) + sorted(version_dir.parent.glob("*.py"))
    path = cache_dir / f"{cache_key(files, manifest)}.onnx"
    if path.is_file():
        log.info("%s: ONNX export found in the cache (%s)", manifest.path, path)
        return path, False
    exporter = export(module, manifest, path)
    log.info("%s: exported to ONNX with the %s exporter (%s)", manifest.path, exporter, path)
    return path, True


def export(module: nn.Module, manifest: Manifest, path: Path) -> str:
    """Export ``module`` with a dynamic batch dimension to ``path`` (written to a temporary name, then renamed, so
    a half-written file is never cached): the dynamo exporter, else the TorchScript-based one. Returns which
    exporter worked. Raises WeightsError naming both failures."""
    spec = manifest.input
    example = torch.zeros(EXPORT_BATCH, spec.channels, spec.height, spec.width,
                          device=next(module.parameters(), torch.zeros(0)).device)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    failures: list[str] = []
    for exporter, dynamo in (("dynamo", True), ("TorchScript-based", False)):
        try:
            _export_with(module, example, partial, dynamo)
            partial.replace(path)
            return exporter
        except Exception as exc:  # noqa: BLE001 -- any exporter failure falls through to the next one
            failures.append(f"{exporter}: {type(exc).__name__}: {str(exc)[:300]}")
            partial.unlink(missing_ok=True)
    raise WeightsError(f'{manifest.path}: runtime = "onnxruntime" but the module does not export to ONNX ('
                       + "; ".join(failures) + ")")


def _export_with(module: nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracing advice is not the user's concern
        if dynamo:
            torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), dynamo=True, external_data=False,
                              verbose=False)  # no progress lines on stdout
        else:
            torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def verify(version: LoadedVersion, inputs: GateInputs) -> float:
    """Compare ``version``'s ONNX Runtime scores with its PyTorch module's on ``inputs`` (:mod:`gate`). Returns the
    largest absolute probability difference; raises WeightsError naming it (the image, the label, both scores) when
    it exceeds :data:`TOLERANCE` or top-1 differs where PyTorch's top two are further apart than that. Blocks
    (forward passes)."""
    reference = dataclasses.replace(version, runtime=None)  # the same module through TorchRuntime
    want, got = _scores(reference, inputs.arrays), _scores(version, inputs.arrays)
    difference = np.abs(want - got)
    row, label = np.unravel_index(int(difference.argmax()), difference.shape)
    worst = float(difference[row, label])
    ordered = np.sort(want, axis=1)
    clear = (ordered[:, -1] - ordered[:, -2]) > TOLERANCE if want.shape[1] > 1 else np.ones(len(want), bool)
    flipped = int(np.sum(clear & (want.argmax(1) != got.argmax(1))))
    if worst > TOLERANCE or flipped:
        raise WeightsError(
            f"{version.manifest.path}: ONNX Runtime's scores differ from PyTorch's: largest probability difference "
            f"{worst:.3g} (tolerance {TOLERANCE:g}) on {inputs.names[row]}, label "
            f"{version.labels[label]!r} (PyTorch {want[row, label]:.4f}, ONNX Runtime {got[row, label]:.4f}); "
            f"top-1 differs on {flipped} of {len(want)} {inputs.kind}; serve it with runtime = \"torch\"")
    return worst


def _scores(version: LoadedVersion, arrays: list[np.ndarray]) -> np.ndarray:
    """Scores of ``arrays`` in batches of at most the version's cap."""
    size = max(1, version.max_batch_size)
    return np.concatenate([version.predict(arrays[i:i + size]) for i in range(0, len(arrays), size)])
