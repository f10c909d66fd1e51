"""The admin HTTP API under /admin/ (JSON, described in admin_openapi.json).

Every /admin path needs `Authorization: Bearer <ADMIN_TOKEN>` or an operator page session
(auth.py; 403 while no token is configured); the page itself is /admin/ (page.py). The handlers
are thin: what they do is in ops.py, which the CLI uses as well.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from . import page
from .auth import admin_middleware
from .flags import FlagError
from .ops import STATS_HOURS, NotFound, Operations, OpsError
from .redis_client import REDIS_ERRORS

OPS = web.AppKey("ops", Operations)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotFound as exc:
        return _json({"error": str(exc)}, status=404)
    except (OpsError, FlagError) as exc:
        return _json({"error": str(exc)}, status=400)
    except REDIS_ERRORS as exc:
        return _json({"error": f"storage unavailable: {type(exc).__name__}"}, status=503)


def _limit(request: web.Request, name: str, default: int, maximum: int = 1000) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise OpsError(f"{name} must be a whole number from 1 to {maximum}")
    return int(raw)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise OpsError("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise OpsError("body must be a JSON object")
    return body


def _ops(request: web.Request) -> Operations:
    return request.config_dict[OPS]


async def stats(request: web.Request) -> web.Response:
    return _json(await _ops(request).stats(_limit(request, "hours", 24, STATS_HOURS)))


async def buffers(request: web.Request) -> web.Response:
    return _json(await _ops(request).buffers(_limit(request, "limit", 100)))


async def buffer(request: web.Request) -> web.Response:
    return _json(await _ops(request).buffer(request.match_info["conversation"]))


async def flush_buffer(request: web.Request) -> web.Response:
    return _json(await _ops(request).flush(request.match_info["conversation"]))


async def flush_due(request: web.Request) -> web.Response:
    return _json(await _ops(request).flush())


async def jobs(request: web.Request) -> web.Response:
    return _json(await _ops(request).jobs(request.query.get("status") or None,
                                          _limit(request, "limit", 50)))


async def job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    found = await _ops(request).job(job_id)
    if found is None:
        raise NotFound(f"no job {job_id}")
    return _json(found)


async def retry(request: web.Request) -> web.Response:
    return _json(await _ops(request).retry(request.match_info["id"]))


async def retry_failed(request: web.Request) -> web.Response:
    return _json(await _ops(request).retry_all_failed())


async def list_flags(request: web.Request) -> web.Response:
    return _json(await _ops(request).flags.table())


async def set_flag(request: web.Request) -> web.Response:
    body = await _body(request)
    value = body.get("value")
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise OpsError('body must be {"value": "on" | "off" | <number> | "<ids>"}')
    name = request.match_info["name"]
    return _json({"name": name, "value": await _ops(request).flags.set(name, value)})


async def processing(request: web.Request) -> web.Response:
    state = request.match_info["state"]
    if state not in ("on", "off"):
        raise NotFound("use /admin/processing/on or /admin/processing/off")
    return _json(await _ops(request).set_processing(state == "on"))


async def cleanup(request: web.Request) -> web.Response:
    body = await _body(request)
    purge = body.get("purge_failed", False)
    if not isinstance(purge, bool):
        raise OpsError("purge_failed must be true or false")
    return _json(await _ops(request).cleanup(purge_failed=purge))


async def logs(request: web.Request) -> web.Response:
    return _json(await _ops(request).log(request.match_info["kind"], _limit(request, "count", 50)))


def _openapi() -> Handler:
    document = resources.files(__package__).joinpath("admin_openapi.json").read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    return serve


def admin_app(operations: Operations) -> web.Application:
    # The parent app's middleware checks the token already; this one keeps the admin API closed
    # even if it is ever mounted somewhere without it.
    app = web.Application(middlewares=[admin_middleware, _errors])
    app[OPS] = operations
    r = app.router
    r.add_get("/openapi.json", _openapi())
    r.add_get("/stats", stats)
    r.add_get("/buffers", buffers)
    r.add_get("/buffers/{conversation}", buffer)
    r.add_post("/buffers/{conversation}/flush", flush_buffer)
    r.add_post("/flush", flush_due)
    r.add_get("/jobs", jobs)
    r.add_post("/jobs/retry-failed", retry_failed)
    r.add_get("/jobs/{id}", job)
    r.add_post("/jobs/{id}/retry", retry)
    r.add_get("/flags", list_flags)
    r.add_put("/flags/{name}", set_flag)
    r.add_post("/processing/{state}", processing)
    r.add_post("/cleanup", cleanup)
    r.add_get("/logs/{kind}", logs)
    page.add_routes(r)
    return app


def setup(app: web.Application, operations: Operations) -> None:
    """Mount /admin (the API and the operator page) on the service's app."""
    app.router.add_get(page.PAGE_PATH.rstrip("/"), page.to_page)  # before the sub-app takes /admin
    app.add_subapp("/admin", admin_app(operations))
