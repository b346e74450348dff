"""Test architectures for production behaviour: a slow model, ones that fail on demand, one that cannot be built.

``classifyd:test_slow``, ``classifyd:test_fussy``, ``classifyd:test_raising`` and ``classifyd:test_broken_init``
once tests/support/architectures.py registers them. The first two record the size of every batch they computed
in ``COMPUTED[tag]`` (``tag`` comes from the manifest's ``model_args``), so tests can count exactly which
requests reached a forward pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import defaultdict
from typing import ClassVar

import torch
from torch import nn

COMPUTED: defaultdict[str, list[int]] = defaultdict(list)
_LOCK = threading.Lock()


def computed_items(tag: str) -> int:
    """Requests the models tagged ``tag`` computed (warm-up batches included)."""
    with _LOCK:
        return sum(COMPUTED[tag])


def _record(tag: str, size: int) -> None:
    with _LOCK:
        COMPUTED[tag].append(size)


class SlowModel(nn.Module):
    """A tiny classifier whose every forward pass takes ``delay_s`` seconds."""

    def __init__(self, num_classes: int, in_channels: int = 1, delay_s: float = 0.05, tag: str = "slow") -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.delay_s = delay_s
        self.tag = tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        _record(self.tag, x.shape[0])
        return self.linear(x.mean(dim=(2, 3)))


class FussyModel(nn.Module):
    """Raises for a *marked* input, and runs out of memory for batches larger than ``oom_above``.

    An input is marked when its top-left pixel is much brighter than the pixel to its right (a uint8 image with
    255 there and 0 next to it). The first forward pass is the loader's warm-up and is never refused. On CUDA,
    with ``real_oom_bytes``, a batch that is too large really allocates that much device memory.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, oom_above: int = 2, tag: str = "fussy",
                 real_oom_bytes: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.oom_above = oom_above
        self.tag = tag
        self.real_oom_bytes = real_oom_bytes
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            if _marked(x):
                raise ValueError("marked input: this test model refuses it")
            if x.shape[0] > self.oom_above:
                if x.is_cuda and self.real_oom_bytes:
                    torch.empty(self.real_oom_bytes, dtype=torch.uint8, device=x.device)
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test model: batch of {x.shape[0]} > "
                                                  f"{self.oom_above})")
        _record(self.tag, x.shape[0])
        return self.linear(x.mean(dim=(2, 3)))


def _marked(x: torch.Tensor) -> bool:
    """Whether a batch holds a marked input (see :class:`FussyModel`)."""
    return bool((x[:, 0, 0, 0] > x[:, 0, 0, 1] + 0.5).any())


def raised(name: str, message: str) -> BaseException:
    """The exception a test model raises, by name: the ordinary ones, and the ones asyncio cannot carry."""
    kinds: dict[str, type[BaseException]] = {
        "AssertionError": AssertionError, "IndexError": IndexError, "StopIteration": StopIteration,
        "CancelledError": asyncio.CancelledError, "BaseException": BaseException}
    return kinds[name](message)


class RaisingModel(nn.Module):
    """Raises ``raises`` (a name :func:`raised` knows) for a batch with a marked input; computes others. The
    loader's warm-up batch is blank, so the model loads."""

    def __init__(self, num_classes: int, in_channels: int = 1, raises: str = "StopIteration") -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.raises = raises

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _marked(x):
            raise raised(self.raises, "raised by model code (test model)")
        return self.linear(x.mean(dim=(2, 3)))


class BrokenInit(nn.Module):
    """A constructor that raises ``raises`` (a name :func:`raised` knows) after building a layer, as
    torchvision's ``vit_b_16`` asserts for an ``image_size`` its patches do not divide. ``built`` keeps a weak
    reference to every half-built instance, so tests can check that a failed load frees it."""

    built: ClassVar[list[weakref.ref[nn.Module]]] = []

    def __init__(self, num_classes: int, in_channels: int = 1, raises: str = "AssertionError") -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        BrokenInit.built.append(weakref.ref(self))
        message = "input shape indivisible by patch size (test model)" if raises == "AssertionError" else \
            "raised by a constructor (test model)"
        raise raised(raises, message)


class CyclicModel(nn.Module):
    """A model that refers to itself through a list (as a hook or a cache in user code can): only the garbage
    collector frees it, never reference counting. ``built`` keeps a weak reference to every instance."""

    built: ClassVar[list[weakref.ref[nn.Module]]] = []

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)
        self.itself = [self]
        CyclicModel.built.append(weakref.ref(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))
