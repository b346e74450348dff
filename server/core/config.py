"""The daemon's settings and their defaults, each written once.

Standard library only, so the CLI (and the parent process of ``--workers``)
reads them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BUDGET_S = 3.0
CPU_CEILING = 64
GPU_CEILING = 256


@dataclass(frozen=True)
class AutotuneDefaults:
    """The server's autotune settings, for manifests that leave them out."""

    enabled: bool = True
    budget_s: float = DEFAULT_BUDGET_S
    max_batch_size: int | None = None
    """Largest size of the ladder; None: 256 on a GPU, 64 on a CPU."""
