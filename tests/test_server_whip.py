"""WHIP ingest and WHEP egress with an OBS-like publisher (sendonly H.264 + Opus, no trickle)."""

from __future__ import annotations

import asyncio

import pytest

from livediff.config import StreamParams
from tests.server_fixtures import mean_abs_diff, metric_value, running_server, whep_view, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]


async def test_whip_publish_whep_view_delete(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        publisher = await whip_publish(http, server.url, query="?prompt=a%20red%20fox&strength=0.7")
        assert publisher.location.startswith("/whip/") and publisher.etag.startswith('"')
        await publisher.wait_connected()
        session = server.service.scheduler.sessions[publisher.session_id]
        assert session.kind == "whip" and session.params.prompt == "a red fox" and session.params.strength == 0.7
        viewer = await whep_view(http, server.url, publisher.session_id)
        assert viewer.location.startswith(f"/whep/{publisher.session_id}/")
        await viewer.wait_connected()
        assert viewer.received is not None
        await viewer.received.wait_for(5, timeout=20)
        assert viewer.received.frames[-1].shape == (64, 64, 3)
        assert session.stats.processed >= 5
        assert await metric_value(http, server.url, "livediff_viewers") == 1.0
        # a second viewer (newest session via POST /whep) shares the same output
        second = await whep_view(http, server.url)
        await second.wait_connected()
        await second.received.wait_for(3, timeout=20)  # type: ignore[union-attr]
        assert mean_abs_diff(second.received.frames[-1], viewer.received.frames[-1]) < 60  # type: ignore[union-attr]
        async with http.delete(server.url + second.location) as response:
            assert response.status == 200
        async with http.delete(server.url + second.location) as response:
            assert response.status == 404 and "error" in await response.json()
        # stale If-Match is 412, missing If-Match 428, right one 204
        frag = "a=ice-ufrag:zzzz\r\na=ice-pwd:zzzzzzzzzzzzzzzzzzzzzzzz\r\n"
        headers = {"Content-Type": "application/trickle-ice-sdpfrag"}
        async with http.patch(
            server.url + publisher.location, data=frag, headers={**headers, "If-Match": '"stale"'}
        ) as response:
            assert response.status == 412 and "error" in await response.json()
        async with http.patch(server.url + publisher.location, data=frag, headers=headers) as response:
            assert response.status == 428
        candidate = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        async with http.patch(
            server.url + publisher.location, data=candidate, headers={**headers, "If-Match": publisher.etag}
        ) as response:
            assert response.status == 204, await response.text()
        # DELETE ends the session (and its viewers); a second DELETE is 404
        async with http.delete(server.url + publisher.location) as response:
            assert response.status == 200
        assert publisher.session_id not in server.service.scheduler.sessions
        async with http.delete(server.url + publisher.location) as response:
            assert response.status == 404
        for _ in range(100):
            if viewer.pc.connectionState == "closed" or viewer.pc.connectionState == "failed":
                break
            await asyncio.sleep(0.1)
        assert server.service.metrics.viewers._value.get() == 0
        for client in (publisher, viewer, second):
            await client.close()


async def test_whip_sendrecv_gets_output_back(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, ice_servers=("stun:127.0.0.1:3478",)) as server:
        async with http.options(server.url + "/whip") as response:
            assert response.status == 204
            assert response.headers["Accept-Post"] == "application/sdp"
            assert 'rel="ice-server"' in response.headers["Link"]
        publisher = await whip_publish(http, server.url, sendrecv=True, audio=False)
        await publisher.wait_connected()
        assert publisher.received is not None
        await publisher.received.wait_for(5, timeout=20)
        assert publisher.received.frames[-1].shape == (64, 64, 3)
        await publisher.close()


async def test_ice_restart_is_422_and_the_session_goes_on(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    """RFC 9725 4.3.1/4.3.2: a PATCH with new ICE credentials (If-Match: *) is refused with 422, for
    WHIP and WHEP resources alike, and the existing ICE session is kept (was 501)."""
    async with running_server(tiny_parts, size=64) as server:
        publisher = await whip_publish(http, server.url, sendrecv=True, audio=False)
        await publisher.wait_connected()
        viewer = await whep_view(http, server.url, publisher.session_id)
        await viewer.wait_connected()
        assert publisher.received is not None and viewer.received is not None
        await viewer.received.wait_for(3, timeout=20)
        ours = {
            line.split(":", 1)[0]: line.split(":", 1)[1]
            for line in publisher.pc.localDescription.sdp.splitlines()
            if line.startswith(("a=ice-ufrag:", "a=ice-pwd:"))
        }
        restarts = [
            "a=ice-ufrag:newU\r\na=ice-pwd:newpasswordnewpassword12\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
            "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n",
            f"a=ice-ufrag:{ours['a=ice-ufrag']}\r\na=ice-pwd:anotherpasswordanother12\r\n",  # the password alone
        ]
        headers = {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}
        for client in (publisher, viewer):
            for frag in restarts:
                async with http.patch(server.url + client.location, data=frag, headers=headers) as response:
                    body = await response.json()
                    assert response.status == 422, body
                assert "ICE restart is not supported" in body["error"] and body["field"] in ("ice-ufrag", "ice-pwd")
        # nothing was torn down: frames keep flowing both ways, trickle with the current credentials still works
        session = server.service.scheduler.sessions[publisher.session_id]
        counts = len(publisher.received.times), len(viewer.received.times), session.stats.frames_in
        await asyncio.sleep(1.5)
        assert len(publisher.received.times) > counts[0] and len(viewer.received.times) > counts[1]
        assert session.stats.frames_in > counts[2] and session.state == "live"
        assert publisher.pc.connectionState == "connected" and viewer.pc.connectionState == "connected"
        trickle = (
            f"a=ice-ufrag:{ours['a=ice-ufrag']}\r\na=ice-pwd:{ours['a=ice-pwd']}\r\na=mid:0\r\n"
            "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        )
        async with http.patch(
            server.url + publisher.location, data=trickle, headers={**headers, "If-Match": publisher.etag}
        ) as response:
            assert response.status == 204, await response.text()
        async with http.delete(server.url + publisher.location) as response:  # ends the viewer too
            assert response.status == 200
        for client in (publisher, viewer):
            await client.close()


async def test_post_whep_watches_the_newest_live_session(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    """`POST /whep` names no session: it watches the newest live one (`watch_rank`). A newer
    session admitted but without its peer yet (its publisher's answer under way) is passed over,
    not answered 404 as if the stream had ended."""
    async with running_server(tiny_parts, size=64) as server:
        first = await whip_publish(http, server.url)
        await first.wait_connected()
        second = await whip_publish(http, server.url)
        await second.wait_connected()
        sessions = server.service.scheduler.sessions
        await asyncio.wait_for(_until(lambda: sessions[second.session_id].state == "live"), 20)
        starting = await server.service.scheduler.open_session(StreamParams(), kind="whip", connecting=True)
        assert starting.created > sessions[second.session_id].created > sessions[first.session_id].created
        viewer = await whep_view(http, server.url)
        assert viewer.location.startswith(f"/whep/{second.session_id}/")
        await viewer.wait_connected()
        await viewer.received.wait_for(2, timeout=20)  # type: ignore[union-attr]
        for client in (first, second, viewer):
            await client.close()


async def test_post_whep_with_nothing_live_is_404(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    """No session, or only one still making its answer: 404 with a JSON body, not "session has ended"."""
    async with running_server(tiny_parts, size=64) as server:
        for _ in range(2):
            offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
            async with http.post(server.url + "/whep", data=offer, headers={"Content-Type": "application/sdp"}) as r:
                assert r.status == 404 and (await r.json()) == {"error": "no session is live"}
            await server.service.scheduler.open_session(StreamParams(), kind="whip", connecting=True)


async def _until(check) -> None:  # type: ignore[no-untyped-def]
    while not check():
        await asyncio.sleep(0.05)
