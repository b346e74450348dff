"""Which versions tune their batch cap while serving, and what a move of the cap changes.

:func:`tuner_for` gives a version its :class:`~server.batching.online.OnlineTuner` (created once, kept on the
version) when its cap was chosen by the load-time ladder: not when the manifest pins ``max_batch_size``, sets
``autotune = false`` (or the server runs with ``--no-autotune``), sets a latency target (its policy already sizes
batches from the corrected curve, and keeps its guarantee) or compiles the module (its batch-size buckets are
fixed at warm-up). A move updates the version's ``max_batch_size``, which admission, ModelInfo and the status
page read, and is logged. A version on the CPU's torch runtime in a process with more than one torch thread also
has its thread count under load tuned (the tuner's widths: 1 and the process's count, starting from the load-time
choice); its forward passes ask the tuner (:meth:`LoadedVersion.predict`), and under light load keep
``torch_threads``, the load-time choice. Runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import functools
import logging

from server.batching.online import CapChange, OnlineTuner, TunerSettings
from server.inference.runtime import LoadedVersion
from server.inference.threads import process_threads
from server.ops.tuning_metrics import TuningFigures

log = logging.getLogger("classifyd.autotune")


def tunes_online(version: LoadedVersion) -> bool:
    """Whether ``version``'s cap may move while serving (see the module docstring)."""
    curve, manifest = version.batch_curve, version.manifest
    return curve is not None and curve.autotuned and manifest.batching.latency_target_ms is None \
        and manifest.compile == "off"


def tuner_for(version: LoadedVersion) -> OnlineTuner | None:
    """``version``'s online tuner, created on first use from its current cap (and threads); None when it tunes
    neither. A pinned cap gets a tuner of its threads alone."""
    cap_online = tunes_online(version) and version.batch_curve is not None
    widths = thread_widths(version)
    if not cap_online and not widths:
        return None
    if version.tuner is None:
        curve = version.batch_curve
        ceiling = (curve.ceiling or max(point.batch_size for point in curve.points)) if cap_online and curve \
            else version.max_batch_size
        version.tuner = OnlineTuner(version.max_batch_size, ceiling, on_change=functools.partial(_moved, version),
                                    widths=widths, width=(version.torch_threads or max(widths)) if widths else None,
                                    explore_sizes=cap_online, settings=tuner_settings(version))
    return version.tuner


FLAT_RUNTIME = TunerSettings(down_tolerance=-TunerSettings.up_margin)
"""For a runtime other than torch a smaller cap, like a larger one, must be clearly faster to be taken."""


def tuner_settings(version: LoadedVersion) -> TunerSettings:
    """The tuner's settings for ``version``: the defaults on torch; on another runtime (ONNX Runtime) a smaller cap
    must win by the margin a larger one needs. Its forward pass is nearly flat in the batch size under load, so
    compute time per image cannot show what more, smaller batches cost elsewhere (a hand-off and a reply round on
    the event loop per batch, a wake-up of the inference thread): mobilenet_v3_small served at concurrency 32 walked
    8 -> 4 -> 2 on estimates within 1% of each other (502 against 509, 466 against 467 images/s); a pinned cap of
    1 serves 23% less than 8 there (docs/batching.md)."""
    runtime = version.runtime
    return FLAT_RUNTIME if runtime is not None and runtime.name != "torch" else TunerSettings()


def thread_widths(version: LoadedVersion) -> tuple[int, ...]:
    """The torch thread counts the tuner may choose between for ``version``: 1 and the process's count on the
    CPU's torch runtime (its own threads elsewhere: ONNX Runtime's sessions, CUDA), none with one thread, with a
    latency target (its policy sizes the batches, not a tuner) or a compiled module (inductor's kernels keep the
    thread count they were compiled with)."""
    team = process_threads()
    torch_runtime = version.runtime is None or version.runtime.name == "torch"
    plain = version.manifest.batching.latency_target_ms is None and version.manifest.compile == "off"
    return (1, team) if version.device.type == "cpu" and torch_runtime and team > 1 and plain else ()


def _moved(version: LoadedVersion, change: CapChange) -> None:
    version.max_batch_size = change.new
    log.info("model %s version %d: %s", version.name, version.version, change.describe())


def figures(version: LoadedVersion) -> TuningFigures | None:
    """``version``'s tuner in plain numbers for /metrics; None when it does not tune. Safe from another thread."""
    tuner = version.tuner
    if tuner is None:
        return None
    snapshot = tuner.snapshot()
    return TuningFigures(snapshot.cap, snapshot.exploring, snapshot.changes, snapshot.trials,
                         {e.batch_size: e.batch_s for e in snapshot.estimates if e.width == snapshot.width},
                         snapshot.width, snapshot.cap_online)
