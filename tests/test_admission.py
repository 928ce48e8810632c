"""Admission of peers that first connect, then live (`livediff.admission`), and what it buys: abandoned
offers cannot keep a real client out."""

from __future__ import annotations

import asyncio
import time
import weakref

import aiohttp
import pytest
from aiortc import RTCSessionDescription

from livediff.transport.client import abandoned_offer
from tests.server_fixtures import CameraTrack, new_peer, offer_client, running_server, whip_publish
from tests.test_server_lifecycle import referrer_chain, wait_unreachable


def test_a_slot_is_kept_for_its_peer_and_given_away_only_past_its_grace() -> None:
    from livediff.admission import Admission, AdmissionError

    now = [0.0]
    slots = Admission(max_live=2, max_connecting=3, what="sessions", grace_s=3.0, clock=lambda: now[0])
    assert [slots.admit(k) for k in "ab"] == [None, None]
    with pytest.raises(AdmissionError) as refused:  # a 201 is a promise: no third offer while a, b may connect
        slots.admit("c")
    assert refused.value.retry_after == 1  # no answer out yet: poll
    slots.answered("a")
    slots.answered("b")
    now[0] = 1.2
    with pytest.raises(AdmissionError) as refused:
        slots.admit("c")
    assert refused.value.retry_after == 2 and "not connected yet" in str(refused.value)
    assert slots.connected("b"), "a peer that connects in its grace keeps its slot"
    now[0] = 3.0
    assert slots.admit("c") == "a"  # past its grace, the oldest not connected gives way
    assert not slots.connected("a"), "an evicted peer must not take a slot"
    assert slots.live == 1 and slots.connecting == 1
    assert slots.connected("c")
    with pytest.raises(AdmissionError) as refused:
        slots.admit("d")  # every slot holds a connected peer
    assert refused.value.retry_after > 0 and "2 connected sessions" in str(refused.value)
    slots.release("b")
    assert slots.admit("e") is None and slots.connected("e")
    assert slots.connected("e"), "connected() is idempotent for a live peer"
    slots.release("e")
    slots.release("nobody")  # a no-op
    assert slots.live == 1 and slots.connecting == 0


def test_max_connecting_caps_peers_not_connected_yet() -> None:
    from livediff.admission import Admission, AdmissionError

    now = [0.0]
    slots = Admission(max_live=8, max_connecting=2, what="viewers", grace_s=3.0, clock=lambda: now[0])
    for key in "ab":
        slots.admit(key)
        slots.answered(key)
    with pytest.raises(AdmissionError):
        slots.admit("c")
    now[0] = 5.0
    assert slots.admit("c") == "a"


async def until_connected(http: aiohttp.ClientSession, url: str, path: str, give_up_s: float) -> float:
    """A well-behaved client: offers, retries a 503 every second, applies the answer; seconds to connect."""
    start = time.monotonic()
    while True:
        pc = new_peer()
        if path.startswith("/whep"):
            pc.addTransceiver("video", direction="recvonly")
        else:
            pc.addTransceiver(CameraTrack(fps=30), direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        if path == "/offer":
            request = http.post(url + path, json={"sdp": pc.localDescription.sdp, "type": "offer"})
        else:
            request = http.post(url + path, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"})
        async with request as response:
            text = await response.text()
            status = response.status
        if status == 503:
            await pc.close()
            assert time.monotonic() - start < give_up_s, f"still refused after {give_up_s:g} s: {text}"
            await asyncio.sleep(1)
            continue
        assert status in (200, 201), text
        sdp = (await response.json())["sdp"] if path == "/offer" else text
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        while pc.connectionState != "connected":
            assert pc.connectionState not in ("failed", "closed"), pc.connectionState
            assert time.monotonic() - start < give_up_s, f"not connected after {give_up_s:g} s"
            await asyncio.sleep(0.05)
        await pc.close()
        return time.monotonic() - start


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(180)
async def test_abandoned_offers_do_not_keep_a_real_client_out(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from livediff.admission import CONNECT_GRACE_S

    give_up_s = CONNECT_GRACE_S + 7  # the grace, a 1 s retry, and connecting on a loaded machine
    async with running_server(tiny_parts, size=64) as server:  # the default limits: 4 sessions, 16 viewers
        settings = server.service.settings
        for burst in (4, 16):  # as many as the session limit, and more
            statuses = [await abandoned_offer(http, server.url, "/offer") for _ in range(burst)]
            assert statuses[:4] == [200] * 4 and set(statuses) <= {200, 503}, statuses
            waited = await until_connected(http, server.url, "/offer", give_up_s=give_up_s)
            assert waited < give_up_s
        assert len(server.service.scheduler.sessions) <= settings.max_sessions
        # viewers: as many offers that never connect as a session's viewer limit
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        await publisher.wait_connected()
        statuses = [await abandoned_offer(http, server.url, f"/whep/{publisher.session_id}") for _ in range(16)]
        assert statuses[: settings.max_connecting] == [201] * settings.max_connecting, statuses
        assert set(statuses) <= {201, 503}, statuses
        waited = await until_connected(http, server.url, f"/whep/{publisher.session_id}", give_up_s=give_up_s)
        assert waited < give_up_s
        session = server.service.scheduler.sessions[publisher.session_id]
        assert len(session.viewers) <= settings.max_connecting + 1
        await publisher.close()


async def post_offer(http: aiohttp.ClientSession, url: str, path: str, sdp: str) -> tuple[int, str, dict[str, str]]:
    async with http.post(url + path, data=sdp, headers={"Content-Type": "application/sdp"}) as response:
        return response.status, await response.text(), dict(response.headers)


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(300)
async def test_a_burst_of_offers_gets_exactly_the_limit_of_201s_and_every_201_streams(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from livediff.transport.client import Client

    async with running_server(tiny_parts, size=64, max_sessions=4) as server:
        clients = []
        for _ in range(40):  # the offers are made first, then posted at once
            client = Client(pc=new_peer(), camera=CameraTrack(fps=15))
            client.pc.addTransceiver(client.camera, direction="sendrecv")
            client.receive_video()
            await client.pc.setLocalDescription(await client.pc.createOffer())
            clients.append(client)
        try:
            results = await asyncio.gather(
                *(post_offer(http, server.url, "/whip", c.pc.localDescription.sdp) for c in clients)
            )
            statuses = [status for status, _, _ in results]
            assert statuses.count(201) == 4 and statuses.count(503) == 36, statuses
            for status, text, headers in results:
                if status == 503:
                    assert int(headers["Retry-After"]) >= 1 and "at the limit of 4 sessions" in text, text
            admitted = [c for c, (status, _, _) in zip(clients, results) if status == 201]
            for client, (_, text, _) in zip(admitted, [r for r in results if r[0] == 201]):
                await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
            for client in admitted:  # every 201 streams: it connects and gets transformed frames back
                await client.wait_connected()
                assert client.received is not None
                await client.received.wait_for(3)
            sessions = server.service.scheduler.sessions
            assert len(sessions) == 4 and all(s.state == "live" for s in sessions.values())
            for client in admitted:
                count = len(client.received.times)  # type: ignore[union-attr]
                await client.received.wait_for(count + 3)  # type: ignore[union-attr]  # none was ended
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(120)
async def test_a_second_offer_for_the_last_slot_is_503_and_the_first_keeps_it(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_sessions=1, max_connecting=2) as server:
        sessions = server.service.scheduler.sessions
        first = await offer_client(http, server.url, CameraTrack(fps=30))
        second_pc = new_peer()
        second_pc.addTransceiver(CameraTrack(fps=30), direction="sendrecv")
        await second_pc.setLocalDescription(await second_pc.createOffer())
        # while the first may still connect (in its grace) and once it has: 503, never a 201 taken back
        for expected in ("not connected yet", "connected sessions"):
            if expected == "connected sessions":
                await first.wait_connected()
            async with http.post(
                server.url + "/offer", json={"sdp": second_pc.localDescription.sdp, "type": "offer"}
            ) as response:
                body = await response.json()
                assert response.status == 503 and int(response.headers["Retry-After"]) > 0, body
                if expected == "connected sessions" or "not connected yet" in body["error"]:
                    assert expected in body["error"], body
        assert list(sessions) == [first.session_id]
        assert first.received is not None
        frames = len(first.received.times)
        await first.received.wait_for(frames + 5)  # the connected session never noticed
        await first.close()
        await second_pc.close()


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(120)
async def test_the_oldest_offer_that_never_connected_gives_way(tiny_parts, http, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from livediff import admission

    monkeypatch.setattr(admission, "CONNECT_GRACE_S", 1.0)
    async with running_server(tiny_parts, size=64, max_sessions=4, max_connecting=2) as server:
        sessions = server.service.scheduler.sessions
        ids = []
        for _ in range(2):
            assert await abandoned_offer(http, server.url, "/whip") == 201
            ids.append(next(i for i in sessions if i not in ids))
            if len(ids) == 1:
                evicted = weakref.ref(sessions[ids[0]])
        deadline = time.monotonic() + 30
        while (status := await abandoned_offer(http, server.url, "/whip")) == 503:  # both still in their grace
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert status == 201
        ids.append(next(i for i in sessions if i not in ids))
        deadline = time.monotonic() + 5
        while ids[0] in sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert list(sessions) == ids[1:]
        assert not any(key.startswith(ids[0]) for key in server.service.resources)
        assert evicted() is not None and evicted().closed  # type: ignore[union-attr]
        alive = await wait_unreachable({"evicted": evicted})
        assert not alive, referrer_chain(evicted())


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(180)
async def test_a_burst_of_viewers_gets_exactly_the_viewer_limit_and_every_201_streams(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from livediff.transport.client import Client

    async with running_server(tiny_parts, size=64, max_viewers=2) as server:
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        viewers = []
        try:
            await publisher.wait_connected()
            for _ in range(8):
                viewer = Client(pc=new_peer())
                viewer.pc.addTransceiver("video", direction="recvonly")
                viewer.receive_video()
                await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
                viewers.append(viewer)
            path = f"/whep/{publisher.session_id}"
            results = await asyncio.gather(
                *(post_offer(http, server.url, path, v.pc.localDescription.sdp) for v in viewers)
            )
            statuses = [status for status, _, _ in results]
            assert statuses.count(201) == 2 and statuses.count(503) == 6, statuses
            admitted = [(v, text) for v, (status, text, _) in zip(viewers, results) if status == 201]
            for viewer, text in admitted:
                await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
            for viewer, _ in admitted:
                await viewer.wait_connected()
                assert viewer.received is not None
                await viewer.received.wait_for(3)
            session = server.service.scheduler.sessions[publisher.session_id]
            assert len(session.viewers) == 2
        finally:
            await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
            await publisher.close()
