"""A test model whose answers a test chooses exactly, for rollouts: two versions that disagree on a known share.

``classifyd:test_shade`` answers the brightness bin of a grey image: with ``n`` labels, an image whose mean pixel
value (0..1) is ``m`` gets label ``min(floor(m * n), n - 1)``. With ``model_args.flip_below = f`` it answers the
next label instead for images with ``m < f``: over :func:`shade_images` (means spread evenly over 0..1), a version
with ``flip_below = f`` disagrees with one without on exactly the share ``f`` of the images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tests.support.kit import encode


class Shade(nn.Module):
    """Answers the brightness bin of its (single-channel, un-normalised) input; see the module docstring."""

    def __init__(self, num_classes: int, in_channels: int = 1, flip_below: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # a weight, so the version has a weights file
        self.num_classes, self.flip_below = num_classes, flip_below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_classes
        mean = x.mean(dim=(1, 2, 3))
        label = torch.clamp((mean * n).floor().long(), 0, n - 1)
        label = torch.where(mean < self.flip_below, (label + 1) % n, label)
        return nn.functional.one_hot(label, n).float() * 10.0 * self.scale


def shade_manifest(**rollout: Any) -> dict[str, Any]:
    """A ``test_shade`` manifest: 8x8 greyscale, no normalisation; ``rollout`` keys go to ``[rollout]``."""
    manifest: dict[str, Any] = {"input": {"color": "L", "size": 8, "crop": "none", "mean": [0.0], "std": [1.0]},
                                "batching": {"max_batch_size": 8, "max_delay_ms": 2}}
    if rollout:
        manifest["rollout"] = rollout
    return manifest


def shade_images(count: int = 100) -> list[bytes]:
    """``count`` grey 8x8 PNGs whose mean pixel values are spread evenly over 0..1: image ``i`` has mean
    ``(i + 0.5) / count`` (to within a pixel level)."""
    images = []
    for i in range(count):
        level = round((i + 0.5) / count * 255)
        images.append(encode(np.full((8, 8), level, dtype=np.uint8)))
    return images


def shade_labels(n: int = 10) -> list[str]:
    return [f"shade{i}" for i in range(n)]
