"""Offers aiortc cannot take get a 400 naming the line or attribute (never a 500); RFC 3264 defaults are taken."""

from __future__ import annotations

import re

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from livediff.transport.whip import SdpError
from tests.server_fixtures import CameraTrack, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]


async def demo_offer() -> str:
    """What the demo page's aiortc twin offers: sendrecv video (every codec, with RTX) + `control`."""
    pc = RTCPeerConnection()
    pc.addTransceiver(CameraTrack(), direction="sendrecv")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def without(sdp: str, line: str) -> str:
    assert line in sdp.splitlines(), line
    return "".join(f"{kept}\r\n" for kept in sdp.splitlines() if kept != line)


async def test_offers_aiortc_cannot_take_get_400_naming_the_line(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    offer = await demo_offer()
    rtx = next(line for line in offer.splitlines() if re.fullmatch(r"a=rtpmap:\d+ rtx/90000", line))
    payload_type = rtx.split(":")[1].split()[0]
    apt = next(line for line in offer.splitlines() if line.startswith(f"a=fmtp:{payload_type} apt="))
    h264_fmtp = next(
        line for line in offer.splitlines() if line.startswith("a=fmtp:") and "packetization-mode=1" in line
    )
    cases = [
        # (the offer, the line or attribute the answer must name, words of the reason)
        (without(offer, "a=setup:actpass"), "a=setup", "no a=setup attribute"),  # was 500 (AttributeError)
        (without(offer, rtx), apt, "has no a=rtpmap"),  # was 500 (StopIteration)
        (offer.replace("a=setup:actpass", "a=setup:actpas"), "a=setup:actpas", "cannot parse line"),
        (without(offer, "a=rtcp-mux"), "a=rtcp-mux", "no a=rtcp-mux"),
        (offer.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 7"), "a=group:BUNDLE 0 7", "names 7"),
        # was 500 (TypeError in aiortc's int(None)): an H.264 mode with no value, found by test_offer_fuzz
        (
            offer.replace(h264_fmtp, h264_fmtp.replace("packetization-mode=1", "packetization-mode"), 1),
            h264_fmtp.split()[0],
            "packetization-mode is None",
        ),
        (
            offer.replace(h264_fmtp, h264_fmtp.replace("packetization-mode=1", "packetization-mode=7"), 1),
            h264_fmtp.split()[0],
            "packetization-mode is '7'",
        ),
    ]
    async with running_server(tiny_parts, size=64) as server:
        for sdp, line, reason in cases:
            for route, kwargs in (
                ("/whip", {"data": sdp, "headers": {"Content-Type": "application/sdp"}}),
                ("/offer", {"json": {"sdp": sdp, "type": "offer"}}),
            ):
                async with http.post(server.url + route, **kwargs) as response:
                    body = await response.json()
                    assert response.status == 400, (route, line, body)
                assert body["line"] == line and reason in body["error"], (route, body)
        assert not server.service.scheduler.sessions and not server.service.resources

        # RFC 3264 5.1: an m-section with no direction attribute is sendrecv (aiortc failed with
        # "None is not in list", answered 400)
        sdp = without(offer, "a=sendrecv")
        async with http.post(server.url + "/offer", json={"sdp": sdp, "type": "offer"}) as response:
            body = await response.json()
            assert response.status == 200, body
        assert "a=sendrecv" in body["sdp"]
        async with http.delete(server.url + f"/api/sessions/{body['session_id']}") as response:
            assert response.status == 200


async def test_check_offer_names_the_line_aiortc_chokes_on() -> None:
    from livediff.transport.offers import check_offer

    offer = await demo_offer()
    lines = offer.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("a=extmap:"))
    broken = "\r\n".join(lines[:index] + ["a=extmap:x"] + lines[index + 1 :]) + "\r\n"
    with pytest.raises(SdpError, match=rf"cannot parse line {index + 1} 'a=extmap:x': ValueError") as info:
        check_offer(broken)
    assert info.value.line == "a=extmap:x"
    huge = offer.replace("a=setup:actpass", "a=setup:" + "x" * 50_000)
    with pytest.raises(SdpError) as info:
        check_offer(huge)
    assert info.value.line is not None and "(50008 characters)" in info.value.line and len(str(info.value)) < 600
    assert check_offer(offer).media[0].kind == "video"


def test_with_directions_writes_out_the_default() -> None:
    from livediff.transport.offers import with_directions

    sdp = "v=0\r\na=sendonly\r\nm=video 9 X 96\r\na=mid:0\r\nm=audio 9 X 111\r\na=recvonly\r\n"
    assert with_directions(sdp).splitlines() == [
        "v=0",
        "a=sendonly",
        "m=video 9 X 96",
        "a=mid:0",
        "a=sendonly",
        "m=audio 9 X 111",
        "a=recvonly",
    ]
    assert "a=sendrecv" in with_directions("v=0\r\nm=video 9 X 96\r\n")
    complete = "v=0\r\nm=video 9 X 96\r\na=inactive\r\n"
    assert with_directions(complete) is complete


async def test_answer_turns_whatever_aiortc_raises_into_a_400() -> None:
    from livediff.transport.offers import negotiate, prepare_offer

    offer = prepare_offer(await demo_offer(), ("VP8", "H264"))
    pc = RTCPeerConnection()
    await pc.close()  # aiortc raises InvalidStateError for a closed peer
    with pytest.raises(SdpError, match="cannot negotiate this offer: InvalidStateError"):
        await negotiate(pc, RTCSessionDescription(sdp=offer.sdp, type="offer"))
