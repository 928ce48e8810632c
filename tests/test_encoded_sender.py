"""Tests for livediff.transport.encoded_sender: the aiortc internals the fanout relies on.

Real encoders, real senders of real peer connections, real RTCP packets. If aiortc moves what
the module relies on, `check_aiortc_internals` or one of these fails, naming what.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs import CODECS, depayload, get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_FIR, RTCP_PSFB_PLI, RtcpPsfbPacket, pack_remb_fci

from livediff.synthetic import SyntheticCamera
from livediff.transport.encoded_sender import (
    BitstreamEncoder,
    check_aiortc_internals,
    feed_packets,
    is_keyframe,
)
from livediff.transport.peer import negotiated_codec

CODEC = {c.mimeType.lower(): c for c in CODECS["video"]}


def frames(count: int, size: int = 96) -> list[av.VideoFrame]:
    out = []
    for i, rgb in enumerate(SyntheticCamera(size, size).frames(count)):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        out.append(frame)
    return out


def test_the_internals_are_where_the_module_expects_them() -> None:
    check_aiortc_internals()


@pytest.mark.parametrize("mime", ["video/vp8", "video/h264"])
def test_encoded_once_packed_by_any_sender_decodes(mime: str) -> None:
    codec: RTCRtpCodecParameters = CODEC[mime]
    encoder = BitstreamEncoder(codec)
    decoder = get_decoder(codec)
    source = frames(12)
    keyframes = []
    for i, frame in enumerate(source):
        expected, pts = frame.to_ndarray(format="rgb24"), frame.pts
        packet, keyframe = encoder.encode(frame, force_keyframe=i == 8)
        assert packet is not None and abs(packet.pts - pts) <= 1  # 90 kHz (H.264 rounds through microseconds)
        keyframes.append(keyframe)
        # what a fed sender does: its own encoder's pack(), then the receiver depayloads and decodes
        from aiortc.codecs import get_encoder

        payloads, timestamp = get_encoder(codec).pack(packet)
        assert timestamp == packet.pts
        data = b"".join(depayload(codec, p) for p in payloads)
        (decoded,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        assert np.abs(decoded.to_ndarray(format="rgb24").astype(int) - expected).mean() < 12
    assert keyframes[0] and keyframes[8] and not any(keyframes[1:8]), keyframes


def test_is_keyframe_reads_the_bitstream() -> None:
    assert is_keyframe("video/vp8", bytes([0x10, 0x02, 0x00]))  # frame tag bit 0 = 0: key frame
    assert not is_keyframe("video/vp8", bytes([0x11, 0x02, 0x00]))
    sps, idr, slice_ = b"\x00\x00\x00\x01\x67\x42", b"\x00\x00\x01\x65\x88", b"\x00\x00\x00\x01\x41\x9a"
    assert is_keyframe("video/h264", sps + idr) and is_keyframe("video/h264", idr)
    assert not is_keyframe("video/h264", slice_) and not is_keyframe("video/h264", b"")


async def test_a_fed_sender_reports_remb_and_keyframe_requests() -> None:
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    offerer.addTransceiver("video", direction="recvonly")
    transceiver = answerer.addTransceiver("video", direction="sendonly")
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    codec = negotiated_codec(transceiver)
    assert codec is not None
    sender = transceiver.sender
    bitrates: list[int] = []
    requests: list[str] = []
    feed_packets(sender, codec, bitrates.append, lambda: requests.append("keyframe"))
    for fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
        await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=fmt, ssrc=1, media_ssrc=sender._ssrc))
    remb = pack_remb_fci(700_000, [sender._ssrc])
    await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=remb))
    assert requests == ["keyframe", "keyframe"]
    assert len(bitrates) == 1 and abs(bitrates[0] - 700_000) < 700_000 * 0.01
    with pytest.raises(RuntimeError):  # once fed, never fed twice
        feed_packets(sender, codec, bitrates.append, lambda: None)
    await offerer.close()
    await answerer.close()
