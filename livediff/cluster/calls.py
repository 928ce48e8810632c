"""An HTTP request and its answer as Ray carries them between the gateway and a replica.

Plain dataclasses of str/bytes (pickled by Ray). Also where a request's session, and so its
replica, is read from its path: session ids are `{route key}-{12 hex digits}`
(`ServerSettings.session_id_prefix`), the route key being the Serve replica's unique id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "host",
        "content-length",
    }
)
"""Headers that describe one HTTP hop (RFC 9110 section 7.6.1), not the request: never passed on."""

SESSION_PATHS = re.compile(r"^/(?:whip|whep|api/sessions)/(?P<id>[^/]+)(?:/[^/]+)?$")
"""Paths that name a session: /whip/{id}, /whep/{id}[/{viewer}], /api/sessions/{id}."""

OPENING = frozenset({("POST", "/offer"), ("POST", "/whip")})
"""Requests that open a session: they go to the replica with the most free room."""


@dataclass
class HttpCall:
    """A signalling request as the entry point received it (the body read, at most the server's
    `max_body_bytes`)."""

    method: str
    path: str
    query: str = ""
    """The raw query string, without `?`."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def opens_session(self) -> bool:
        return (self.method, self.path) in OPENING

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass
class HttpReply:
    """A replica's app's answer to an `HttpCall`, or the gateway's own (then `replica` is "")."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    replica: str
    """The route key of the replica that answered."""

    def opened_session(self) -> str:
        """The session this answer to a session-opening call made: named by its Location (WHIP) or by
        its JSON body's `session_id` (POST /offer); "" when it names none."""
        if self.status >= 300:
            return ""
        location = next((v for k, v in self.headers if k.lower() == "location"), "")
        match = SESSION_PATHS.match(urlsplit(location).path)
        if match:
            return match["id"]
        try:
            body = json.loads(self.body)
        except ValueError:
            return ""
        session = body.get("session_id") if isinstance(body, dict) else None
        return session if isinstance(session, str) else ""


def route_key(session_id: str) -> str | None:
    """The route key in a session id, None when it has none (then no replica holds it)."""
    key, sep, rest = session_id.partition("-")
    return key if sep and key and rest else None


def session_route(path: str) -> str | None:
    """The route key of the session a request path names, None for paths that name none."""
    match = SESSION_PATHS.match(path)
    return route_key(match["id"]) if match else None


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` less the hop-by-hop ones."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


async def replay(http: aiohttp.ClientSession, base_url: str, call: HttpCall, replica: str) -> HttpReply:
    """`call` sent to the app at `base_url` (a replica's own server); raises aiohttp's errors."""
    async with http.request(
        call.method, base_url + call.target, headers=end_to_end(call.headers), data=call.body, allow_redirects=False
    ) as response:
        body = await response.read()
        return HttpReply(response.status, end_to_end(list(response.headers.items())), body, replica)
