"""Build an ``nn.Module`` from a manifest's ``architecture`` string.

Supported forms:

* ``torchvision:<name>``: any classifier constructor in ``torchvision.models``;
* ``timm:<name>``: any model ``timm.create_model`` knows (random init, never
  downloaded);
* ``classifyd:<name>``: small architectures shipped with classifyd (the
  default digits model uses ``classifyd:small_cnn``);
* ``torchscript`` and ``torch_export``: the weights file carries its own
  architecture (loaded by :mod:`server.models.loader.weights`, not here);
* ``python:<file>:<name>``: a class from a file of the model directory
  (loaded by :mod:`server.models.loader.custom_code`, only with ``--trust-code``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ArchitectureError(ValueError):
    """The architecture string names nothing that can be built."""


class SmallCNN(nn.Module):
    """A three-block CNN for small images (digits, icons, defect crops)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            block(width, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


BUILTIN: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN}


def build_architecture(architecture: str, num_classes: int, in_channels: int, args: dict[str, Any]) -> nn.Module:
    """Construct the randomly initialised module named by ``architecture``.

    ``args`` are extra constructor keyword arguments from the manifest.
    Raises :class:`ArchitectureError` for an unknown family or name.
    """
    family, _, name = architecture.partition(":")
    if family == "torchvision":
        return _torchvision(name, num_classes, in_channels, args)
    if family == "timm":
        return _timm(name, num_classes, in_channels, args)
    if family == "classifyd":
        if name not in BUILTIN:
            raise ArchitectureError(f"unknown classifyd architecture {name!r}; known: {sorted(BUILTIN)}")
        return BUILTIN[name](num_classes=num_classes, in_channels=in_channels, **args)
    raise ArchitectureError(
        f"unknown architecture {architecture!r}: expected 'torchvision:<name>', 'timm:<name>', "
        "'classifyd:<name>', 'python:<file>:<name>', 'torchscript' or 'torch_export'"
    )


def _torchvision(name: str, num_classes: int, in_channels: int, args: dict[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ArchitectureError(f"torchvision has no classification model {name!r}")
    if in_channels != 3:
        raise ArchitectureError(f"torchvision:{name} takes 3 input channels, the manifest gives {in_channels}")
    return tvm.get_model(name, weights=None, num_classes=num_classes, **args)


def _timm(name: str, num_classes: int, in_channels: int, args: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ArchitectureError(f"timm has no model {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **args)


def preprocessing_defaults(architecture: str, module: nn.Module, args: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing the architecture was trained with, where it says so (timm models); else None.

    Keys: ``size`` ``(height, width)``, ``resize``, ``interpolation``, ``mean``, ``std`` (three channels).
    The input size follows ``model_args.img_size`` when set, since timm's pretrained config does not.
    """
    if not architecture.startswith("timm:"):
        return None
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=module)
    height, width = config["input_size"][-2:]
    if "img_size" in args:
        size = args["img_size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    crop_pct = float(config.get("crop_pct") or 1.0)
    return {
        "size": (int(height), int(width)),
        "resize": math.floor(min(height, width) / crop_pct),  # as timm's eval transform scales the short side
        "interpolation": config.get("interpolation"),
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
    }
