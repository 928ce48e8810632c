"""Bearer-token auth: with `--token`, signalling, API, viewer and metrics routes need it.

Pages and health probes stay public.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from livediff.server.errors import Handler, json_error

PUBLIC_EXACT = {"/", "/latency", "/healthz", "/readyz", "/favicon.ico"}
PUBLIC_PREFIXES = ("/view/", "/web/")


def is_public(request: web.Request) -> bool:
    path = request.path
    if request.method == "OPTIONS":  # CORS preflight and WHIP discovery carry no credentials
        return True
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


def bearer_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return json_error(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="livediff"'}
            )
        return await handler(request)

    return middleware
