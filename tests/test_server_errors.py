"""Bad input gets the right status and a JSON body, and never disturbs a live session."""

from __future__ import annotations

import pytest

from tests.server_fixtures import frames_back, offer_client, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_bad_requests_and_auth_leave_the_live_session_running(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, token=TOKEN, max_sessions=1) as server:
        url = server.url
        client = await offer_client(http, url, headers=AUTH)
        received = await frames_back(client)
        cases = [
            # (method, path, kwargs, status, field)
            ("POST", "/offer", {"json": {"sdp": "v=0", "type": "offer"}}, 401, None),
            ("GET", "/api/sessions", {"headers": {"Authorization": "Bearer wrong"}}, 401, None),
            ("POST", "/whip", {"data": "v=0\r\n", "headers": {**AUTH, "Content-Type": "application/sdp"}}, 400, None),
            ("POST", "/whip", {"data": "garbage", "headers": {**AUTH, "Content-Type": "text/plain"}}, 415, None),
            (
                "POST",
                "/offer",
                {"data": "x" * 40000, "headers": {**AUTH, "Content-Type": "application/json"}},
                413,
                None,
            ),
            (
                "POST",
                "/offer",
                {"data": "{not json", "headers": {**AUTH, "Content-Type": "application/json"}},
                400,
                None,
            ),
            (
                "POST",
                "/offer",
                {
                    "json": {"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=fingerprint:x\r\n", "type": "offer"},
                    "headers": AUTH,
                },
                400,
                None,
            ),
            (
                "POST",
                "/offer",
                {
                    "json": {"sdp": client.pc.localDescription.sdp, "type": "offer", "params": {"strength": 3}},
                    "headers": AUTH,
                },
                422,
                "strength",
            ),
            ("GET", "/api/sessions/nope", {"headers": AUTH}, 404, None),
            ("PATCH", f"/api/sessions/{client.session_id}", {"json": {"steps": 0}, "headers": AUTH}, 422, "steps"),
            ("DELETE", "/whip/nope", {"headers": AUTH}, 404, None),
            ("POST", "/whep/nope", {"data": "v=0", "headers": {**AUTH, "Content-Type": "application/sdp"}}, 404, None),
            ("GET", "/no/such/route", {"headers": AUTH}, 404, None),
        ]
        for method, path, kwargs, status, field in cases:
            async with http.request(method, url + path, **kwargs) as response:
                body = await response.json(content_type=None)
                assert response.status == status, (method, path, response.status, body)
                assert "error" in body, body
                if field:
                    assert body["field"] == field
                if status == 401:
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
        # a good offer beyond --max-sessions: 503 with Retry-After and a JSON body
        async with http.post(
            url + "/offer", json={"sdp": client.pc.localDescription.sdp, "type": "offer"}, headers=AUTH
        ) as response:
            assert response.status == 503 and "Retry-After" in response.headers
            assert "limit" in (await response.json())["error"]
        # public routes stay public
        for path in ("/healthz", "/readyz"):
            async with http.get(url + path) as response:
                assert response.status == 200
        async with http.get(url + "/metrics", headers=AUTH) as response:
            assert response.status == 200 and "livediff_frames_total" in await response.text()  # scrapeable
        # the live session kept running through all of it
        count = len(received.times)
        await received.wait_for(count + 3)
        assert server.service.scheduler.sessions[client.session_id].state == "live"
        await client.close()


async def test_readyz_is_503_until_the_model_is_warm(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from aiohttp.test_utils import TestServer

    from livediff.config import EngineSettings, ServerSettings
    from livediff.server import create_app
    from livediff.server.common import SERVICE

    app = create_app(EngineSettings(model="tiny", height=64, width=64), ServerSettings(), parts=tiny_parts)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with http.get(server.make_url("/readyz")) as response:
            assert response.status == 503 and "error" in await response.json()
        async with http.post(server.make_url("/offer"), json={"sdp": "v=0", "type": "offer"}) as response:
            assert response.status == 503 and response.headers["Retry-After"]
        async with http.get(server.make_url("/healthz")) as response:
            assert response.status == 200
        while not app[SERVICE].ready:
            import asyncio

            await asyncio.sleep(0.05)
        async with http.get(server.make_url("/readyz")) as response:
            ready = await response.json()
            assert response.status == 200, ready
        engine = ready["engine"]  # what the pages' HUDs show
        assert engine["model"] == "tiny" and engine["backend"] == "torch" and engine["device"] == "cpu"
        assert engine["size"] == "64x64" and "passthrough" in engine["features"]
    finally:
        await server.close()
