"""GET /api/ice-servers: the STUN/TURN servers a page passes to `new RTCPeerConnection(...)`.

The pages ask before they create a peer connection, so a browser behind a NAT that blocks direct
UDP can relay through the TURN server the operator configured. With `--turn-secret` each answer
carries a fresh short-lived credential (`expires`, unix time); the route needs the bearer token
when the server has one, like the rest of the API. Never cached: credentials expire.
"""

from __future__ import annotations

from aiohttp import web

from livediff.server.common import service


async def get_ice_servers(request: web.Request) -> web.Response:
    response = web.json_response(service(request).ice.for_client())
    response.headers["Cache-Control"] = "no-store"
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/ice-servers", get_ice_servers)
