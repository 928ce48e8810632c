"""The operator's API: DELETE /api/sessions/{id} ends a session, its peer and its viewers, and frees its slot."""

from __future__ import annotations

import asyncio

import pytest

from tests.server_fixtures import frames_back, metric_value, offer_client, running_server, whep_view

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]

TOKEN = "op-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_delete_session_ends_peer_viewers_and_frees_the_slot(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, token=TOKEN, max_sessions=1) as server:
        url = server.url
        client = await offer_client(http, url, headers=AUTH)
        await frames_back(client)
        viewer = await whep_view(http, url, client.session_id, headers=AUTH)
        await viewer.wait_connected()
        session = server.service.scheduler.sessions[client.session_id]
        assert len(session.viewers) == 1
        # the slot is taken: a second publisher is refused
        async with http.post(
            url + "/offer", json={"sdp": client.pc.localDescription.sdp, "type": "offer"}, headers=AUTH
        ) as response:
            assert response.status == 503, await response.text()

        path = f"/api/sessions/{client.session_id}"
        async with http.delete(url + path) as response:  # the bearer token is required, as for GET/PATCH
            assert response.status == 401
        assert not session.closed
        async with http.delete(url + path, headers=AUTH) as response:
            body = await response.json()
            assert response.status == 200, body
        assert body["id"] == client.session_id and body["state"] == "closed" and body["viewers"] == 0
        assert session.closed and client.session_id not in server.service.scheduler.sessions
        assert not session.viewers and client.session_id not in server.service.outputs
        assert not [key for key in server.service.resources if key.startswith(client.session_id)]
        assert await metric_value(http, url, "livediff_viewers", headers=AUTH) == 0
        assert await metric_value(http, url, "livediff_sessions", headers=AUTH) == 0
        # both peers see the server end the connection
        for peer in (client, viewer):
            for _ in range(100):
                if peer.pc.connectionState in ("closed", "failed"):
                    break
                await asyncio.sleep(0.1)
            assert peer.pc.connectionState in ("closed", "failed"), peer.pc.connectionState

        # unknown, and deleted twice: 404 with a JSON reason
        for unknown in (path, "/api/sessions/nope"):
            async with http.delete(url + unknown, headers=AUTH) as response:
                assert response.status == 404 and "no session" in (await response.json())["error"]
        async with http.get(url + path, headers=AUTH) as response:
            assert response.status == 404

        # the slot is free: a new session is admitted and gets transformed frames
        second = await offer_client(http, url, headers=AUTH)
        await frames_back(second)
        for peer in (client, viewer, second):
            await peer.close()
