"""The model-repository extension, model configuration and statistics on the Open Inference Protocol's REST form,
as Triton serves them: the neutral answers of :mod:`server.edges.common.oip_repository` as JSON. Translation only.

- ``POST /v2/repository/index`` (body optional: ``{"ready": true}``): ``[{"name", "version", "state", "reason"}]``.
- ``POST /v2/repository/models/{model}/load`` and ``.../unload``: 200 with an empty body once done. Operators only
  (:class:`server.edges.common.auth.AdminRule`, as gRPC's model-control calls).
- ``GET /v2/models/{model}[/versions/{v}]/config``: Triton's ModelConfig as JSON (snake_case names, enum names).
- ``GET /v2/models[/{model}[/versions/{v}]]/stats``: ``{"model_stats": [...]}`` as Triton's statistics extension.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from server.core import errors
from server.edges.common.auth import AdminRule, is_loopback
from server.edges.common.oip_repository import ModelConfig, OipRepository, VersionStatistics
from server.edges.http.bodies import parse_json, read_body
from server.edges.http.classify import dumps
from server.ops.inference_stats import Duration

REPOSITORY = web.AppKey("oip_repository", OipRepository)
ADMIN = web.AppKey("admin_rule", AdminRule)
MAX_CONTROL_BODY = 64 * 1024
"""Index, load and unload bodies hold a few parameters."""
_STATS_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "cache_hit")


async def _document(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is an empty object. Raises InvalidInput."""
    body = await read_body(request, MAX_CONTROL_BODY)
    document = await parse_json(body) if body.strip() else {}
    if not isinstance(document, dict):
        raise errors.InvalidInput("the request body must be a JSON object")
    return document


def _parameters(document: dict[str, Any]) -> dict[str, Any]:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise errors.InvalidInput(f"'parameters' must be a JSON object, got {type(parameters).__name__}")
    return {k: v for k, v in parameters.items() if v is not None}


def _check_admin(request: web.Request) -> None:
    """Refuse a model-control call the operator rule does not allow: 401 or 403 with the reason."""
    remote = request.remote or ""
    refused = request.app[ADMIN].refusal(f"{request.method} {request.path}", request.headers.get("Authorization"),
                                         lambda: is_loopback(remote), remote)
    if refused is not None:
        status, message = refused
        raise (web.HTTPForbidden if status is errors.Status.PERMISSION_DENIED else web.HTTPUnauthorized)(text=message)


async def index(request: web.Request) -> web.Response:
    document = await _document(request)
    ready = document.get("ready", False)
    if not isinstance(ready, bool):
        raise errors.InvalidInput(f"'ready' must be true or false, got {str(ready)[:40]}")
    rows = request.app[REPOSITORY].index(str(document.get("repository_name") or ""), ready)
    return web.json_response([dataclasses.asdict(r) for r in rows], dumps=dumps)


async def load(request: web.Request) -> web.Response:
    _check_admin(request)
    document = await _document(request)
    await request.app[REPOSITORY].load(request.match_info["model"], parameters=_parameters(document))
    return web.Response(status=200)


async def unload(request: web.Request) -> web.Response:
    _check_admin(request)
    document = await _document(request)
    await request.app[REPOSITORY].unload(request.match_info["model"], parameters=_parameters(document))
    return web.Response(status=200)


async def config(request: web.Request) -> web.Response:
    found = request.app[REPOSITORY].config(request.match_info["model"], request.match_info.get("version", ""))
    return web.json_response(config_json(found), dumps=dumps)


async def stats(request: web.Request) -> web.Response:
    entries = request.app[REPOSITORY].statistics(request.match_info.get("model", ""),
                                                 request.match_info.get("version", ""))
    return web.json_response({"model_stats": [stats_json(e) for e in entries]}, dumps=dumps)


def config_json(config: ModelConfig) -> dict[str, Any]:
    """Triton's ModelConfig as its REST form writes it."""
    return {"name": config.name, "platform": config.platform, "backend": config.backend,
            "max_batch_size": config.max_batch_size,
            "input": [{"name": t.name, "data_type": t.data_type, "format": t.format, "dims": t.dims}
                      for t in config.inputs],
            "output": [{"name": t.name, "data_type": t.data_type, "dims": t.dims, "label_filename": t.label_filename}
                       for t in config.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": config.max_queue_delay_microseconds}}


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def stats_json(entry: VersionStatistics) -> dict[str, Any]:
    """One version's statistics as Triton's REST form writes them."""
    stats = entry.stats
    inference = {name: _duration(getattr(stats, name)) for name in _STATS_FIELDS}
    inference["compute_output"] = _duration(Duration())
    return {"name": entry.name, "version": entry.version, "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": inference,
            "batch_stats": [{"batch_size": size, "compute_infer": _duration(d)} for size, d in
                            sorted(stats.batches.items())]}


def add_repository_routes(app: web.Application, repository: OipRepository, admin: AdminRule) -> None:
    """Register the routes; call it before the OIP routes, whose ``/v2/models/{model}`` would take ``stats``."""
    app[REPOSITORY], app[ADMIN] = repository, admin
    router = app.router
    router.add_post("/v2/repository/index", index)
    router.add_post("/v2/repository/models/{model}/load", load)
    router.add_post("/v2/repository/models/{model}/unload", unload)
    router.add_get("/v2/models/stats", stats)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_get(f"{prefix}/config", config)
        router.add_get(f"{prefix}/stats", stats)
