"""create_app: the aiohttp application for `livediff serve`.

Startup loads the model and runs one warm-up inference on the worker thread in the background
(/healthz answers at once, /readyz turns 200 when done); shutdown closes every peer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.jobs.settings import JobSettings
from livediff.models import ModelParts
from livediff.server import api, health, ice, image_prompt, offer, whep, whip
from livediff.server.auth import bearer_middleware
from livediff.server.common import LOAD_TASK, SERVICE
from livediff.server.cors import cors_middleware
from livediff.server.errors import ApiError, error_middleware
from livediff.server.service import Service

PAGES = {"/": "index.html", "/latency": "latency.html"}


def _page(web_dir: Path, name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        path = web_dir / name
        if not path.is_file():
            raise ApiError(404, f"page {name} is not installed (web/{name})")
        return web.FileResponse(path)

    return handler


def create_app(
    engine_settings: EngineSettings,
    settings: ServerSettings | None = None,
    parts: ModelParts | None = None,
    default_params: StreamParams | None = None,
    jobs: JobSettings | None = None,
) -> web.Application:
    """The app; with `jobs`, the job routes and worker too (`livediff.server.jobs`)."""
    settings = settings or ServerSettings()
    middlewares: list[Middleware] = [cors_middleware(settings.cors_origins)] if settings.cors_origins else []
    middlewares.append(error_middleware)
    if settings.token:
        middlewares.append(bearer_middleware(settings.token))
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[SERVICE] = Service(engine_settings, settings, parts, default_params)
    for module in (offer, whip, whep, api, ice, health, image_prompt):
        module.add_routes(app)
    for route, name in PAGES.items():
        app.router.add_get(route, _page(settings.web_dir, name))
    app.router.add_get("/view/{id}", _page(settings.web_dir, "view.html"))
    if settings.web_dir.is_dir():
        app.router.add_static("/web/", settings.web_dir, show_index=False)
    app.on_startup.append(_start)
    if jobs is not None:  # its close runs before _stop's: job frames leave the scheduler first
        from livediff.server import jobs as job_routes
        from livediff.server.tls import default_state_dir

        job_routes.setup(app, jobs, settings.state_dir or default_state_dir())
    app.on_shutdown.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    app[LOAD_TASK] = asyncio.create_task(app[SERVICE].load(), name="livediff-load")


async def _stop(app: web.Application) -> None:
    task = app[LOAD_TASK]
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await app[SERVICE].close()
