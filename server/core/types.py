"""The domain's records: what a request is, what it gets back, what became of it.

Free of protobuf, HTTP and torch: every edge translates its own wire format to
and from these, and the layers below the edges speak only these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.core.errors import Status

Box = tuple[int, int, int, int]
"""A region of the source image: ``(x, y, width, height)`` in pixels."""


UINT8 = "uint8"
FLOAT32 = "float32"
TENSOR_DTYPES: dict[str, np.dtype] = {UINT8: np.dtype("<u1"), FLOAT32: np.dtype("<f4")}
"""The dtypes a :class:`RawTensor` may carry: its ``dtype`` name -> the little-endian layout of its ``data``.
Every edge maps its wire names (``pb.Tensor.UINT8``, OIP ``"FP32"``) to these names; preprocessing reads them."""


@dataclass(frozen=True)
class RawTensor:
    """A raw tensor from a request, not yet validated."""

    dtype: str
    """A name in :data:`TENSOR_DTYPES` when the edge knew it; anything else is refused by preprocessing."""
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Prediction:
    """One label of an answer: its output index, its text and its score."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyCall:
    """One classification request, already free of protobuf."""

    model: str
    payload: bytes | RawTensor
    version: int = 0
    top_k: int = 0
    deadline: float | None = None  # time.monotonic() seconds
    lang: str = ""  # labels.<lang>.txt to answer with; "" = labels.txt
    return_tiles: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class TileResult:
    """One tile of a tiled request: its region of the image and its own predictions."""

    box: Box
    predictions: list[Prediction]
    batch_size: int


@dataclass(frozen=True)
class ClassifyResult:
    """Predictions with the facts of how they were computed."""

    predictions: list[Prediction]
    model: str
    version: int
    batch_size: int
    queue_s: float
    compute_s: float
    preprocess_s: float
    lang: str = ""
    tile_count: int = 0
    tiles: list[TileResult] = field(default_factory=list)
    cache_hit: bool = False
    """Answered from the response cache (server/ops/response_cache.py): nothing was queued or computed."""
    cold_start: bool = False
    """Its model was loaded for it (``--lazy-load``, server/models/memory_budget.py): it waited for the load."""


@dataclass(frozen=True)
class RequestReport:
    """What became of one classification request, on any edge: for the request log and metrics."""

    request_id: str
    model: str
    """As requested ('' = the default model)."""
    version: int
    """As requested (0 = the serving version)."""
    code: Status
    message: str
    seconds: float
    """From the edge receiving the request to its answer."""
    result: ClassifyResult | None = None


RequestObserver = Callable[[RequestReport], None]


@dataclass(frozen=True)
class BatchReport:
    """One forward pass of one model version over its share of a batch: what listeners (metrics) get."""

    model: str
    version: int
    size: int
    seconds: float
    error: str = ""
    """Empty when the batch succeeded; otherwise the exception's type name."""
    oom_splits: int = 0
    """How many times the batch (or a part of it) was halved after running out of memory."""
