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


def test_connecting_slots_give_way_oldest_first_and_live_slots_are_never_taken() -> None:
    from livediff.admission import Admission, AdmissionError

    slots = Admission(max_live=2, max_connecting=3, what="sessions")
    assert [slots.admit(k) for k in "abc"] == [None, None, None]
    assert slots.admit("d") == "a"  # the oldest peer that has not connected gives way
    assert slots.connected("b") and slots.connected("c")
    assert not slots.connected("a"), "an evicted peer must not take a live slot"
    assert slots.live == 2 and slots.connecting == 1
    with pytest.raises(AdmissionError) as refused:
        slots.admit("e")  # every live slot holds a connected peer
    assert refused.value.retry_after > 0 and "2 connected sessions" in str(refused.value)
    assert not slots.connected("d"), "no live slot left: the late peer is refused on connect"
    slots.release("b")
    assert slots.admit("e") is None and slots.connected("e")
    assert slots.connected("e"), "connected() is idempotent for a live peer"
    slots.release("e")
    slots.release("nobody")  # a no-op
    assert slots.live == 1 and slots.connecting == 0


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
    async with running_server(tiny_parts, size=64) as server:  # the default limits: 4 sessions, 16 viewers
        settings = server.service.settings
        for burst in (4, 16):  # as many as the session limit, and more than the connecting budget
            statuses = [await abandoned_offer(http, server.url, "/offer") for _ in range(burst)]
            assert set(statuses) == {200}, statuses
            waited = await until_connected(http, server.url, "/offer", give_up_s=5)
            assert waited < 5
        assert len(server.service.scheduler.sessions) <= settings.max_connecting + 1
        # viewers: as many offers that never connect as a session's viewer limit
        publisher = await whip_publish(http, server.url, CameraTrack(fps=30))
        await publisher.wait_connected()
        statuses = [await abandoned_offer(http, server.url, f"/whep/{publisher.session_id}") for _ in range(16)]
        assert set(statuses) == {201}, statuses
        waited = await until_connected(http, server.url, f"/whep/{publisher.session_id}", give_up_s=5)
        assert waited < 5
        session = server.service.scheduler.sessions[publisher.session_id]
        assert len(session.viewers) <= settings.max_connecting + 1
        await publisher.close()


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(120)
async def test_connected_sessions_keep_their_slots_and_the_limit_holds(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_sessions=1, max_connecting=2) as server:
        sessions = server.service.scheduler.sessions
        # two offers for the one slot: both answered; the first to connect gets it, the other is ended
        first = await offer_client(http, server.url, CameraTrack(fps=30))
        second_pc = new_peer()
        second_pc.addTransceiver(CameraTrack(fps=30), direction="sendrecv")
        await second_pc.setLocalDescription(await second_pc.createOffer())
        async with http.post(
            server.url + "/offer", json={"sdp": second_pc.localDescription.sdp, "type": "offer"}
        ) as response:
            assert response.status == 200
            second_answer = await response.json()
        await first.wait_connected()
        await second_pc.setRemoteDescription(RTCSessionDescription(sdp=second_answer["sdp"], type="answer"))
        deadline = time.monotonic() + 15
        while second_answer["session_id"] in sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert list(sessions) == [first.session_id]
        # the live limit: a third offer is refused while the first is connected
        async with http.post(
            server.url + "/offer", json={"sdp": second_pc.localDescription.sdp, "type": "offer"}
        ) as response:
            body = await response.json()
            assert response.status == 503 and int(response.headers["Retry-After"]) > 0
            assert "connected sessions" in body["error"]
        assert first.received is not None
        frames = len(first.received.times)
        await first.received.wait_for(frames + 5)  # the connected session never noticed
        await first.close()
        await second_pc.close()


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(120)
async def test_the_oldest_offer_that_never_connected_gives_way(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_sessions=4, max_connecting=2) as server:
        sessions = server.service.scheduler.sessions
        ids = []
        for _ in range(3):
            assert await abandoned_offer(http, server.url, "/whip") == 201
            ids.append(next(i for i in sessions if i not in ids))
            if len(ids) == 1:
                evicted = weakref.ref(sessions[ids[0]])
        deadline = time.monotonic() + 5
        while ids[0] in sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert list(sessions) == ids[1:]
        assert not any(key.startswith(ids[0]) for key in server.service.resources)
        assert evicted() is not None and evicted().closed  # type: ignore[union-attr]
        alive = await wait_unreachable({"evicted": evicted})
        assert not alive, referrer_chain(evicted())
