"""A model version's life: its states and the events that report each change.

No torch, no grpc: the manager moves versions through these states, and every
edge, the metrics and the status page render them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class VersionState(enum.Enum):
    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADING = 4


class EventKind(enum.Enum):
    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADED = 4


@dataclass(frozen=True)
class ModelEvent:
    """Something that happened to a model version."""

    model: str
    version: int
    kind: EventKind
    reason: str = ""
    serving: bool = False
    time: float = field(default_factory=time.time)
