"""The status page at ``/`` (static files, no build step) and the JSON it polls, plus ``GET /v1/models``.

``GET /status.json`` describes every model (versions, states, errors, queue depth), its request statistics
(throughput, latency percentiles, batch-size histogram; :mod:`server.ops.stats`), the last model events and the
response cache's figures (:mod:`server.ops.response_cache`): per model with ``[cache]`` enabled its hits, misses and
hit rate; for the daemon its bytes, budget, entries and evictions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from server.batching.online import TuningSnapshot
from server.edges.common.describe import RolloutDescription, ServingDescription, describe_model
from server.edges.http.classify import CONTEXT, HttpContext, dumps
from server.models.manager import ModelRecord
from server.ops.response_cache import CacheStats, ModelCounts

STATIC_DIR = Path(__file__).resolve().parent / "static"
EVENTS_SHOWN = 50


def model_json(record: ModelRecord, context: HttpContext) -> dict[str, Any]:
    """One model as the page and ``/v1/models`` show it (the one description:
    :mod:`server.edges.common.describe`), with its queue depth and whether it is the default model."""
    model = describe_model(record)
    serving = model.serving
    versions = [{"version": v.version, "state": v.state.name, "error": v.error, "generation": v.generation,
                 "validation_accuracy": v.validation_accuracy} for v in model.versions]
    description: dict[str, Any] = {
        "name": model.name,
        "default": model.name == context.manager.default_model,
        "serving_version": model.serving_version,
        "versions": versions,
        "queue_depth": context.service.queue_depth(model.name),
        "device": serving.device if serving else None,  # where the serving version runs (docs/operations.md)
        "max_batch_size": serving.max_batch_size if serving else None,
        "loaded_bytes": serving.loaded_bytes if serving else 0,  # memory after warm-up (docs/operations.md)
        "max_delay_ms": serving.max_delay_ms if serving else None,
        "batch_tuning": tuning_json(serving.batch_tuning) if serving and serving.batch_tuning else None,
        **runtime_json(serving),
        "rollout": rollout_json(model.rollout),
    }
    manifest = model.manifest
    if manifest:
        spec = manifest.input
        description.update(architecture=manifest.architecture, num_labels=manifest.num_classes,
                           default_top_k=manifest.top_k, compile=manifest.compile,
                           input={"height": spec.height, "width": spec.width, "channels": spec.channels,
                                  "color": spec.color})
        if manifest.cache.enabled:
            description["cache"] = model_cache_json(context.service.cache.stats(), model.name)
    return description


def runtime_json(serving: ServingDescription | None) -> dict[str, Any]:
    """What runs the serving version, why and the speeds its runtime choice measured (``runtime = "auto"``)."""
    choice = serving.runtime_choice if serving else None
    return {"runtime": serving.runtime if serving else None, "runtime_reason": choice.reason if choice else "",
            "runtime_speeds": [{"runtime": s.runtime, "batch_size": s.batch_size,
                                "images_per_second": s.images_per_second} for s in choice.speeds] if choice else []}


def rollout_json(rollout: RolloutDescription | None) -> dict[str, Any] | None:
    """A model's rollout candidate and its live figures (docs/rollout.md); None without one."""
    if rollout is None:
        return None
    spec, scores = rollout.spec, rollout.scores
    figures = {"compared": scores.compared, "agreement": scores.agreement, "topk_overlap": scores.topk_overlap,
               "mean_abs_diff": scores.mean_abs_diff, "errors": scores.errors, "error_rate": scores.error_rate,
               "compute_ratio": scores.compute_ratio, "labels_differ": scores.labels_differ} if scores else {}
    return {"candidate_version": rollout.version, "mode": spec.mode, "decision": spec.decision,
            "min_requests": spec.min_requests, "min_agreement": spec.min_agreement, **figures}


def model_cache_json(stats: CacheStats, name: str) -> dict[str, Any]:
    """A ``[cache]``-enabled model's lookups: hits, misses and the hit rate (None before the first lookup)."""
    counts = stats.models.get(name, ModelCounts())
    return {"hits": counts.hits, "misses": counts.misses, "hit_rate": stats.hit_rate(name),
            "active": stats.budget_bytes > 0}


def tuning_json(tuning: TuningSnapshot) -> dict[str, Any]:
    """The online cap tuner as the page shows it: the cap, the threads, what is on trial, the estimates and the
    moves (``threads`` 0: the tuner does not choose them)."""
    return {"cap": tuning.cap, "cap_online": tuning.cap_online, "exploring": tuning.exploring, "threads": tuning.width,
            "exploring_threads": tuning.exploring_width, "changes": tuning.changes, "trials": tuning.trials,
            "last_change": tuning.last_change,
            "estimates": [{"batch_size": e.batch_size, "threads": e.width, "batch_ms": round(e.batch_s * 1000, 2),
                           "images_per_second": round(e.images_per_second, 1), "samples": e.samples,
                           "age_s": round(e.age_s, 1)} for e in tuning.estimates]}


def status_document(context: HttpContext) -> dict[str, Any]:
    """Everything the page shows, in one JSON document."""
    models = []
    for record in context.manager.models():
        description = model_json(record, context)
        description["stats"] = context.stats.snapshot(record.name, description["max_batch_size"] or 1)
        models.append(description)
    cache = context.service.cache.stats()
    return {"time_unix_ms": round(time.time() * 1000), "server": context.server_info(), "models": models,
            "events": context.events.recent(EVENTS_SHOWN),
            "cache": {"bytes": cache.bytes, "budget_bytes": cache.budget_bytes, "entries": cache.entries,
                      "evictions": cache.evictions}}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def status(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    document = status_document(context)
    if context.status_share is not None:  # --workers: the other workers' figures too
        document = await context.status_share.merged(document)
    return web.json_response(document, dumps=dumps, headers={"Cache-Control": "no-store"})


async def list_models(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    return web.json_response({"models": [model_json(r, context) for r in context.manager.models()]}, dumps=dumps)


async def get_model(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    record = context.manager.get(request.match_info["name"])
    return web.json_response(model_json(record, context), dumps=dumps)


def add_status_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", index)
    router.add_static("/static/", STATIC_DIR)
    router.add_get("/status.json", status)
    router.add_get("/v1/models", list_models)
    router.add_get("/v1/models/{name}", get_model)
