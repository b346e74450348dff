"""The status page at ``/`` (static files, no build step) and the JSON it polls, plus ``GET /v1/models``.

``GET /status.json`` describes every model (versions, states, errors, queue depth), its request statistics
(throughput, latency percentiles, batch-size histogram; :mod:`server.ops.stats`) and the last model events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from server.edges.common.describe import describe_model
from server.edges.http.classify import CONTEXT, HttpContext, dumps
from server.models.manager import ModelRecord

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
        "queue_depth": context.service.batcher_depth(model.name),
        "max_batch_size": serving.max_batch_size if serving else None,
        "max_delay_ms": serving.max_delay_ms if serving else None,
    }
    manifest = model.manifest
    if manifest:
        spec = manifest.input
        description.update(architecture=manifest.architecture, num_labels=manifest.num_classes,
                           default_top_k=manifest.top_k, compile=manifest.compile,
                           input={"height": spec.height, "width": spec.width, "channels": spec.channels,
                                  "color": spec.color})
    return description


def status_document(context: HttpContext) -> dict[str, Any]:
    """Everything the page shows, in one JSON document."""
    models = []
    for record in context.manager.models():
        description = model_json(record, context)
        description["stats"] = context.stats.snapshot(record.name, description["max_batch_size"] or 1)
        models.append(description)
    return {"time_unix_ms": round(time.time() * 1000), "server": context.server_info(), "models": models,
            "events": context.events.recent(EVENTS_SHOWN)}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[CONTEXT]), dumps=dumps,
                             headers={"Cache-Control": "no-store"})


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
