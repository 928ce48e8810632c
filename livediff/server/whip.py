"""WHIP ingest (RFC 9725): POST /whip, PATCH|DELETE /whip/{id}, OPTIONS /whip.

OBS (30+) posts a sendonly H.264 + Opus offer without candidates and does not trickle: the
answer carries the server's candidates, so ICE still completes (OBS's address is learnt as a
peer-reflexive candidate). Params come from the query string (`/whip?prompt=...`). A sendrecv
offer gets the transformed video back on the same connection. Audio is accepted and dropped.
"""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from livediff.server.common import GONE, client_gone, read_text, service
from livediff.server.errors import ApiError
from livediff.server.params import ParamError, as_query, parse_query, parse_update
from livediff.server.peers import Resource
from livediff.server.service import Service
from livediff.transport.whip import SDP_TYPE, SDPFRAG_TYPE, etag_matches, is_ice_restart, parse_sdpfrag


def created(resource: Resource, location: str, svc: Service) -> web.Response:
    """201 with the answer, the resource's URL and ETag, and the ICE servers (RFC 9725 4.2, 4.6)."""
    response = web.Response(status=201, text=resource.answer, content_type=SDP_TYPE)
    response.headers["Location"] = location
    response.headers["ETag"] = resource.etag
    for link in svc.ice.link_headers():
        response.headers.add("Link", link)
    return response


async def post_whip(request: web.Request) -> web.Response:
    svc = service(request)
    sdp = await read_text(request, SDP_TYPE)
    try:  # the params came in the URL: errors name them as it does (temporal_bank, not temporal.bank)
        params, extras = parse_update(svc.default_params, parse_query(request.query))
        svc.check_record(extras)
        session, resource = await svc.publish(
            RTCSessionDescription(sdp=sdp, type="offer"), params, "whip", probe_on=extras.get("probe", False)
        )
    except ParamError as exc:
        raise as_query(exc) from None
    await svc.record(session, extras)
    if client_gone(request):  # nobody will apply the answer: end it now, not at the connect deadline
        await svc.close_session(session, f"POST /whip: {GONE}")
    return created(resource, f"/whip/{session.id}", svc)


def find_resource(request: web.Request, key: str) -> Resource:
    resource = service(request).resources.get(key)
    if resource is None or resource.session.closed:
        raise ApiError(404, f"no resource {request.path!r}")
    return resource


ICE_RESTART_REFUSED = (
    "ICE restart is not supported: this resource takes trickled candidates but cannot restart ICE, so the "
    "ice-ufrag/ice-pwd must stay those of the offer. The session and its ICE session go on; to move to a new "
    "network, DELETE this resource and POST a new offer"
)


async def patch_resource(request: web.Request, key: str) -> web.Response:
    """Trickle ICE (RFC 8840 sdpfrag) on the resource `key`: If-Match is required (428 without); a
    stale ETag is 412.

    ICE restarts (new ice-ufrag/ice-pwd) are answered 422 (RFC 9725 4.3.1: a session that supports
    trickle ICE but not ICE restarts answers 422 to the PATCH it does not support; aiortc cannot
    restart ICE), and the existing ICE session is kept (RFC 9725 4.3.2). The resource is looked up
    again once the body has arrived: one that ended meanwhile is a 404.
    """
    find_resource(request, key)
    if_match = request.headers.get("If-Match")
    if if_match is None:
        raise ApiError(428, "If-Match is required (the ETag of the resource)")
    text = await read_text(request, SDPFRAG_TYPE)
    resource = find_resource(request, key)
    if not etag_matches(if_match, resource.etag):
        raise ApiError(412, "If-Match does not match the resource's ETag (stale ICE session)")
    frag = parse_sdpfrag(text)
    remote = resource.pc.remoteDescription
    if remote is not None and is_ice_restart(frag, remote.sdp):
        raise ApiError(422, ICE_RESTART_REFUSED, "ice-ufrag" if frag.ufrag is not None else "ice-pwd")
    await service(request).trickle(resource, frag)
    return web.Response(status=204)


async def patch_whip(request: web.Request) -> web.Response:
    return await patch_resource(request, request.match_info["id"])


async def delete_whip(request: web.Request) -> web.Response:
    resource = find_resource(request, request.match_info["id"])
    await service(request).close_session(resource.session, f"client DELETE {request.path}")
    return web.Response(status=200)


async def options_whip(request: web.Request) -> web.Response:
    """WHIP/WHEP endpoint discovery. The ICE servers (`Link`) come along only when the server
    needs no token: an OPTIONS request carries none, and TURN credentials are for clients that
    may publish."""
    svc = service(request)
    response = web.Response(status=204)
    response.headers["Accept-Post"] = SDP_TYPE
    response.headers["Allow"] = "OPTIONS, POST"
    if not svc.settings.token:
        for link in svc.ice.link_headers():
            response.headers.add("Link", link)
    return response


async def options_resource(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.headers["Accept-Patch"] = SDPFRAG_TYPE
    response.headers["Allow"] = "OPTIONS, PATCH, DELETE"
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/whip", post_whip)
    app.router.add_route("OPTIONS", "/whip", options_whip)
    app.router.add_patch("/whip/{id}", patch_whip)
    app.router.add_delete("/whip/{id}", delete_whip)
    app.router.add_route("OPTIONS", "/whip/{id}", options_resource)
