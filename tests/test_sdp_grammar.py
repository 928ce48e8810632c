"""Offers the way their senders write them (RFC 8866/8285/8843 grammar aiortc's parser mis-reads):
each form is rewritten before aiortc parses the offer, and a real publisher that writes them streams."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest
from aiortc import RTCSessionDescription
from aiortc.sdp import MediaDescription, SessionDescription

from livediff.transport.client import Client, new_peer, prefer
from livediff.transport.sdp_grammar import check_aiortc_parses, normalize, normalize_line
from tests.server_fixtures import CameraTrack, running_server, strip_candidates

BASE = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n"
    "a=rtpmap:96 H264/90000\r\na=fmtp:96 profile-level-id=42e01f;packetization-mode=1\r\n"
    "a=rtpmap:97 VP8/90000\r\na=ssrc:11 cname:c\r\n"
    "a=setup:actpass\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\na=sendonly\r\na=rtcp-mux\r\n"
)


def h264(media: MediaDescription) -> dict[str, object]:
    return dict(media.rtp.codecs[0].parameters)


# (what replaces a line of BASE, the line, what the parse must show), one per grammar form
CASES: list[tuple[str, str, str, Callable[[MediaDescription], bool]]] = [
    (  # RFC 6464 4: an extension attribute (liblinphone, Membrane)
        "a=mid:0",
        "a=mid:0\r\na=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level vad=on",
        "extmap with vad=on",
        lambda m: (
            [(e.id, e.uri) for e in m.rtp.headerExtensions] == [(2, "urn:ietf:params:rtp-hdrext:ssrc-audio-level")]
        ),
    ),
    (  # RFC 8285 8's own example: an extension attribute after the URI
        "a=mid:0",
        "a=mid:0\r\na=extmap:6 urn:ietf:params:rtp-hdrext:toffset short",
        "extmap with short",
        lambda m: [(e.id, e.uri) for e in m.rtp.headerExtensions] == [(6, "urn:ietf:params:rtp-hdrext:toffset")],
    ),
    (  # RFC 8285 5: a direction and an attribute
        "a=mid:0",
        "a=mid:0\r\na=extmap:3/sendonly urn:ietf:params:rtp-hdrext:sdes:mid x y",
        "extmap with a direction and attributes",
        lambda m: [(e.id, e.uri) for e in m.rtp.headerExtensions] == [(3, "urn:ietf:params:rtp-hdrext:sdes:mid")],
    ),
    (  # RFC 4855 3 / RFC 6838 4.3: spaces after ';', names in any case
        "a=fmtp:96 profile-level-id=42e01f;packetization-mode=1",
        "a=fmtp:96 Profile-Level-Id=42e01f; PACKETIZATION-MODE=1",
        "fmtp with a space and upper-case names",
        lambda m: h264(m) == {"profile-level-id": "42e01f", "packetization-mode": "1"},
    ),
    (  # an a=fmtp line with no parameters
        "a=rtpmap:97 VP8/90000",
        "a=rtpmap:97 VP8/90000\r\na=fmtp:97",
        "fmtp without parameters",
        lambda m: m.rtp.codecs[1].parameters == {},
    ),
    (  # RFC 5576 4.1: a source attribute without a value
        "a=ssrc:11 cname:c",
        "a=ssrc:11 cname:c\r\na=ssrc:11 x-flag",
        "ssrc attribute without a value",
        lambda m: [(s.ssrc, s.cname) for s in m.ssrc] == [(11, "c")],
    ),
    (  # RFC 8866 5.14: a port count
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "m=video 9/2 UDP/TLS/RTP/SAVPF 96 97",
        "m-line with a port count",
        lambda m: m.port == 9 and m.kind == "video",
    ),
    (  # RFC 4145 4 with RFC 5234 2.3: roles are case-insensitive
        "a=setup:actpass",
        "a=setup:ACTPASS",
        "setup role in upper case",
        lambda m: m.dtls is not None and m.dtls.role == "auto",
    ),
    (  # trailing whitespace
        "a=setup:actpass",
        "a=setup:actpass \t",
        "trailing whitespace",
        lambda m: m.dtls is not None and m.dtls.role == "auto",
    ),
]


@pytest.mark.parametrize(("old", "new", "what", "reads_right"), CASES, ids=[c[2] for c in CASES])
def test_each_form_aiortc_misreads_is_rewritten(
    old: str, new: str, what: str, reads_right: Callable[[MediaDescription], bool]
) -> None:
    assert old in BASE
    sdp = BASE.replace(old, new, 1)
    try:  # aiortc alone raises or reads a wrong value (if this fails, aiortc learnt the form)
        misread = not reads_right(SessionDescription.parse(sdp).media[0])
    except Exception:
        misread = True
    assert misread, f"aiortc now reads {what!r} right: the rewrite may go"
    assert reads_right(SessionDescription.parse(normalize(sdp)).media[0]), normalize(sdp)


def test_normalize_leaves_what_aiortc_reads_alone() -> None:
    assert normalize(BASE) is BASE
    extmap = "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid"
    assert normalize_line(extmap) == extmap
    # base64 values keep their case; only the names are lower-cased
    assert normalize_line("a=fmtp:96 sprop-parameter-sets=Z0IAH5Wo,aM48gA==; Level-Asymmetry-Allowed=1") == (
        "a=fmtp:96 sprop-parameter-sets=Z0IAH5Wo,aM48gA==;level-asymmetry-allowed=1"
    )
    assert normalize_line("a=ssrc:11 msid:stream track") == "a=ssrc:11 msid:stream track"


def test_aiortc_still_parses_the_rewritten_forms() -> None:
    check_aiortc_parses()  # raises AiortcInternalsError naming what moved


def as_written_by_other_senders(sdp: str) -> str:
    """A real offer with its extmaps, fmtp lines and roles written the other valid ways."""
    out = []
    for line in sdp.splitlines():
        if match := re.fullmatch(r"a=extmap:(\d+) (\S+)", line):
            extension_id, uri = match.groups()
            line = f"a=extmap:{extension_id}/sendrecv {uri} short" if int(extension_id) % 2 else f"{line} vad=on"
        elif line.startswith("a=fmtp:"):
            line = line.replace(";", "; ").replace("packetization-mode", "Packetization-Mode")
        elif line == "a=setup:actpass":
            line = "a=setup:ACTPASS "
        out.append(line)
    return "".join(f"{line}\r\n" for line in out)


@pytest.mark.usefixtures("loopback_ice")
@pytest.mark.timeout(120)
async def test_a_publisher_writing_the_other_forms_streams(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from aiortc.mediastreams import AudioStreamTrack

    async with running_server(tiny_parts, size=64) as server:
        client = Client(pc=new_peer(), camera=CameraTrack())
        prefer(client.pc.addTransceiver(client.camera, direction="sendrecv"), "H264")
        client.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        client.receive_video()
        await client.pc.setLocalDescription(await client.pc.createOffer())
        offer = as_written_by_other_senders(strip_candidates(client.pc.localDescription.sdp))
        assert "vad=on" in offer and " short" in offer and "; " in offer
        async with http.post(server.url + "/whip", data=offer, headers={"Content-Type": "application/sdp"}) as response:
            text = await response.text()
            assert response.status == 201, text
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        assert "H264" in text  # the H.264 mode was read despite the spelling
        try:
            await client.wait_connected()
            assert client.received is not None
            await client.received.wait_for(3)  # frames went in and came back transformed
        finally:
            await client.close()
        for _ in range(200):
            if not server.service.scheduler.sessions:
                break
            await asyncio.sleep(0.05)
