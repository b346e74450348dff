"""Which device a model version runs on: the rule, in one place.

A manifest's ``device`` (:mod:`server.core.device_names`) overrides the daemon's ``--device`` for its model:

* ``cpu``: the CPU.
* ``cuda``: torch's current CUDA device; ``cuda:N``: GPU ``N``. Either fails when torch sees no such GPU.
* ``auto``: the GPU with the most free memory (``torch.cuda.mem_get_info``, read when the version loads, so
  versions loaded one after another spread over the GPUs as each one fills its own), the CPU when there is no GPU.

The daemon's ``--device`` follows the same rule once, at start-up; a version whose manifest sets no ``device``
runs where the daemon's resolved. Everything here asks the CUDA driver: it blocks for milliseconds (the
first call initialises CUDA, up to seconds); call it off the event loop where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.core.device_names import DEVICE_UNSET, device_problem


@dataclass(frozen=True)
class Placement:
    """Where a version runs, and why there (logged at load)."""

    device: torch.device
    why: str


def place(requested: str) -> Placement:
    """The device ``requested`` names, by the rule in the module docstring. Raises ValueError saying why when the
    name is not a device name or names a device torch does not see."""
    problem = device_problem(requested)
    if problem:
        raise ValueError(f"device {problem}")
    if requested == "auto":
        return _most_free()
    device = torch.device(requested)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {requested!r} is not there: torch sees no CUDA device (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {requested!r} is not there: torch sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return Placement(device, "as named")


def place_version(requested: str, default: torch.device) -> Placement:
    """Where a version whose manifest says ``requested`` runs: ``default`` (the daemon's device) when it sets no
    ``device``, else :func:`place`. Raises ValueError as :func:`place` does."""
    if requested == DEVICE_UNSET:
        return Placement(default, "the daemon's --device")
    return place(requested)


def pick_device(requested: str) -> torch.device:
    """The daemon's ``--device`` resolved by :func:`place`. Raises ValueError for a device that is not there."""
    return place(requested).device


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device, so that its CUDA calls that name no device (the
    cache ``empty_cache`` returns after an out-of-memory split or a release) go to it; nothing for the CPU. Call it on
    the device's inference thread (:mod:`server.inference.devices`)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _most_free() -> Placement:
    """``auto``: the GPU with the most free memory (the lowest index on a tie), else the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return Placement(torch.device("cpu"), "auto: torch sees no CUDA device")
    free = [torch.cuda.mem_get_info(index)[0] for index in range(count)]
    best = max(range(count), key=lambda index: (free[index], -index))
    if count == 1:
        return Placement(torch.device("cuda", best), f"auto: the only GPU ({_gib(free[best])} free)")
    return Placement(torch.device("cuda", best), f"auto: most free memory of {count} GPUs ("
                     + ", ".join(f"cuda:{i} {_gib(f)}" for i, f in enumerate(free)) + " free)")


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"
