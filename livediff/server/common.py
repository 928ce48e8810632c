"""Helpers shared by the route modules: the service, body checks, session look-up."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from livediff.server.errors import ApiError
from livediff.server.service import Service
from livediff.session import Session

SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
LOAD_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("load_task", asyncio.Task)
"""The model's load (`Service.load`), started with the app."""


def service(request: web.Request) -> Service:
    return request.app[SERVICE]


def client_gone(request: web.Request) -> bool:
    """Whether the client closed or reset its connection (e.g. while its answer was being made)."""
    return request.transport is None or request.transport.is_closing()


GONE = "the client went away before its answer"
"""The cause logged for a session or viewer made for a client that closed its connection meanwhile."""


def require_type(request: web.Request, *types: str) -> None:
    if request.content_type not in types:
        raise ApiError(415, f"Content-Type must be {' or '.join(types)}, got {request.content_type or 'none'!r}")


async def read_text(request: web.Request, *types: str) -> str:
    require_type(request, *types)
    body = await request.read()  # aiohttp answers 413 beyond client_max_size
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None


async def read_json(request: web.Request) -> dict[str, Any]:
    text = await read_text(request, "application/json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def find_session(request: web.Request, key: str = "id") -> Session:
    session_id = request.match_info[key]
    session = service(request).scheduler.sessions.get(session_id)
    if session is None or session.closed:
        raise ApiError(404, f"no session {session_id!r}")
    return session
