"""Bearer-token auth: with `--token`, signalling, API, viewer and metrics routes need it.

Pages and health probes stay public. The `Authorization` header is read per RFC 9110 11.1 and
RFC 6750 2.1: `credentials = auth-scheme 1*SP token`, the scheme (`Bearer`) case-insensitive
(`bearer`, `BEARER`), one or more spaces before the token; the token is compared exactly and in
constant time (`hmac.compare_digest`), so the answer's timing says nothing about how much of a
guess was right. The middleware is the only place a token is checked: every route goes through it
(data channels are opened by peers whose offer already passed it).
"""

from __future__ import annotations

import hmac
import re

from aiohttp import web
from aiohttp.typedefs import Middleware

from livediff.server.errors import Handler, json_error

PUBLIC_EXACT = {"/", "/latency", "/healthz", "/readyz", "/favicon.ico"}
PUBLIC_PREFIXES = ("/view/", "/web/")

_CREDENTIALS = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S+)")
"""RFC 9110 11.1's auth-scheme (a token), then 1*SP (RFC 6750 2.1), then the credentials."""


def is_public(request: web.Request) -> bool:
    path = request.path
    if request.method == "OPTIONS":  # CORS preflight and WHIP discovery carry no credentials
        return True
    return path in PUBLIC_EXACT or path.startswith(PUBLIC_PREFIXES)


def bearer_credentials(header: str) -> str | None:
    """The token of an `Authorization` value with the Bearer scheme in any case and one or more
    spaces before it (`"bearer  abc"` -> `"abc"`); None for another scheme or another shape."""
    match = _CREDENTIALS.fullmatch(header.strip(" "))
    if match is None or match.group(1).lower() != "bearer":
        return None
    return match.group(2)


def token_matches(header: str, token: str) -> bool:
    """Whether an `Authorization` value carries `token` as its Bearer credentials (compared in
    constant time, whatever the value)."""
    given = bearer_credentials(header)
    return hmac.compare_digest((given if given is not None else "").encode(), token.encode()) and given is not None


def bearer_middleware(token: str) -> Middleware:
    if not token:
        raise ValueError("an empty token would let every request in")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        if not token_matches(request.headers.get("Authorization", ""), token):
            return json_error(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="livediff"'}
            )
        return await handler(request)

    return middleware
