"""GET /api/sessions, GET|PATCH|DELETE /api/sessions/{id}: state, stats, live params, and ending a
session; GET /api/sessions/{id}/control.jpg: the session's control image."""

from __future__ import annotations

import asyncio

from aiohttp import web

from livediff.server.common import find_session, read_json, service
from livediff.server.controlnets import preview_jpeg


async def list_sessions(request: web.Request) -> web.Response:
    sessions = service(request).scheduler.sessions.values()
    return web.json_response({"sessions": [s.describe() for s in sessions]})


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(find_session(request).describe())


async def patch_session(request: web.Request) -> web.Response:
    find_session(request)
    data = await read_json(request)
    session = find_session(request)  # again: a session that ended while the body arrived is a 404
    return web.json_response(await service(request).apply_params(session, data))


async def delete_session(request: web.Request) -> web.Response:
    """The operator's stop: ends the session's peer, its WHEP viewers and tasks, and frees its slot.

    Any kind of session (demo page, WHIP); 404 when unknown or already ended. Answers the session
    as it ended (`state` "closed", its final stats).
    """
    session = find_session(request)
    await service(request).close_session(session, "operator DELETE /api/sessions")
    return web.json_response(session.describe())


async def get_control_image(request: web.Request) -> web.Response:
    """The session's latest control image as a small JPEG (encoded off the event loop); 204 (no body)
    while it has none: no ControlNet on, or not yet run on its frames."""
    session = find_session(request)
    image = getattr(session.stream, "control_image", None)
    if image is None:
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    data = await asyncio.get_running_loop().run_in_executor(None, preview_jpeg, image)
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_get("/api/sessions/{id}", get_session)
    app.router.add_patch("/api/sessions/{id}", patch_session)
    app.router.add_delete("/api/sessions/{id}", delete_session)
    app.router.add_get("/api/sessions/{id}/control.jpg", get_control_image)
