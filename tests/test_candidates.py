"""ICE candidates in real offers: end-of-candidates, mDNS names, none at all; NAT 1:1 answers.

The loopback tests here replay the offers browsers send (no candidate but `a=end-of-candidates`;
only `.local` names and `a=end-of-candidates`) against a real server and a real aiortc client.
The network-namespace tests (tests/net) replay them across a routed network and a NAT.
"""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCSessionDescription

from livediff.config import nat_1to1_map
from livediff.errors import ConfigError
from livediff.transport.candidates import ACCEPT_REMOTE_REASON, accept_remote, announce
from tests.server_fixtures import MDNS_HOST, CameraTrack, Client, new_peer, prefer, replay_gathered, running_server

OFFER = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n"
    "a=rtpmap:96 VP8/90000\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\n"
    f"a=candidate:1 1 udp 2122260223 {MDNS_HOST} 50000 typ host\r\n"
    "a=candidate:2 1 udp 1686052607 198.51.100.7 50001 typ srflx raddr 0.0.0.0 rport 0\r\n"
    "a=end-of-candidates\r\na=fingerprint:sha-256 AA:BB\r\na=setup:actpass\r\n"
)


def test_accept_remote_drops_end_of_candidates_and_mdns_names_only() -> None:
    kept = accept_remote(OFFER)
    assert "a=end-of-candidates" not in kept
    assert MDNS_HOST not in kept
    assert "typ srflx" in kept
    assert kept.replace("\r\n", "\n").splitlines() == [
        line for line in OFFER.replace("\r\n", "\n").splitlines()
        if line != "a=end-of-candidates" and MDNS_HOST not in line
    ]  # fmt: skip
    assert kept.endswith("\r\n") and "\n" not in kept.replace("\r\n", "")


def test_announce_maps_host_candidates_and_the_connection_line() -> None:
    answer = (
        "v=0\r\nm=video 40000 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 10.0.0.5\r\n"
        "a=candidate:a 1 udp 2130706431 10.0.0.5 40000 typ host\r\n"
        "a=candidate:b 1 udp 2130706431 127.0.0.1 40001 typ host\r\n"
        "a=candidate:c 1 udp 1694498815 198.51.100.9 40002 typ srflx raddr 10.0.0.5 rport 40000\r\n"
        "a=candidate:d 1 udp 2130706431 fd00::5 40003 typ host\r\n"
    )
    mapped = announce(answer, nat_1to1_map(["203.0.113.7"]))
    assert "c=IN IP4 203.0.113.7" in mapped
    assert "a=candidate:a 1 udp 2130706431 203.0.113.7 40000 typ host" in mapped  # same port
    assert "127.0.0.1 40001" in mapped  # loopback is not mapped
    assert "198.51.100.9 40002 typ srflx raddr 10.0.0.5" in mapped  # only host candidates
    assert "fd00::5 40003" in mapped  # IPv6 needs its own entry
    explicit = announce(answer, nat_1to1_map(["10.0.0.5=203.0.113.8", "fd00::5=2001:db8::5"]))
    assert "203.0.113.8 40000 typ host" in explicit and "2001:db8::5 40003 typ host" in explicit
    assert announce(answer, {}) == answer


@pytest.mark.parametrize("entry", ["nope", "10.0.0.5=2001:db8::1", "2001:db8::1", "10.0.0.5=x"])
def test_nat_1to1_entries_are_checked(entry: str) -> None:
    with pytest.raises(ConfigError, match="nat_1to1"):
        nat_1to1_map([entry])


async def _offer_pair() -> tuple[Client, Client]:
    """A sendrecv offerer and a plain aiortc answerer (no livediff in between)."""
    offerer = Client(pc=new_peer(), camera=CameraTrack())
    prefer(offerer.pc.addTransceiver(offerer.camera, direction="sendrecv"), "VP8")
    await offerer.pc.setLocalDescription(await offerer.pc.createOffer())
    answerer = Client(pc=new_peer())
    return offerer, answerer


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(60)
async def test_aiortc_still_fails_offers_that_end_candidates_with_none_usable() -> None:
    """The behaviour `accept_remote` works around. If this fails, aiortc/aioice now connect such
    offers by themselves: check `livediff.transport.candidates` and drop what is no longer needed."""
    offerer, answerer = await _offer_pair()
    try:
        offer = replay_gathered(offerer.pc.localDescription.sdp, "none")
        await answerer.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await answerer.pc.setLocalDescription(await answerer.pc.createAnswer())
        await asyncio.sleep(0.5)
        answer = answerer.pc.localDescription.sdp
        assert "a=candidate:" not in answer, f"aiortc moved: {ACCEPT_REMOTE_REASON} no longer holds"
        assert answerer.pc.iceConnectionState in ("failed", "closed", "new"), answerer.pc.iceConnectionState
        # ... while the same offer without the end-of-candidates line connects (peer-reflexive)
        await offerer.close()
        await answerer.close()
        offerer, answerer = await _offer_pair()
        offer = accept_remote(replay_gathered(offerer.pc.localDescription.sdp, "none"))
        await answerer.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await answerer.pc.setLocalDescription(await answerer.pc.createAnswer())
        assert "a=candidate:" in answerer.pc.localDescription.sdp
        await offerer.pc.setRemoteDescription(answerer.pc.localDescription)
        await offerer.wait_connected()
    finally:
        await offerer.close()
        await answerer.close()


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["none", "mdns"])
async def test_offers_cut_short_by_end_of_candidates_connect(tiny_parts, http, mode: str) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = Client(pc=new_peer(), camera=CameraTrack())
        prefer(client.pc.addTransceiver(client.camera, direction="sendrecv"), "VP8")
        client.receive_video()
        await client.pc.setLocalDescription(await client.pc.createOffer())
        offer = replay_gathered(client.pc.localDescription.sdp, mode)
        assert "a=end-of-candidates" in offer and ("a=candidate:" in offer) == (mode == "mdns")
        async with http.post(server.url + "/offer", json={"sdp": offer, "type": "offer"}) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert "a=candidate:" in answer["sdp"], "the answer must carry the server's candidates"
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        try:
            await client.wait_connected(timeout=15)
            assert client.received is not None
            await client.received.wait_for(3, timeout=20)
        finally:
            await client.close()
