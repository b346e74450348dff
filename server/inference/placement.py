"""Which device a model version runs on: the rule, in one place.

A manifest's ``device`` (:mod:`server.core.device_names`) overrides the daemon's ``--device`` for its model:

* ``cpu``: the CPU.
* ``cuda``: torch's current CUDA device; ``cuda:N``: GPU ``N``. Either fails when torch sees no such GPU.
* ``auto``: the GPU with the most free memory (``torch.cuda.mem_get_info``, read when the version loads, so
  versions loaded one after another spread over the GPUs as each one fills its own), the CPU when there is no GPU.
  Versions placed but not yet built (several models load at once at start-up) count as using their files' size on
  their GPU until :func:`settle`: they do not all land on the GPU that was freest before any of them allocated.

The daemon's ``--device`` follows the same rule once, at start-up; a version whose manifest sets no ``device``
runs where the daemon's resolved. Everything here asks the CUDA driver: it blocks for milliseconds (the
first call initialises CUDA, up to seconds); call it off the event loop where that matters.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.core.device_names import DEVICE_UNSET, device_problem


@dataclass(frozen=True)
class Placement:
    """Where a version runs, and why there (logged at load)."""

    device: torch.device
    why: str
    reserved: int = 0
    """``auto``: the bytes counted as used on its GPU until :func:`settle` (its files' size)."""
    settled: list[bool] = field(default_factory=list, compare=False)


_reserved: Counter[int] = Counter()
"""Per GPU index: the bytes of versions placed by ``auto`` and not yet built."""
_reserving = threading.Lock()  # placements run on the loader thread, settles on the event loop


def place(requested: str, reserve: int = 0) -> Placement:
    """The device ``requested`` names, by the rule in the module docstring; ``auto`` counts ``reserve`` bytes as used
    on the GPU it picks until :func:`settle`. Raises ValueError saying why when the name is not a device name or
    names a device torch does not see."""
    problem = device_problem(requested)
    if problem:
        raise ValueError(f"device {problem}")
    if requested == "auto":
        return _most_free(reserve)
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


def place_version(requested: str, default: torch.device, version_dir: Path | None = None) -> Placement:
    """Where a version whose manifest says ``requested`` runs: ``default`` (the daemon's device) when it sets no
    ``device``, else :func:`place`; ``auto`` reserves the size of the files in ``version_dir`` on its GPU: call
    :func:`settle` once the version is built (or failed). Raises ValueError as :func:`place` does. Blocks on CUDA
    and the filesystem."""
    if requested == DEVICE_UNSET:
        return Placement(default, "the daemon's --device")
    return place(requested, files_bytes(version_dir) if requested == "auto" and version_dir else 0)


def settle(placed: Placement | None) -> None:
    """The version ``placed`` is built (its weights are in the GPU's free memory figure now) or failed: its
    reservation ends. Safe to call more than once, and with None."""
    if placed is None or not placed.reserved or placed.settled:
        return
    placed.settled.append(True)
    with _reserving:
        _reserved[placed.device.index or 0] -= placed.reserved
        if _reserved[placed.device.index or 0] <= 0:
            del _reserved[placed.device.index or 0]


def pick_device(requested: str) -> torch.device:
    """The daemon's ``--device`` resolved by :func:`place`. Raises ValueError for a device that is not there."""
    return place(requested).device


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device, so that its CUDA calls that name no device (the
    cache ``empty_cache`` returns after an out-of-memory split or a release) go to it; nothing for the CPU. Call it on
    the device's inference thread (:mod:`server.inference.devices`)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _most_free(reserve: int) -> Placement:
    """``auto``: the GPU with the most free memory less what is reserved on it (the lowest index on a tie), else the
    CPU; ``reserve`` bytes are reserved on the GPU chosen."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return Placement(torch.device("cpu"), "auto: torch sees no CUDA device")
    with _reserving:  # choose and reserve at once: two placements never both see the same GPU as freest
        free = [torch.cuda.mem_get_info(index)[0] - _reserved[index] for index in range(count)]
        best = max(range(count), key=lambda index: (free[index], -index))
        if reserve:
            _reserved[best] += reserve
    device = torch.device("cuda", best)
    if count == 1:
        return Placement(device, f"auto: the only GPU ({_gib(free[best])} free)", reserve)
    return Placement(device, f"auto: most free memory of {count} GPUs ("
                     + ", ".join(f"cuda:{i} {_gib(f)}" for i, f in enumerate(free)) + " free)", reserve)


def files_bytes(version_dir: Path) -> int:
    """The bytes of the files directly in ``version_dir`` (0 when it cannot be read): a version's weights, the
    least it will hold once loaded. Blocks on the filesystem."""
    try:
        return sum(entry.stat().st_size for entry in version_dir.iterdir() if entry.is_file())
    except OSError:
        return 0


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"
