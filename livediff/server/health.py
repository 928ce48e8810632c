"""GET /healthz (the process answers), GET /readyz (model loaded and warmed up), GET /metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from livediff.server.common import service
from livediff.server.errors import json_error


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = service(request)
    if not svc.ready:
        return json_error(503, svc.load_error or "loading the model", headers={"Retry-After": "5"})
    return web.json_response({"status": "ready", "sessions": len(svc.scheduler.sessions), "engine": svc.describe()})


async def metrics(request: web.Request) -> web.Response:
    body = service(request).metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
