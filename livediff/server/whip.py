"""WHIP ingest (RFC 9725): POST /whip, PATCH|DELETE /whip/{id}, OPTIONS /whip.

OBS (30+) posts a sendonly H.264 + Opus offer without candidates and does not trickle: the
answer carries the server's candidates, so ICE still completes (OBS's address is learnt as a
peer-reflexive candidate). Params come from the query string (`/whip?prompt=...`). A sendrecv
offer gets the transformed video back on the same connection. Audio is accepted and dropped.
"""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from livediff.server.common import read_text, service
from livediff.server.errors import ApiError
from livediff.server.params import parse_query, parse_update
from livediff.server.peers import Resource
from livediff.server.service import Service
from livediff.transport.whip import SDP_TYPE, SDPFRAG_TYPE, etag_matches, link_headers, parse_sdpfrag


def ice_links(svc: Service) -> list[str]:
    s = svc.settings
    return link_headers(s.ice_servers, s.turn_username, s.turn_credential)


def created(resource: Resource, location: str, svc: Service) -> web.Response:
    response = web.Response(status=201, text=resource.pc.localDescription.sdp, content_type=SDP_TYPE)
    response.headers["Location"] = location
    response.headers["ETag"] = resource.etag
    for link in ice_links(svc):
        response.headers.add("Link", link)
    return response


async def post_whip(request: web.Request) -> web.Response:
    svc = service(request)
    sdp = await read_text(request, SDP_TYPE)
    params, extras = parse_update(svc.default_params, parse_query(request.query))
    session, resource = await svc.publish(RTCSessionDescription(sdp=sdp, type="offer"), params, "whip",
                                          probe_on=extras.get("probe", False))
    return created(resource, f"/whip/{session.id}", svc)


def find_resource(request: web.Request, key: str) -> Resource:
    resource = service(request).resources.get(key)
    if resource is None or resource.session.closed:
        raise ApiError(404, f"no resource {request.path!r}")
    return resource


async def patch_resource(request: web.Request, key: str) -> web.Response:
    """Trickle ICE (RFC 8840 sdpfrag): If-Match is required; a stale ETag is 412.

    The resource is looked up again once the body has arrived: one that ended meanwhile is a 404.
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
    if frag.ufrag is not None and remote is not None and f"a=ice-ufrag:{frag.ufrag}" not in remote.sdp:
        raise ApiError(501, "ICE restart is not supported: start a new session")
    await service(request).trickle(resource, frag)
    return web.Response(status=204)


async def patch_whip(request: web.Request) -> web.Response:
    return await patch_resource(request, request.match_info["id"])


async def delete_whip(request: web.Request) -> web.Response:
    resource = find_resource(request, request.match_info["id"])
    await service(request).close_session(resource.session)
    return web.Response(status=200)


async def options_whip(request: web.Request) -> web.Response:
    response = web.Response(status=204)
    response.headers["Accept-Post"] = SDP_TYPE
    response.headers["Allow"] = "OPTIONS, POST"
    for link in ice_links(service(request)):
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
