"""A classification result as plain fields, the one serialisation that every edge renders.

gRPC builds ``ClassifyResponse`` / ``Prediction`` / ``TileResult`` messages from these fields and HTTP ``/v1``
writes them as JSON, so both answer with the same names, units (microseconds) and rounding.
"""

from __future__ import annotations

from typing import Any

from server.core.types import ClassifyResult, Prediction, TileResult


def prediction_fields(prediction: Prediction) -> dict[str, Any]:
    """``index``, ``label``, ``score``."""
    return {"index": prediction.index, "label": prediction.label, "score": prediction.score}


def tile_fields(tile: TileResult) -> dict[str, Any]:
    """A tile's region (``x``, ``y``, ``width``, ``height``) and ``batch_size``; its predictions are rendered apart."""
    x, y, width, height = tile.box
    return {"x": x, "y": y, "width": width, "height": height, "batch_size": tile.batch_size}


def result_fields(result: ClassifyResult) -> dict[str, Any]:
    """The scalar fields of an answer: model, version, label language, tiles counted, batch size, timings and
    whether it came from the response cache or waited for its model to load (a cold start)."""
    return {
        "model": result.model,
        "version": result.version,
        "lang": result.lang,
        "tile_count": result.tile_count,
        "batch_size": result.batch_size,
        "queue_us": micros(result.queue_s),
        "compute_us": micros(result.compute_s),
        "preprocess_us": micros(result.preprocess_s),
        "cache_hit": result.cache_hit,
        "cold_start": result.cold_start,
    }


def micros(seconds: float) -> int:
    """Seconds as whole microseconds, the unit every edge reports timings in."""
    return round(seconds * 1e6)
