"""Test models whose outputs reveal exactly what reached them (tests/support/architectures.py registers them).

``classifyd:test_probe`` outputs, per image: the mean of every input channel,
then the mean of channel 0 over the top half and over the left half. With
``activation = "sigmoid"``, ``mean = 0``, ``std = 1`` and ``threshold = 0``
every output is listed and :func:`decode` turns the scores back into those
pixel means (0..1), so tests can check conversions, resizing and rotation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Probe(nn.Module):
    """Outputs ``[mean of each channel..., top-half mean of channel 0, left-half mean of channel 0]``."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes != in_channels + 2:
            raise ValueError(f"a probe over {in_channels} channels has {in_channels + 2} outputs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2], x.shape[3]
        top = x[:, 0, : height // 2, :].mean(dim=(1, 2))
        left = x[:, 0, :, : width // 2].mean(dim=(1, 2))
        return torch.cat([x.mean(dim=(2, 3)), top[:, None], left[:, None]], dim=1)


COLORS = {"L": 1, "RGB": 3, "RGBA": 4}


def probe_labels(color: str) -> list[str]:
    return [*(f"channel{i}" for i in range(COLORS[color])), "top", "left"]


def probe_manifest(color: str, size: int = 32, **extra: Any) -> dict[str, Any]:
    """A probe that sees the whole image stretched to ``size`` and reports raw 0..1 pixel means."""
    channels = COLORS[color]
    manifest: dict[str, Any] = {"activation": "sigmoid", "threshold": 0.0,
                                "input": {"color": color, "size": size, "crop": "none", "mean": [0.0] * channels,
                                          "std": [1.0] * channels, **extra.pop("input", {})}}
    return {**manifest, **extra}


def decode(predictions: Any) -> dict[str, float]:
    """Pixel means (0..1) by output label, from a probe's sigmoid scores."""
    return {p.label: _logit(p.score) for p in predictions}


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))

