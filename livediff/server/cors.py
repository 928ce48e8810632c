"""CORS (the Fetch standard's cross-origin protocol) for pages on other origins that publish or play.

A web app on another origin that publishes with WHIP or plays with WHEP from the browser (the usual
way to embed a live filter in a site) sends `Authorization` and `Content-Type: application/sdp`,
so the browser first sends a preflight (`OPTIONS` with `Access-Control-Request-Method`), and it
lets the page read only the response headers the server exposes. WHIP/WHEP clients must read
`Location` (the resource to PATCH and DELETE), `ETag` (for `If-Match`), `Link` (ICE servers) and
`Accept-Patch` (RFC 9725 sections 4.1-4.6).

`--cors-origins` lists the origins allowed (`*` allows any); none by default, so a server
answers only its own pages. Allowed origins are echoed back with `Vary: Origin` rather than
answered with `*`: a `*` would not cover the `Authorization` request header in a preflight.
Preflights are answered here, before routing and authentication (a preflight carries no
credentials); WHIP's own `OPTIONS` (no `Access-Control-Request-Method`) still reaches its route.

This is a middleware of our own rather than `aiohttp-cors` because that library installs its own
`OPTIONS` handler on every resource and refuses resources that have one, as WHIP and WHEP
endpoints do.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from livediff.server.errors import Handler, json_error

ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
EXPOSE_HEADERS = "Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After"
MAX_AGE_S = 600


def cors_middleware(origins: tuple[str, ...]) -> Middleware:
    """Answers preflights from `origins` (or any, with `*`) and marks their responses readable."""
    any_origin = "*" in origins
    allowed = set(origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        if origin is None:
            return await handler(request)
        if not (any_origin or origin in allowed):
            if preflight:
                return json_error(403, f"origin {origin} is not allowed (--cors-origins)")
            return await handler(request)  # the browser keeps the answer from the page
        if preflight:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
            if request.headers.get("Access-Control-Request-Private-Network") == "true":
                response.headers["Access-Control-Allow-Private-Network"] = "true"
        else:
            response = await handler(request)
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
        return response

    return middleware
