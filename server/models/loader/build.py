"""From a parsed manifest to a module ready to serve: build, resolve preprocessing, place on the device
(wrapped for ``torch.compile`` at bucketed batch sizes when the manifest asks).

A step of the loader pipeline (:mod:`server.models.loader.pipeline`), which the
model manager (the daemon) and ``python -m server check`` share, so both load a
version the same way. Everything here blocks (file reads, weight
loading): run it on the loader thread. Raises
:class:`server.models.loader.weights.WeightsError` with a message naming what is wrong.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.core.manifest import INTERPOLATIONS, Manifest, default_resize
from server.inference.compiled import BucketedModule
from server.models.loader.architectures import preprocessing_defaults
from server.models.loader.weights import build_model


def build_for_serving(version_dir: Path, manifest: Manifest, device: torch.device,
                      trust_code: bool = False) -> tuple[nn.Module, Manifest]:
    """Build the version's module on ``device`` and return it with the manifest its input spec resolved."""
    module = build_model(version_dir, manifest, trust_code=trust_code)
    manifest = resolve_input(manifest, module)
    module = module.to(device)
    if manifest.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if manifest.compile != "off":
        # compiled lazily, bucket by bucket, by LoadedVersion.warm_up on the inference thread (its thread count)
        module = BucketedModule(module, manifest.compile, manifest.compile_batch_sizes)
    return module, manifest


def resolve_input(manifest: Manifest, module: nn.Module) -> Manifest:
    """Fill the ``[input]`` keys the manifest leaves out from the architecture's own config (timm models)."""
    defaults = preprocessing_defaults(manifest.architecture, module, dict(manifest.model_args))
    if defaults is None:
        return manifest
    spec = manifest.input
    changes: dict[str, Any] = {}
    if "size" not in spec.explicit:
        changes["height"], changes["width"] = defaults["size"]
    if "resize" not in spec.explicit:
        height, width = changes.get("height", spec.height), changes.get("width", spec.width)
        changes["resize"] = defaults["resize"] if "size" not in spec.explicit else default_resize(height, width)
    if "interpolation" not in spec.explicit and defaults["interpolation"] in INTERPOLATIONS:
        changes["interpolation"] = defaults["interpolation"]
    for key in ("mean", "std"):
        if key not in spec.explicit:
            changes[key] = _fit_channels(defaults[key], spec.channels)
    taken = sorted(k for k in ("size", "resize", "interpolation", "mean", "std") if k not in spec.explicit)
    if not taken:
        return manifest
    source = f"{', '.join(taken)} from timm's pretrained config for {manifest.architecture.partition(':')[2]}"
    resolved = dataclasses.replace(spec, **changes, resolved_from=source)
    return dataclasses.replace(manifest, input=resolved)


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """timm's config has three values: average them for one channel, add 0.5 for a fourth."""
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return (*values[:3], 0.5)[:channels]
