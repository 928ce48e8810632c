"""WHEP egress: POST /whep/{id} (or /whep: the newest live session, `livediff.session.watch_rank`) ->
a viewer of that session's output.

Viewers get the session's output encoded once per codec and shared (`livediff.transport.fanout`):
a viewer costs packetization and encryption, not an encode. The session is looked up again once
the offer has arrived: one that ended meanwhile is a 404.
"""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from livediff.server.common import GONE, client_gone, find_session, read_text, service
from livediff.server.errors import ApiError
from livediff.server.whip import created, options_whip, patch_resource
from livediff.session import Session
from livediff.transport.whip import SDP_TYPE


async def _view(request: web.Request, sdp: str, session: Session) -> web.Response:
    svc = service(request)
    svc.require_ready()
    resource = await svc.viewers.add(session, RTCSessionDescription(sdp=sdp, type="offer"))
    if client_gone(request) and resource.viewer_id is not None:
        await svc.viewers.end(session, resource.viewer_id, f"POST {request.path}: {GONE}")
    return created(resource, f"/whep/{session.id}/{resource.viewer_id}", svc)


async def post_whep(request: web.Request) -> web.Response:
    find_session(request)
    sdp = await read_text(request, SDP_TYPE)
    return await _view(request, sdp, find_session(request))  # again: it may have ended while the body arrived


async def post_whep_any(request: web.Request) -> web.Response:
    service(request).require_ready()
    sdp = await read_text(request, SDP_TYPE)
    session = service(request).session_to_watch()
    if session is None:
        raise ApiError(404, "no session is live")
    return await _view(request, sdp, session)


async def delete_viewer(request: web.Request) -> web.Response:
    session = find_session(request)
    if not await service(request).viewers.end(session, request.match_info["viewer"]):
        raise ApiError(404, f"no viewer {request.match_info['viewer']!r} of session {session.id!r}")
    return web.Response(status=200)


async def patch_viewer(request: web.Request) -> web.Response:
    return await patch_resource(request, f"{request.match_info['id']}/{request.match_info['viewer']}")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/whep", post_whep_any)
    app.router.add_route("OPTIONS", "/whep", options_whip)
    app.router.add_post("/whep/{id}", post_whep)
    app.router.add_route("OPTIONS", "/whep/{id}", options_whip)
    app.router.add_delete("/whep/{id}/{viewer}", delete_viewer)
    app.router.add_patch("/whep/{id}/{viewer}", patch_viewer)
