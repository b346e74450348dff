"""``--workers N``: one status page for the whole daemon, whichever worker the page's request reaches.

The kernel gives each HTTP connection to one worker, so every worker writes its own ``/status.json`` document to
a file in the supervisor's shared directory once a second (:class:`StatusShare`), and the worker that answers
merges its siblings' latest documents into its own (:func:`merge_status`): request counts, rates, queue depths,
batch-size histograms and cache figures add up; latency percentiles are the slowest worker's (percentiles of
separate samples cannot be combined exactly); versions, states and events are the answering worker's (every
worker loads the same directory). A document older than :data:`STALE_S` (a worker that died or hangs) is left
out, and ``workers`` lists the ones included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("classifyd.http")
SHARE_INTERVAL_S = 1.0
STALE_S = 5.0
SUFFIX = ".status.json"
Document = dict[str, Any]


class StatusShare:
    """This worker's document in ``path`` (``worker-N.status.json``); the siblings' beside it."""

    def __init__(self, path: Path, document: Callable[[], Document], clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._document = document
        self._clock = clock

    async def background(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: writes the document every :data:`SHARE_INTERVAL_S` while the app runs."""
        task = asyncio.create_task(self._publish_forever(), name="classifyd-status-share")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.path.unlink, True)  # missing_ok: a stopped worker is not a stale one

    async def _publish_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._write, self._document())
            except Exception:  # a full disk or an odd value must not end the sharing for good
                log.exception("could not share this worker's status (tried again in %.0f s)", SHARE_INTERVAL_S)
            await asyncio.sleep(SHARE_INTERVAL_S)

    def _write(self, document: Document) -> None:
        """Atomically, so a sibling never reads half a document. Blocks (file I/O)."""
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps({**document, "pid": os.getpid()}), encoding="utf-8")
        partial.replace(self.path)

    def siblings(self) -> list[Document]:
        """The other workers' documents written in the last :data:`STALE_S` seconds. Blocks (file I/O)."""
        found = []
        for path in sorted(self.path.parent.glob(f"worker-*{SUFFIX}")):
            if path == self.path:
                continue
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # replaced or removed while read: it is back next second
                continue
            if self._clock() * 1000 - document.get("time_unix_ms", 0) <= STALE_S * 1000:
                found.append(document)
        return found

    async def merged(self, own: Document) -> Document:
        """``own`` with the siblings' figures added."""
        return merge_status({**own, "pid": os.getpid()}, await asyncio.to_thread(self.siblings))


def merge_status(own: Document, siblings: list[Document]) -> Document:
    """The daemon's document from the answering worker's and its siblings' (rules in the module docstring)."""
    merged = {**own, "models": [dict(model) for model in own.get("models", [])], "cache": dict(own.get("cache", {}))}
    by_name = {model["name"]: model for model in merged["models"]}
    for sibling in siblings:
        for model in sibling.get("models", []):
            mine = by_name.get(model["name"])
            if mine is None:
                merged["models"].append(model)
                by_name[model["name"]] = model
            else:
                _add_model(mine, model)
        _add_numbers(merged["cache"], sibling.get("cache", {}))
    merged["workers"] = [_worker_summary(d) for d in (own, *siblings)]
    return merged


def _add_model(mine: Document, other: Document) -> None:
    mine["queue_depth"] = (mine.get("queue_depth") or 0) + (other.get("queue_depth") or 0)
    stats, theirs = mine.get("stats"), other.get("stats")
    if not stats or not theirs:
        return
    stats = mine["stats"] = {**stats, "batch_sizes": dict(stats.get("batch_sizes", {}))}
    for key in ("requests", "requests_per_s", "latency_samples"):
        stats[key] = round(stats.get(key, 0) + theirs.get(key, 0), 2)
    for bucket, count in theirs.get("batch_sizes", {}).items():
        stats["batch_sizes"][bucket] = stats["batch_sizes"].get(bucket, 0) + count
    latency = dict(stats.get("latency_ms") or {})
    for key, value in (theirs.get("latency_ms") or {}).items():
        if value is not None:
            latency[key] = value if latency.get(key) is None else max(latency[key], value)
    stats["latency_ms"] = latency


def _add_numbers(mine: Document, other: Document) -> None:
    for key, value in other.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            mine[key] = mine.get(key, 0) + value


def _worker_summary(document: Document) -> Document:
    models = document.get("models", [])
    return {"pid": document.get("pid"), "time_unix_ms": document.get("time_unix_ms"),
            "requests": sum((m.get("stats") or {}).get("requests", 0) for m in models),
            "requests_per_s": round(sum((m.get("stats") or {}).get("requests_per_s", 0) for m in models), 2)}
