"""H.264 Main and High publishers: answered with their profile, their real streams (B-frames too) decoded;
offers livediff cannot receive at all get a 422 naming the codecs; the aiortc patch fails loudly if aiortc moves."""

from __future__ import annotations

import asyncio
import fractions
import importlib.metadata
import logging
import re

import aiohttp
import av
import pytest
from aiortc import MediaStreamTrack, RTCRtpCodecParameters, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecCapability

from livediff.synthetic import SyntheticCamera
from livediff.transport import h264_profiles
from livediff.transport.client import CameraTrack, Client, new_peer, offer_client
from livediff.transport.marker_jitterbuffer import AiortcInternalsError
from tests.server_fixtures import running_server, strip_candidates

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(180)]

FPS = 15
CLOCK = 90000


class EncodedCamera(MediaStreamTrack):
    """A publisher's H.264 stream as another encoder makes it: libx264 at `profile` with up to
    `b_frames` B-frames, handed to aiortc's sender as encoded packets (aiortc only packetizes them).

    `pts` lists the packets' presentation times in the order they were sent (decode order).
    """

    kind = "video"

    def __init__(self, profile: str, b_frames: int, width: int = 128, height: int = 96) -> None:
        super().__init__()
        self.camera = SyntheticCamera(height, width)
        self.codec = av.CodecContext.create("libx264", "w")
        self.codec.width, self.codec.height, self.codec.pix_fmt = width, height, "yuv420p"
        self.codec.time_base = fractions.Fraction(1, CLOCK)
        self.codec.framerate = fractions.Fraction(FPS, 1)
        self.codec.profile = profile
        self.codec.options = {"bf": str(b_frames), "g": str(2 * FPS), "preset": "veryfast"}
        self.index = 0
        self.queue: list[av.Packet] = []
        self.pts: list[int] = []
        self.sps = b""

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        while not self.queue:
            await asyncio.sleep(1 / FPS)
            frame = av.VideoFrame.from_ndarray(self.camera.frame(self.index), format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = self.index * CLOCK // FPS, self.codec.time_base
            self.index += 1
            self.queue += self.codec.encode(frame)
        packet = self.queue.pop(0)
        data = bytes(packet)
        if not self.sps and b"\x00\x00\x01\x67" in data:
            self.sps = data[data.index(b"\x00\x00\x01\x67") + 4 :][:3]
        assert packet.pts is not None
        self.pts.append(packet.pts)
        return packet


def h264_capability(profile_level_id: str) -> list[RTCRtpCodecCapability]:
    """The H.264 row of that profile-level-id, to offer it alone (`setCodecPreferences`)."""
    h264_profiles.enable()
    return [
        c
        for c in RTCRtpSender.getCapabilities("video").codecs
        if c.mimeType == "video/H264" and c.parameters.get("profile-level-id") == profile_level_id
    ]


async def publish(http: aiohttp.ClientSession, url: str, camera: EncodedCamera, profile_level_id: str) -> Client:
    """A sendrecv WHIP publisher whose only video codec is H.264 `profile_level_id`."""
    client = Client(pc=new_peer())
    transceiver = client.pc.addTransceiver(camera, direction="sendrecv")
    transceiver.setCodecPreferences(h264_capability(profile_level_id))
    client.receive_video()
    await client.pc.setLocalDescription(await client.pc.createOffer())
    offer = strip_candidates(client.pc.localDescription.sdp)
    assert re.findall(r"profile-level-id=(\w+)", offer) == [profile_level_id]
    async with http.post(url + "/whip", data=offer, headers={"Content-Type": "application/sdp"}) as response:
        text = await response.text()
        assert response.status == 201, text
        client.location = response.headers["Location"]
    client.session_id = client.location.rsplit("/", 1)[-1]
    assert re.findall(r"profile-level-id=(\w+)", text) == [profile_level_id], text  # answered with its profile
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client


@pytest.mark.parametrize(
    ("profile_level_id", "profile", "b_frames", "profile_idc"),
    [
        ("4d001f", "Main", 0, 77),
        ("640c1f", "High", 0, 100),  # what browsers offer as High (Constrained High: no B-frames)
        ("64001f", "High", 2, 100),  # what ffmpeg -profile:v high sends: B-frames
    ],
)
async def test_h264_main_and_high_streams_are_received(
    tiny_parts,
    http,
    caplog,
    profile_level_id,
    profile,  # type: ignore[no-untyped-def]
    b_frames,
    profile_idc,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiortc")
    async with running_server(tiny_parts, size=64) as server:
        camera = EncodedCamera(profile, b_frames)
        client = await publish(http, server.url, camera, profile_level_id)
        try:
            await client.wait_connected()
            assert client.received is not None
            await client.received.wait_for(6)
            session = server.service.scheduler.sessions[client.session_id]
            # the stream keeps flowing, both ways: nothing stalls after the first frames
            frames_in, frames_out = session.stats.frames_in, len(client.received.times)
            await asyncio.sleep(2.0)
            assert session.stats.frames_in - frames_in >= FPS, session.describe()
            assert len(client.received.times) - frames_out >= FPS // 2
            assert session.state == "live"
        finally:
            await client.close()
    # it was the stream asked for: that profile in the SPS, and B-frames (reordered pts) when asked
    assert camera.sps and camera.sps[0] == profile_idc, camera.sps.hex()
    reordered = any(later < earlier for earlier, later in zip(camera.pts, camera.pts[1:]))
    assert reordered == (b_frames > 0), camera.pts[:12]
    assert not [r for r in caplog.records if "failed to decode" in r.getMessage()]


def sps_profiles(data: bytes) -> list[tuple[int, int]]:
    """(profile_idc, constraint flags) of every sequence parameter set in an Annex B access unit."""
    found, start = [], 0
    while (start := data.find(b"\x00\x00\x01", start)) != -1 and start + 5 < len(data):
        if data[start + 3] & 0x1F == 7:
            found.append((data[start + 4], data[start + 5]))
        start += 3
    return found


async def test_h264_viewers_of_every_profile_share_one_encoding_they_all_decode(  # type: ignore[no-untyped-def]
    tiny_parts, http, caplog, monkeypatch
) -> None:
    """WHEP viewers whose only codec is H.264 Constrained Baseline, Main or Constrained High: each is
    answered with its own profile; the session's output is encoded once for all of them (one
    Constrained Baseline encoder, a subset of Main and High) and each one decodes it."""
    from aiortc.codecs.h264 import H264Decoder

    caplog.set_level(logging.WARNING, logger="aiortc")
    seen: list[tuple[int, int]] = []  # the SPSs the viewers' decoders got (the only H.264 decoders here)
    decode = H264Decoder.decode

    def recording(decoder, encoded_frame):  # type: ignore[no-untyped-def]
        seen.extend(sps_profiles(encoded_frame.data))
        return decode(decoder, encoded_frame)

    monkeypatch.setattr(H264Decoder, "decode", recording)
    async with running_server(tiny_parts, size=64) as server:
        publisher = await offer_client(http, server.url, CameraTrack(fps=FPS), codec="VP8")
        viewers = []
        try:
            await publisher.wait_connected()
            for profile_level_id in ("42e01f", "4d001f", "640c1f"):
                viewer = Client(pc=new_peer())
                transceiver = viewer.pc.addTransceiver("video", direction="recvonly")
                transceiver.setCodecPreferences(h264_capability(profile_level_id))
                viewer.receive_video()
                viewers.append(viewer)
                await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
                async with http.post(
                    f"{server.url}/whep/{publisher.session_id}",
                    data=viewer.pc.localDescription.sdp,
                    headers={"Content-Type": "application/sdp"},
                ) as response:
                    answer = await response.text()
                    assert response.status == 201, answer
                assert re.findall(r"profile-level-id=(\w+)", answer) == [profile_level_id], answer
                await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            for viewer in viewers:
                await viewer.wait_connected()
                assert viewer.received is not None
                await viewer.received.wait_for(10)
                assert all(frame.shape == (64, 64, 3) for frame in viewer.received.frames)
            output = server.service.outputs[publisher.session_id]
            assert sorted(output.encoders) == ["video/h264", "video/vp8"]  # one H.264 encoder for the three
        finally:
            for client in (*viewers, publisher):
                await client.close()
    # what they all got: Constrained Baseline (profile_idc 66, constraint_set1_flag 0x40)
    assert seen and all(idc == 66 and flags & 0x40 for idc, flags in seen), seen
    assert not [r for r in caplog.records if "failed to decode" in r.getMessage()]


async def test_offers_of_codecs_livediff_cannot_receive_get_422_naming_them(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = Client(pc=new_peer())
        transceiver = client.pc.addTransceiver("video", direction="sendonly")
        transceiver.setCodecPreferences(h264_capability("42e01f"))
        await client.pc.setLocalDescription(await client.pc.createOffer())
        offer = client.pc.localDescription.sdp
        await client.pc.close()
        cases = {
            "H265/90000": ("H265/90000", "level-id=93;profile-id=1;tier-flag=0;tx-mode=SRST"),
            "AV1/90000": ("AV1/90000", "level-idx=5;profile=0;tier=0"),
        }
        for expected, (rtpmap, fmtp) in cases.items():
            sdp = re.sub(r"a=rtpmap:(\d+) H264/90000", rf"a=rtpmap:\1 {rtpmap}", offer)
            sdp = re.sub(r"a=fmtp:(\d+) level-asymmetry[^\r\n]*", rf"a=fmtp:\1 {fmtp}", sdp)
            for route, kwargs in (
                ("/whip", {"data": sdp, "headers": {"Content-Type": "application/sdp"}}),
                ("/offer", {"json": {"sdp": sdp, "type": "offer"}}),
            ):
                async with http.post(server.url + route, **kwargs) as response:
                    body = await response.json()
                    assert response.status == 422, body
                assert body["kind"] == "video" and body["offered"] == [expected], body
                accepted = " ".join(body["accepted"])
                for name in ("VP8/90000", "H264/90000 Constrained Baseline", "H264/90000 Main", "H264/90000 High"):
                    assert name in accepted, body
                assert expected in body["error"] and "no video codec in common" in body["error"]
        assert not server.service.scheduler.sessions  # refused before a session was opened


def test_aiortc_internals_check_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiortc import codecs as aiortc_codecs
    from aiortc import rtcpeerconnection

    h264_profiles.check_aiortc_internals()  # the installed aiortc is what the patch was written for
    h264_profiles.enable()
    assert h264_profiles.enabled()
    rows = len(aiortc_codecs.CODECS["video"])
    h264_profiles.enable()  # idempotent
    assert len(aiortc_codecs.CODECS["video"]) == rows
    # aiortc negotiates a Main-only offer with the Main row, at the offer's payload type
    remote = [
        RTCRtpCodecParameters(
            mimeType="video/H264",
            clockRate=CLOCK,
            payloadType=120,
            parameters={"packetization-mode": 1, "profile-level-id": "4d0032"},
        )
    ]
    common = rtcpeerconnection.find_common_codecs(aiortc_codecs.CODECS["video"], remote)
    assert [(c.payloadType, c.parameters["profile-level-id"]) for c in common] == [(120, "4d001f")]

    version = importlib.metadata.version("aiortc")
    with monkeypatch.context() as patch:
        patch.setattr(rtcpeerconnection, "CODECS", {})
        with pytest.raises(AiortcInternalsError, match=f"aiortc {version}: .*no longer negotiates"):
            h264_profiles.check_aiortc_internals()
    with monkeypatch.context() as patch:
        patch.setattr(
            aiortc_codecs, "CODECS", {"video": [c for c in aiortc_codecs.CODECS["video"] if c.mimeType != "video/H264"]}
        )
        patch.setattr(rtcpeerconnection, "CODECS", aiortc_codecs.CODECS)
        with pytest.raises(AiortcInternalsError, match="no H.264 row"):
            h264_profiles.check_aiortc_internals()
    with monkeypatch.context() as patch:
        patch.delattr(rtcpeerconnection, "is_codec_compatible")
        with pytest.raises(AiortcInternalsError, match="is_codec_compatible is gone"):
            h264_profiles.check_aiortc_internals()
    with monkeypatch.context() as patch:
        patch.setattr(rtcpeerconnection, "is_codec_compatible", lambda a, b: a.mimeType == b.mimeType)
        with pytest.raises(AiortcInternalsError, match="no longer matched by profile"):
            h264_profiles.check_aiortc_internals()
