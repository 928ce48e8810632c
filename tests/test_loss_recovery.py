"""Tests for livediff.transport.loss_recovery, on real VP8/H.264 frames from aiortc's encoders.

Packets are built as aiortc's sender and receiver build them (`test_marker_jitterbuffer.packetize`);
time is a hand-driven clock, so the rules are checked exactly and nothing waits.
"""

from __future__ import annotations

import asyncio
import fractions
import struct
from types import SimpleNamespace
from typing import Any

import av
import pytest
from aiortc.codecs import CODECS, get_decoder, get_encoder
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RTCP_PSFB_FIR, RtcpPsfbPacket, RtpPacket

from livediff.transport.loss_recovery import (
    AiortcInternalsError,
    LossRecovery,
    NackScheduler,
    RecoveringJitterBuffer,
    RecoverySettings,
    check_aiortc_internals,
    install,
)
from tests.test_marker_jitterbuffer import EncodedStream, _make_images, packetize

N_FRAMES = 30
KEYFRAME_AT = 20
FRAME_S = 1 / 30


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _encode_with_keyframe(codec_name: str) -> EncodedStream:
    """N_FRAMES real frames; keyframes at 0 and KEYFRAME_AT (as after a PLI)."""
    codec = next(c for c in CODECS["video"] if c.name == codec_name)
    encoder = get_encoder(codec)
    encoder.target_bitrate = 1_500_000  # type: ignore[attr-defined]
    images = _make_images(N_FRAMES)
    frames = []
    for i, img in enumerate(images):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame, force_keyframe=i == KEYFRAME_AT)
        frames.append((payloads, timestamp))
    return EncodedStream(codec=codec, frames=frames, images=images)


_streams: dict[str, EncodedStream] = {}


@pytest.fixture(params=["VP8", "H264"])
def stream(request: pytest.FixtureRequest) -> EncodedStream:
    if request.param not in _streams:
        _streams[request.param] = _encode_with_keyframe(request.param)
    return _streams[request.param]


def _buffer(stream: EncodedStream, clock: Clock) -> RecoveringJitterBuffer:
    recovery = LossRecovery(clock=clock)
    mime = stream.codec.mimeType.lower()
    return RecoveringJitterBuffer(recovery, lambda pt: mime)


def _feed(
    buffer: JitterBuffer, frames: list[list[RtpPacket]], lost: set[int], clock: Clock | None, step: float = FRAME_S
) -> tuple[list[tuple[int, bytes]], list[int]]:
    """Feed every packet but the `lost` sequence numbers, a frame interval apart; -> (emitted
    (frame index, data)), frame indices whose packets raised the PLI flag)."""
    index_of = {f[0].timestamp: i for i, f in enumerate(frames)}
    emitted, plis = [], []
    for i, packets in enumerate(frames):
        for packet in packets:
            if packet.sequence_number in lost:
                continue
            pli, frame = buffer.add(packet)
            if pli:
                plis.append(i)
            if frame is not None:
                emitted.append((index_of[frame.timestamp], frame.data))
        if clock is not None:
            clock.now += step
    return emitted, plis


def _decodes(stream: EncodedStream, datas: list[bytes]) -> int:
    """Frames a fresh decoder makes of `datas` (an error raises)."""
    decoder = get_decoder(stream.codec)
    return sum(len(decoder.decode(SimpleNamespace(data=d, timestamp=0))) for d in datas)  # type: ignore[arg-type]


def test_the_installed_aiortc_is_what_the_patch_expects() -> None:
    check_aiortc_internals()


def test_a_receiver_without_the_private_attributes_fails_loudly() -> None:
    with pytest.raises(AiortcInternalsError, match="loss_recovery"):
        install(SimpleNamespace())  # type: ignore[arg-type]


def test_a_missing_packet_is_nacked_again_until_its_deadline_and_rtt_is_measured() -> None:
    clock = Clock()
    recovery = LossRecovery(clock=clock)
    nacks = NackScheduler(recovery)
    sent: list[tuple[float, set[int]]] = []

    def add(seq: int) -> None:
        if nacks.add(RtpPacket(sequence_number=seq)):
            sent.append((clock.now, set(nacks.missing)))

    add(65534)
    add(1)  # 65535 and 0 missing (across the wrap)
    for seq in range(2, 40):
        clock.now += 0.01
        add(seq)
    assert sent[0] == (0.0, {65535, 0})
    times = [t for t, _ in sent]
    deadline, rtt = recovery.hole_deadline, recovery.rtt
    assert len(sent) >= 2 and all(b - a >= recovery.nack_interval - 1e-9 for a, b in zip(times, times[1:]))
    assert all(t + rtt < deadline for t in times)  # never asked when the answer would come too late
    assert recovery.stats.packets_missed == 2 and recovery.stats.nacks_sent == len(sent)
    assert recovery.holes == {}  # past the deadline: no longer asked for

    # a retransmission of a packet NACKed once gives a round-trip sample; one NACKed twice does not
    clock.now = 10.0
    add(41)  # 40 missing, NACKed at 10.0
    clock.now = 10.03
    add(40)
    assert recovery.rtt_s == pytest.approx(0.03)
    assert recovery.stats.packets_recovered == 1


def test_a_hole_is_given_up_at_its_deadline_and_decoding_resumes_on_the_next_keyframe(stream: EncodedStream) -> None:
    clock = Clock()
    buffer = _buffer(stream, clock)
    frames = packetize(stream)
    lost = {frames[5][0].sequence_number}  # never comes back
    emitted, plis = _feed(buffer, frames, lost, clock)
    indices = [i for i, _ in emitted]
    # frames before the hole, then nothing until the keyframe, then every frame
    assert indices == [*range(5), *range(KEYFRAME_AT, N_FRAMES - 1)] or indices == [
        *range(5),
        *range(KEYFRAME_AT, N_FRAMES),
    ]
    stats = buffer.recovery.stats
    assert stats.frames_dropped_incomplete == 1 and stats.packets_lost == 1
    assert stats.frames_dropped_undecodable == KEYFRAME_AT - 6
    # keyframe asked for when the hole was given up (about the deadline after it), then rate-limited
    assert plis and 5 + buffer.recovery.hole_deadline / FRAME_S - 2 <= plis[0] < KEYFRAME_AT
    gaps = [b - a for a, b in zip(plis, plis[1:])]
    assert all(g * FRAME_S >= buffer.recovery.settings.keyframe_request_interval_s - 1e-9 for g in gaps)
    # what reaches the decoder decodes: frames 0-4, then from the keyframe on
    reference = {f[0].timestamp: b"".join(p._data for p in f) for f in frames}  # type: ignore[attr-defined]
    assert all(data == reference[frames[i][0].timestamp] for i, data in emitted)
    assert _decodes(stream, [d for _, d in emitted]) >= len(emitted) - 1


def test_a_complete_keyframe_ends_the_wait_at_once(stream: EncodedStream) -> None:
    clock = Clock()  # time stands still: only the keyframe can end the wait
    buffer = _buffer(stream, clock)
    frames = packetize(stream)
    lost = {frames[KEYFRAME_AT - 3][-1].sequence_number}
    emitted, _ = _feed(buffer, frames, lost, clock, step=0.0)
    indices = [i for i, _ in emitted]
    assert indices[: KEYFRAME_AT - 3] == list(range(KEYFRAME_AT - 3))
    assert KEYFRAME_AT in indices and KEYFRAME_AT - 1 not in indices
    assert buffer.recovery.stats.frames_dropped_incomplete >= 1
    # the stock buffer, fed the same, is still stuck at the hole
    stock = JitterBuffer(capacity=512, is_video=True)
    stuck, _ = _feed(stock, frames, lost, None)
    assert max(i for i, _ in stuck) < KEYFRAME_AT - 3


async def test_pli_then_fir_when_plis_go_unanswered() -> None:
    sent: list[Any] = []

    async def send_rtcp(packet: Any) -> None:
        sent.append(packet)

    class Receiver:  # what a FIR needs of aiortc's receiver (held weakly: a class, not a namespace)
        _RTCRtpReceiver__rtcp_ssrc = 77
        _send_rtcp = staticmethod(send_rtcp)

    receiver = Receiver()
    clock = Clock()
    recovery = LossRecovery(receiver, RecoverySettings(fir_after_plis=2), clock=clock)  # type: ignore[arg-type]
    recovery.media_ssrc = 1234
    assert recovery.request_keyframe(clock.now) is True  # PLI 1
    clock.now = 0.1
    assert recovery.request_keyframe(clock.now) is False  # rate-limited: nothing
    clock.now = 0.31
    assert recovery.request_keyframe(clock.now) is True  # PLI 2
    clock.now = 0.62
    assert recovery.request_keyframe(clock.now) is False  # a FIR instead
    await asyncio.sleep(0)
    assert len(sent) == 1 and isinstance(sent[0], RtcpPsfbPacket) and sent[0].fmt == RTCP_PSFB_FIR
    assert (sent[0].ssrc, sent[0].media_ssrc) == (77, 0)
    assert struct.unpack("!LB3x", sent[0].fci) == (1234, 1)
    assert (recovery.stats.plis_sent, recovery.stats.firs_sent) == (2, 1)
    recovery.keyframe_arrived()
    clock.now = 1.0
    assert recovery.request_keyframe(clock.now) is True  # answered: PLIs again


async def test_enable_for_swaps_every_video_receiver_once() -> None:
    from aiortc import RTCPeerConnection

    from livediff.transport.loss_recovery import LossStats, enable_for, stats_of

    pc = RTCPeerConnection()
    try:
        totals = LossStats()
        enable_for(pc, totals)
        video = pc.addTransceiver("video")
        audio = pc.addTransceiver("audio")
        enable_for(pc, totals)  # idempotent; the "track" event swaps receivers made later
        pc.emit("track", None)
        buffer = video.receiver._RTCRtpReceiver__jitter_buffer
        assert isinstance(buffer, RecoveringJitterBuffer)
        assert isinstance(video.receiver._RTCRtpReceiver__nack_generator, NackScheduler)
        assert not isinstance(audio.receiver._RTCRtpReceiver__jitter_buffer, RecoveringJitterBuffer)
        buffer.recovery.count("packets_missed", 3)
        assert stats_of(pc).packets_missed == 3 and totals.packets_missed == 3
    finally:
        await pc.close()
