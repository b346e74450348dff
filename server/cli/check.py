"""``python -m server check models/<name>``: load one model version offline, exactly as the daemon would.

Runs the loader the daemon's model manager uses (manifest, build, weights,
warm-up, validation samples, autotune) on one version, prints what it resolved, and exits 0 when
the version could serve, 1 with the reason when it could not, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import torch

from server.core.config import DEFAULT_CACHE_DIR, DEFAULT_MAX_BATCH_SIZE, DEFAULT_RUNTIME, BatchingDefaults
from server.core.input_changes import PreprocessingChanged, check_preprocessing
from server.core.manifest import RUNTIMES, Manifest, load_manifest
from server.inference.devices import InferenceThreads
from server.inference.placement import pick_device
from server.models.loader.build import build_for_serving
from server.models.loader.pipeline import Loaded, LoadFailed, LoadSettings, VersionLoader
from server.models.loader.runtime_job import JobRequest, run_job
from server.models.loader.weights import WeightsError, find_weights
from server.models.rollout import read_decision
from server.models.source.repository import fingerprint, version_numbers

_SHOWN_LABELS = 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server check",
                                     description="Load a model directory offline and report every problem.")
    parser.add_argument("model_dir", type=Path, help="the model's directory, e.g. models/digits")
    parser.add_argument("--version", type=int, default=0, help="the version to check (default: the newest)")
    add_load_flags(parser)
    parser.add_argument("--log-level", default="CRITICAL", help="log level of the loading code (default: CRITICAL)")
    return parser.parse_args(argv)


def add_load_flags(parser: argparse.ArgumentParser) -> None:
    """How a version is loaded, as the daemon's flags say (``check`` and ``publish`` share them):
    :func:`load_settings` reads them."""
    parser.add_argument("--trust-code", action="store_true",
                        help="allow a python:<file>:<name> architecture to run its file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"warm-up batch for a manifest that sets no max_batch_size (default: "
                             f"{DEFAULT_MAX_BATCH_SIZE}, as the daemon)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where ONNX exports are kept, as the daemon's flag (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--default-runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                        help=f"the runtime of a manifest that sets none, as the daemon's flag (default: "
                             f"{DEFAULT_RUNTIME})")


def load_settings(args: argparse.Namespace) -> LoadSettings:
    """The settings :func:`add_load_flags` gave. Raises RuntimeError or ValueError for a device that is not there."""
    return LoadSettings(pick_device(args.device), BatchingDefaults(max_batch_size=args.max_batch_size),
                        trust_code=args.trust_code, cache_dir=args.cache_dir, default_runtime=args.default_runtime)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model_dir = args.model_dir.resolve()
    versions = version_numbers(model_dir)
    if not model_dir.is_dir() or not versions:
        what = "is not a directory" if not model_dir.is_dir() else "has no version directories (<N>/)"
        print(f"FAILED: {args.model_dir} {what}", file=sys.stderr)
        return 2
    number = args.version or max(versions)
    if number not in versions:
        print(f"FAILED: {args.model_dir} has no version {number} (versions: {', '.join(map(str, versions))})",
              file=sys.stderr)
        return 2
    try:
        settings = load_settings(args)
    except (RuntimeError, ValueError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 2
    print(f"model         {model_dir.name}, version {number} ({args.model_dir / str(number)})")
    refused = verify(settings, model_dir, number, model_dir / str(number), shown=args.model_dir)
    if refused:
        print(f"FAILED: {refused}", file=sys.stderr)
        return 1
    print(f"OK: {args.model_dir} version {number} can serve")
    return 0


def verify(settings: LoadSettings, model_dir: Path, number: int, version_dir: Path, *, shown: Path) -> str | None:
    """Load ``version_dir`` as version ``number`` of ``model_dir`` exactly as the daemon would, print what it
    resolved, and return why it could not serve (None: it can). ``version_dir`` may lie outside the numbered
    directories, as ``python -m server publish`` stages one. ``shown``: the model directory as the user named it.
    Blocks: builds, warms up and validates on ``settings.device``."""
    outcome = asyncio.run(_load(settings, model_dir.name, number, version_dir))
    manifest = outcome.version.manifest if isinstance(outcome, Loaded) else outcome.manifest
    if manifest is not None:
        _describe(manifest, version_dir)
    if isinstance(outcome, LoadFailed):
        return _reason(outcome, shown)
    _describe_loaded(outcome)
    _describe_runtime(settings, version_dir, outcome.version.manifest)
    return _compare_preprocessing(settings, model_dir, number, outcome.version.manifest)


def _reason(failed: LoadFailed, shown: Path) -> str:
    """Why the version cannot serve; code refused for want of --trust-code is worded for this command."""
    cause = failed.__cause__
    if isinstance(cause, WeightsError) and cause.untrusted is not None:
        return cause.untrusted.advise(f"run `python -m server check --trust-code {shown}` to allow it")
    return str(failed)


async def _load(settings: LoadSettings, name: str, number: int, version_dir: Path) -> Loaded | LoadFailed:
    """The loaded version (released by now: only its facts are left to report), or why it cannot serve."""
    inference = InferenceThreads()
    loader = VersionLoader(settings, inference)
    try:
        loaded = await loader.load(name, number, version_dir)
    except LoadFailed as exc:
        return exc
    finally:
        loader.close()
        inference.shutdown()
    loaded.version.release()
    return loaded


def _compare_preprocessing(settings: LoadSettings, model_dir: Path, number: int, manifest: Manifest) -> str | None:
    """Print how version ``number``'s preprocessing compares with the version the daemon would be serving before
    it (the next-newest that builds); return the daemon's refusal when it would refuse the swap, else None.
    Blocks: builds older versions on the CPU until one builds."""
    previous = _previous(settings, model_dir, number)
    if previous is None:
        print("preprocessing no older version builds: nothing to compare with")
        return None
    older, old_manifest = previous
    try:
        changes = check_preprocessing(older, old_manifest, manifest)
    except PreprocessingChanged as exc:
        return str(exc)
    if changes:
        print(f"preprocessing changed from version {older}, acknowledged by preprocessing_changed = true: "
              f"{', '.join(changes)}")
    else:
        print(f"preprocessing same as version {older}, the version serving before it")
    return None


def _previous(settings: LoadSettings, model_dir: Path, number: int) -> tuple[int, Manifest] | None:
    """The newest version older than ``number`` that builds and was not rejected by a rollout (it would not be
    serving), with its resolved manifest; None if none does."""
    for older in sorted((v for v in version_numbers(model_dir) if v < number), reverse=True):
        version_dir = model_dir / str(older)
        recorded = read_decision(version_dir, fingerprint(version_dir))
        if recorded is not None and not recorded.promoted and not recorded.pending:
            continue
        try:
            module, manifest = build_for_serving(version_dir, load_manifest(version_dir), torch.device("cpu"),
                                                 settings.trust_code)
        except Exception:  # noqa: BLE001 - a version that does not build would not be serving: try the next
            continue
        del module
        return older, manifest
    return None


def _describe(manifest: Manifest, version_dir: Path) -> None:
    spec = manifest.input
    print(f"architecture  {manifest.architecture}")
    try:
        print(f"weights       {find_weights(version_dir, manifest)}")
    except WeightsError as exc:
        print(f"weights       ? ({exc})")
    print(f"input         {spec.color} ({spec.channels} channel(s)), {spec.height}x{spec.width}, crop {spec.crop}, "
          f"resize {spec.resize}, interpolation {spec.interpolation}"
          + (", fill_alpha" if spec.fill_alpha else ""))
    print(f"normalize     mean {list(spec.mean)}, std {list(spec.std)}")
    if spec.resolved_from:
        print(f"              ({spec.resolved_from})")
    print(f"output        {_output(manifest)}")
    print(f"precision     {manifest.precision} requested, channels_last {str(manifest.channels_last).lower()}")
    if manifest.compile != "off":
        sizes = ", ".join(map(str, manifest.compile_batch_sizes)) or "powers of two up to max_batch_size, and it"
        print(f"compile       torch.compile mode {manifest.compile}, batch sizes {sizes}")
    if manifest.tiling:
        t = manifest.tiling
        print(f"tiling        tiles {t.tile[1]}x{t.tile[0]} every {t.stride[1]}x{t.stride[0]} px, reduce {t.reduce}, "
              f"at most {t.max_tiles} tiles")
    print(f"labels        {_labels(manifest.labels)}")
    for lang, labels in manifest.translations.items():
        print(f"labels.{lang:<6} {_labels(labels)}")


def _output(manifest: Manifest) -> str:
    if manifest.activation == "softmax":
        return f"softmax over {manifest.num_classes} labels, top_k {manifest.top_k}"
    distinct = sorted(set(manifest.thresholds))
    if len(distinct) == 1:
        thresholds = f"threshold {distinct[0]}"
    else:
        thresholds = "thresholds " + ", ".join(f"{label} {value}" for label, value in
                                              zip(manifest.labels, manifest.thresholds, strict=True))
    return f"sigmoid (multi-label) over {manifest.num_classes} labels, {thresholds}, at most {manifest.top_k}"


def _labels(labels: tuple[str, ...]) -> str:
    shown = ", ".join(labels[:_SHOWN_LABELS])
    more = f", … ({len(labels) - _SHOWN_LABELS} more)" if len(labels) > _SHOWN_LABELS else ""
    return f"{len(labels)}: {shown}{more}"


def _describe_loaded(outcome: Loaded) -> None:
    loaded = outcome.version
    spec = loaded.manifest.input
    note = f" ({loaded.precision_note})" if loaded.precision_note else ""
    print(f"device        {loaded.device}, precision {loaded.precision}{note}")
    print(f"warm-up       ok: a batch of {loaded.max_batch_size} blank {spec.height}x{spec.width}x{spec.channels} "
          f"inputs gave one row of {loaded.manifest.num_classes} scores each")
    if outcome.validation_accuracy is None:
        print("validation    no samples/ directory in the version")
    else:
        print(f"validation    accuracy {outcome.validation_accuracy:.3f} (min_accuracy "
              f"{loaded.manifest.min_accuracy:.3f})")


def _describe_runtime(settings: LoadSettings, version_dir: Path, manifest: Manifest) -> None:
    """The runtime the daemon would serve the version on; for ``auto`` the daemon's background job run here, in
    process (export into ``--cache-dir``, gate, measurement: seconds to minutes), with the speeds it measured."""
    if manifest.runtime != "auto":
        how = " (exported, cached and verified against PyTorch at load)" if manifest.runtime == "onnxruntime" and \
            manifest.architecture != "onnx" else ""
        print(f"runtime       {manifest.runtime}{how}")
        return
    print("runtime       auto: measuring eager PyTorch against ONNX Runtime (the daemon does this in the background)")
    result = run_job(JobRequest(version_dir, settings.cache_dir, settings.trust_code, torch.get_num_threads()))
    print(f"runtime       {result.runtime} chosen: {result.reason}")
    for name in ("torch", "onnxruntime"):
        points = [s for s in result.speeds if s.runtime == name]
        if points:
            print(f"  {name:<11} " + ", ".join(f"{s.images_per_second:.0f} images/s at batch {s.batch_size}"
                                             for s in points))
