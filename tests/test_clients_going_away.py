"""Clients going away (a half-sent body, a reset, a close before the answer) are not server errors:
one info line each, no traceback, nothing left behind; and every session end is logged once, with
its cause."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest

from livediff.transport.client import abandoned_offer
from tests.server_fixtures import (
    CameraTrack,
    Running,
    frames_back,
    offer_client,
    running_server,
    whep_view,
    whip_publish,
)

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(180)]


async def raw_request(url: str, head: bytes, body: bytes, reset: bool, wait_s: float = 0.3) -> None:
    """Send `head` and `body` on a raw TCP connection, then close it (with an RST when `reset`)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(wait_s)  # the server reads what came
    sock = writer.get_extra_info("socket")
    if reset:  # SO_LINGER 0: close() sends RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


@asynccontextmanager
async def served_as_in_production(parts: Any, **server: Any) -> AsyncIterator[Running]:
    """The app on an `AppRunner` as `livediff serve` runs it: a handler goes on when its client goes
    away (aiohttp's test server cancels it instead)."""
    from aiohttp import web

    from livediff.config import EngineSettings, ServerSettings
    from livediff.server import create_app
    from livediff.server.common import SERVICE

    app = create_app(EngineSettings(model="tiny", height=64, width=64), ServerSettings(**server), parts=parts)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        assert await wait_for(lambda: app[SERVICE].ready, 60)
        yield Running(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def wait_for(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_half_a_body_and_a_reset_are_one_info_line(tiny_parts, http, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    async with served_as_in_production(tiny_parts) as server:
        offer = (await CameraOffer.make()).encode()
        for route, content_type in (("/whip", "application/sdp"), ("/offer", "application/json")):
            for reset in (False, True):
                head = (
                    f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(offer)}\r\n\r\n"
                ).encode()
                caplog.clear()
                await raw_request(server.url, head, offer[: len(offer) // 2], reset)
                assert await wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), 10), [
                    r.getMessage() for r in caplog.records
                ]
                assert not errors(caplog), [(r.levelname, r.getMessage()) for r in errors(caplog)]
                lines = [r for r in caplog.records if "went away" in r.getMessage()]
                assert len(lines) == 1 and route in lines[0].getMessage()
        assert not server.service.scheduler.sessions and not server.service.resources
        async with http.get(server.url + "/healthz") as response:
            assert response.status == 200


async def test_a_client_closing_before_its_answer_leaves_nothing(tiny_parts, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    async with served_as_in_production(tiny_parts) as server:
        offer = (await CameraOffer.make()).encode()
        head = (
            f"POST /whip HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\nContent-Length: {len(offer)}\r\n\r\n"
        ).encode()
        await raw_request(server.url, head, offer, reset=False, wait_s=0)  # the whole offer, then gone
        assert await wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), 15)
        # its session (if one was made before the close was seen) ends at once, not at the connect deadline
        assert await wait_for(lambda: not server.service.scheduler.sessions and not server.service.resources, 5)
        assert not errors(caplog), [(r.levelname, r.getMessage()) for r in errors(caplog)]


class CameraOffer:
    @staticmethod
    async def make() -> str:
        from livediff.transport.client import new_peer

        pc = new_peer()
        pc.addTransceiver(CameraTrack(), direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp


def ends(caplog: pytest.LogCaptureFixture, session_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"session {session_id} ended: ")]


async def test_every_session_end_is_logged_once_with_its_cause(tiny_parts, http, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    async with running_server(tiny_parts, size=64, connect_timeout_s=2.0) as server:
        sessions = server.service.scheduler.sessions
        # the client's DELETE
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        await publisher.wait_connected()
        async with http.delete(server.url + publisher.location) as response:
            assert response.status == 200
        await publisher.close()
        # an operator's DELETE
        client = await offer_client(http, server.url)
        await frames_back(client)
        viewer = await whep_view(http, server.url, client.session_id)  # a viewer ended by its client
        await viewer.wait_connected()
        async with http.delete(server.url + viewer.location) as response:
            assert response.status == 200
        await viewer.close()
        async with http.delete(server.url + f"/api/sessions/{client.session_id}") as response:
            assert response.status == 200
        # the client closing its peer (what a lost consent also ends in, sooner or later)
        closing = await offer_client(http, server.url)
        await frames_back(closing)
        await closing.close()
        assert await wait_for(lambda: closing.session_id not in sessions)
        # the connect deadline
        before = set(sessions)
        assert await abandoned_offer(http, server.url, "/whip") == 201
        (reaped,) = set(sessions) - before
        assert await wait_for(lambda: reaped not in sessions)
        # shutdown
        last = await offer_client(http, server.url)
        await frames_back(last)
        await server.service.close()
        await last.close()
        await asyncio.sleep(0.5)  # any later event of the closed peers would log a second line
        expected = {
            publisher.session_id: "client DELETE",
            client.session_id: "operator DELETE",
            closing.session_id: "peer connection closed",
            reaped: "did not connect",
            last.session_id: "server shutting down",
        }
        viewer_key = viewer.location.removeprefix("/whep/")
        viewer_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"viewer {viewer_key} ")]
        assert viewer_lines == [f"viewer {viewer_key} ended: client DELETE"], viewer_lines
        for session_id, cause in expected.items():
            lines = ends(caplog, session_id)
            assert len(lines) == 1 and cause in lines[0], (session_id, cause, lines)
