"""Tests for livediff.transport.marker_jitterbuffer.

RTP packets are real: frames are encoded and packetised by aiortc's own VP8 and
H.264 encoders, and packets are built as aiortc's RTCRtpSender builds them
(one timestamp per frame, marker bit on the frame's last packet).  Results are
compared with aiortc's stock JitterBuffer fed the same packets.
"""

from __future__ import annotations

import asyncio
import fractions
import random
import time
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace

import av
import numpy as np
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    VideoStreamTrack,
)
from aiortc.codecs import CODECS, depayload, get_decoder, get_encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket
from aiortc.utils import uint32_add

from livediff.transport.marker_jitterbuffer import (
    AiortcInternalsError,
    MarkerJitterBuffer,
    check_aiortc_internals,
    enable_for,
    use_marker_completion,
)

WIDTH, HEIGHT = 640, 480
N_FRAMES = 40
TS_ORIGIN = 0xFFFF0000  # like RTCRtpSender's random origin; wraps uint32 too
BUFFER_ATTR = "_RTCRtpReceiver__jitter_buffer"


# -- real encoded frames ------------------------------------------------------


@dataclass
class EncodedStream:
    codec: RTCRtpCodecParameters
    frames: list[tuple[list[bytes], int]]  # (payloads, rtp timestamp)
    images: list[np.ndarray]  # source RGB frames


def _make_images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack(
        [xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + yy) * 255 // (WIDTH + HEIGHT)],
        axis=-1,
    ).astype(np.uint8)
    noise = rng.integers(0, 40, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    images = []
    for i in range(count):
        img = np.roll(base, 8 * i, axis=1)
        x = (20 * i) % (WIDTH - 120)
        img[100:300, x : x + 120] = (255, 50, 50)
        images.append(img + noise)
    return images


@cache
def _encode(codec_name: str) -> EncodedStream:
    codec = next(c for c in CODECS["video"] if c.name == codec_name)
    encoder = get_encoder(codec)
    encoder.target_bitrate = 1_500_000  # type: ignore[attr-defined]  # Vp8Encoder/H264Encoder
    images = _make_images(N_FRAMES)
    frames = []
    for i, img in enumerate(images):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, timestamp = encoder.encode(frame)
        assert payloads, "encoder produced no output"
        frames.append((payloads, uint32_add(TS_ORIGIN, timestamp)))
    return EncodedStream(codec=codec, frames=frames, images=images)


@pytest.fixture(scope="module", params=["VP8", "H264"])
def stream(request: pytest.FixtureRequest) -> EncodedStream:
    return _encode(request.param)


def packetize(stream: EncodedStream, first_seq: int = 1000, marker: bool = True) -> list[list[RtpPacket]]:
    """RTP packets per frame, as RTCRtpSender + RTCRtpReceiver prepare them."""
    seq = first_seq
    out = []
    for payloads, timestamp in stream.frames:
        packets = []
        for i, payload in enumerate(payloads):
            packet = RtpPacket(
                payload_type=stream.codec.payloadType or 0,
                sequence_number=seq,
                timestamp=timestamp,
                marker=int(marker and i == len(payloads) - 1),
                ssrc=1234,
                payload=payload,
            )
            # serialise/parse round trip, then depayload like the receiver
            packet = RtpPacket.parse(packet.serialize())
            packet._data = depayload(stream.codec, packet.payload)  # type: ignore[attr-defined]
            packets.append(packet)
            seq = (seq + 1) & 0xFFFF
        out.append(packets)
    return out


def reference(frames: list[list[RtpPacket]]) -> dict[int, bytes]:
    """Correctly reassembled data of every frame, by timestamp."""
    return {f[0].timestamp: b"".join(p._data for p in f) for f in frames}  # type: ignore[attr-defined]


@dataclass
class Emitted:
    index: int  # index of the packet whose add() returned the frame
    frame: JitterFrame


def feed(buffer: JitterBuffer, packets: list[RtpPacket]) -> tuple[list[Emitted], list[int]]:
    """Add packets; return emitted frames and indices of PLI requests."""
    emitted, plis = [], []
    for i, packet in enumerate(packets):
        pli, frame = buffer.add(packet)
        if pli:
            plis.append(i)
        if frame is not None:
            emitted.append(Emitted(i, frame))
    return emitted, plis


def flat(frames: list[list[RtpPacket]]) -> list[RtpPacket]:
    return [p for f in frames for p in f]


def stock() -> JitterBuffer:
    return JitterBuffer(capacity=512, is_video=True)


def decode_all(stream: EncodedStream, frames: list[JitterFrame]) -> list[av.VideoFrame]:
    decoder = get_decoder(stream.codec)
    out: list[av.VideoFrame] = []
    for frame in frames:
        out.extend(decoder.decode(JitterFrame(frame.data, frame.timestamp)))  # type: ignore[arg-type]
    return out


# -- unit tests -----------------------------------------------------------------


def test_frames_are_multi_packet(stream: EncodedStream) -> None:
    counts = [len(p) for p, _ in stream.frames]
    assert counts[0] >= 20  # keyframe
    assert sum(c >= 2 for c in counts) >= 0.9 * len(counts)
    assert max(counts[1:]) >= 4


def test_in_order_completes_on_marker(stream: EncodedStream) -> None:
    frames = packetize(stream)
    packets = flat(frames)
    buf = MarkerJitterBuffer(capacity=512)
    emitted, plis = feed(buf, packets)
    assert plis == []
    assert [e.frame.timestamp for e in emitted] == [f[0].timestamp for f in frames]

    ends = np.cumsum([len(f) for f in frames]) - 1  # index of each marker packet
    # first frame: start unknown -> stock rule, on the next frame's first packet
    assert emitted[0].index == ends[0] + 1
    # frame 1 may wait one packet when its marker packet is also the one that
    # releases frame 0 (add() returns one frame at a time)
    assert emitted[1].index in (ends[1], ends[1] + 1)
    # every later frame: on its own marker packet, not on the next frame's first
    assert [e.index for e in emitted[2:]] == list(ends[2:])
    assert buf.early_frames + buf.fallback_frames == len(frames)
    assert buf.fallback_frames <= 2

    # stock aiortc emits each frame on the next frame's first packet
    stock_emitted, _ = feed(stock(), packets)
    assert [e.index for e in stock_emitted] == list(ends[:-1] + 1)


def test_bytes_equal_stock_and_decode(stream: EncodedStream) -> None:
    frames = packetize(stream)
    ours, _ = feed(MarkerJitterBuffer(), flat(frames))
    theirs, _ = feed(stock(), flat(frames))
    assert len(theirs) == len(frames) - 1  # stock still holds the last frame
    assert [(e.frame.timestamp, e.frame.data) for e in ours[:-1]] == [(e.frame.timestamp, e.frame.data) for e in theirs]
    assert ours[-1].frame.data == reference(frames)[frames[-1][0].timestamp]

    decoded = decode_all(stream, [e.frame for e in ours])
    assert len(decoded) == len(frames)
    assert all((d.width, d.height) == (WIDTH, HEIGHT) for d in decoded)
    # sanity: the picture is the source picture (noise amplitude is 40)
    diff = np.abs(decoded[-1].to_ndarray(format="rgb24").astype(int) - stream.images[-1].astype(int)).mean()
    assert diff < 30


def test_reordered_packets(stream: EncodedStream) -> None:
    frames = packetize(stream)
    rng = random.Random(42)
    arrival: list[RtpPacket] = list(frames[0])
    sent_early: RtpPacket | None = None
    for k in range(1, len(frames)):
        pkts = [p for p in frames[k] if p is not sent_early]
        rng.shuffle(pkts)
        sent_early = None
        if k % 3 == 0 and k + 1 < len(frames):
            # the next frame's first packet overtakes this frame's last one
            sent_early = frames[k + 1][0]
            pkts.insert(len(pkts) - 1, sent_early)
        arrival += pkts
    assert sorted(p.sequence_number for p in arrival) == sorted(p.sequence_number for p in flat(frames))
    assert arrival != flat(frames)

    emitted, plis = feed(MarkerJitterBuffer(), arrival)
    ref = reference(frames)
    assert plis == []
    assert [e.frame.timestamp for e in emitted] == [f[0].timestamp for f in frames]
    assert all(e.frame.data == ref[e.frame.timestamp] for e in emitted)
    last_arrival = {p.timestamp: i for i, p in enumerate(arrival)}
    # frame 1 may wait one packet (add() returns one frame and frame 0 goes
    # out by the stock rule); every later frame comes out on its last packet
    assert emitted[1].index <= last_arrival[frames[1][0].timestamp] + 1
    assert [e.index for e in emitted[2:]] == [last_arrival[f[0].timestamp] for f in frames[2:]]
    # same bytes as stock aiortc for the same arrival order
    theirs, _ = feed(stock(), arrival)
    assert [e.frame.data for e in theirs] == [e.frame.data for e in emitted[:-1]]


def dup(packet: RtpPacket) -> RtpPacket:
    """An independent copy of a packet (a duplicate / retransmission)."""
    copy = RtpPacket.parse(packet.serialize())
    copy._data = packet._data  # type: ignore[attr-defined]
    return copy


def test_marker_less_stream_falls_back(stream: EncodedStream) -> None:
    frames = packetize(stream, marker=False)
    buf = MarkerJitterBuffer()
    ours, our_plis = feed(buf, flat(frames))
    theirs, their_plis = feed(stock(), flat(frames))
    assert our_plis == their_plis == []
    # exactly stock behaviour: each frame one frame late, same bytes
    assert [(e.index, e.frame.timestamp, e.frame.data) for e in ours] == [
        (e.index, e.frame.timestamp, e.frame.data) for e in theirs
    ]
    assert len(ours) == len(frames) - 1
    assert (buf.early_frames, buf.fallback_frames) == (0, len(frames) - 1)


@pytest.mark.parametrize("wrap_in", ["keyframe", "small_frame"])
def test_sequence_wraparound(stream: EncodedStream, wrap_in: str) -> None:
    sizes = [len(p) for p, _ in stream.frames]
    if wrap_in == "keyframe":
        first_seq = 65536 - sizes[0] // 2
        wrapped = 0
    else:
        wrapped = next(k for k in range(2, len(sizes)) if sizes[k] >= 2)
        first_seq = (65536 - sum(sizes[:wrapped]) - 1) & 0xFFFF
    frames = packetize(stream, first_seq=first_seq)
    seqs = [p.sequence_number for p in frames[wrapped]]
    assert 65535 in seqs and 0 in seqs  # this frame really straddles the wrap

    buf = MarkerJitterBuffer()
    emitted, plis = feed(buf, flat(frames))
    ref = reference(frames)
    ends = np.cumsum([len(f) for f in frames]) - 1
    assert plis == []
    assert [e.frame.timestamp for e in emitted] == [f[0].timestamp for f in frames]
    assert all(e.frame.data == ref[e.frame.timestamp] for e in emitted)
    assert [e.index for e in emitted[2:]] == list(ends[2:])
    theirs, _ = feed(stock(), flat(frames))
    assert [e.frame.data for e in theirs] == [e.frame.data for e in emitted[:-1]]
    assert len(decode_all(stream, [e.frame for e in emitted])) == len(frames)


def test_late_duplicates_not_re_emitted(stream: EncodedStream) -> None:
    frames = packetize(stream)
    arrival: list[RtpPacket] = []
    for k, frame in enumerate(frames):
        pkts = list(frame)
        if len(pkts) >= 2:
            pkts.insert(1, dup(pkts[0]))  # duplicate before completion
        if k >= 1:
            # the previous frame was emitted on its marker: a retransmission of
            # its middle packet arrives after this frame's first packet
            prev = frames[k - 1]
            pkts.insert(1, dup(prev[len(prev) // 2]))
        arrival += pkts
        arrival += [dup(frame[0]), dup(frame[-1])]  # right after emission
    buf = MarkerJitterBuffer()
    emitted, plis = feed(buf, arrival)
    ref = reference(frames)
    assert plis == []
    timestamps = [e.frame.timestamp for e in emitted]
    assert timestamps == [f[0].timestamp for f in frames]  # each exactly once
    assert all(e.frame.data == ref[e.frame.timestamp] for e in emitted)
    assert buf.early_frames >= len(frames) - 2
    theirs, _ = feed(stock(), arrival)
    assert [e.frame.data for e in theirs] == [e.frame.data for e in emitted[:-1]]


def test_padding_after_marker_discarded(stream: EncodedStream) -> None:
    """Padding-only packets (empty payload, timestamp of the last frame, as
    browsers send them) must not become an extra, empty frame: PyAV treats an
    empty packet as end-of-stream and would flush the decoder."""
    frames = packetize(stream)
    arrival: list[RtpPacket] = []
    markers: list[int] = []
    seq = 1000
    for frame in frames:
        paddings = []
        for _ in range(2):
            padding = RtpPacket(
                payload_type=frame[0].payload_type,
                timestamp=frame[0].timestamp,
                ssrc=frame[0].ssrc,
            )
            padding._data = b""  # type: ignore[attr-defined]
            paddings.append(padding)
        for packet in frame + paddings:
            packet.sequence_number = seq
            seq = (seq + 1) & 0xFFFF
            arrival.append(packet)
        markers.append(len(arrival) - 3)
    buf = MarkerJitterBuffer()
    emitted, plis = feed(buf, arrival)
    ref = reference(frames)
    assert plis == []
    assert [e.frame.timestamp for e in emitted] == [f[0].timestamp for f in frames]
    assert all(e.frame.data == ref[e.frame.timestamp] for e in emitted)
    assert [e.index for e in emitted[2:]] == markers[2:]
    assert buf.discarded_packets >= 2 * (len(frames) - 2)
    theirs, _ = feed(stock(), arrival)
    assert [e.frame.data for e in theirs] == [e.frame.data for e in emitted[:-1]]


def _lossy_setup(stream: EncodedStream, where: str) -> tuple[list[list[RtpPacket]], int, RtpPacket]:
    frames = packetize(stream)[1:]  # skip the keyframe: it exceeds capacity 64
    k = next(i for i in range(3, len(frames)) if len(frames[i]) >= 3)
    lost = {"first": 0, "middle": len(frames[k]) // 2, "marker": -1}[where]
    return frames, k, frames[k][lost]


@pytest.mark.parametrize("where", ["first", "middle", "marker"])
def test_lost_packet_never_emitted_corrupted(stream: EncodedStream, where: str) -> None:
    frames, k, lost = _lossy_setup(stream, where)
    arrival = [p for p in flat(frames) if p is not lost]
    ref = reference(frames)
    buf = MarkerJitterBuffer(capacity=64)
    ours, our_plis = feed(buf, arrival)
    theirs, their_plis = feed(JitterBuffer(capacity=64, is_video=True), arrival)

    # the hole is never filled: the buffer overflows and a PLI is requested
    assert their_plis, "test stream too short to overflow the buffer"
    assert our_plis
    if where == "first":
        # stock's origin is still on frame k-1 (held until frame k's first
        # packet arrives); ours already emitted k-1, so it overflows later
        assert their_plis[0] <= our_plis[0] <= their_plis[0] + len(frames[k - 1])
    else:
        assert our_plis == their_plis

    timestamps = [e.frame.timestamp for e in ours]
    order = {f[0].timestamp: i for i, f in enumerate(frames)}
    # never a corrupted frame, never frame k, in order, each once
    assert all(e.frame.data == ref[e.frame.timestamp] for e in ours)
    assert frames[k][0].timestamp not in timestamps
    assert [order[t] for t in timestamps] == sorted(set(order[t] for t in timestamps))
    # everything before the loss came out; the stream resumed after it
    assert timestamps[:k] == [f[0].timestamp for f in frames[:k]]
    assert timestamps[-1] == frames[-1][0].timestamp
    if where == "middle":
        # same frames as stock aiortc (which holds back the last one)
        assert [(e.frame.timestamp, e.frame.data) for e in theirs] == [
            (e.frame.timestamp, e.frame.data) for e in ours[:-1]
        ]


def test_retransmission_fills_hole(stream: EncodedStream) -> None:
    frames, k, lost = _lossy_setup(stream, "middle")
    arrival = [p for p in flat(frames) if p is not lost]
    resend_at = arrival.index(frames[k + 3][0])  # NACKed packet comes back late
    arrival.insert(resend_at, dup(lost))
    ref = reference(frames)
    ours, our_plis = feed(MarkerJitterBuffer(capacity=64), arrival)
    theirs, their_plis = feed(JitterBuffer(capacity=64, is_video=True), arrival)
    assert our_plis == their_plis == []
    assert [e.frame.timestamp for e in ours] == [f[0].timestamp for f in frames]
    assert all(e.frame.data == ref[e.frame.timestamp] for e in ours)
    # frame k is held until the retransmission, then released at once
    assert next(e.index for e in ours if e.frame.timestamp == frames[k][0].timestamp) == (resend_at)
    assert [e.frame.data for e in theirs] == [e.frame.data for e in ours[:-1]]


# -- applying it to aiortc ---------------------------------------------------------


def test_internals_check_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    check_aiortc_internals()  # the installed aiortc is fine
    import importlib.metadata

    version = importlib.metadata.version("aiortc")
    with pytest.raises(AiortcInternalsError) as info:
        check_aiortc_internals(SimpleNamespace())
    assert f"aiortc {version}" in str(info.value)
    assert BUFFER_ATTR in str(info.value)
    with pytest.raises(AiortcInternalsError):
        use_marker_completion(SimpleNamespace())  # type: ignore[arg-type]
    with pytest.raises(AiortcInternalsError, match="not a JitterBuffer"):
        check_aiortc_internals(SimpleNamespace(**{BUFFER_ATTR: object()}))

    monkeypatch.delattr(JitterBuffer, "smart_remove")
    with pytest.raises(AiortcInternalsError, match="smart_remove"):
        check_aiortc_internals()
    monkeypatch.undo()

    monkeypatch.setattr(JitterBuffer, "_remove_frame", lambda self, seq, extra: None)
    with pytest.raises(AiortcInternalsError, match="_remove_frame"):
        check_aiortc_internals()
    monkeypatch.undo()

    # add() no longer extracting frames through _remove_frame()
    monkeypatch.setattr(JitterBuffer, "add", lambda self, packet: (False, None))
    with pytest.raises(AiortcInternalsError, match="add"):
        check_aiortc_internals()


def test_use_marker_completion_on_real_receiver() -> None:
    async def main() -> None:
        pc = RTCPeerConnection()
        try:
            video = pc.addTransceiver("video")
            audio = pc.addTransceiver("audio")
            old = getattr(video.receiver, BUFFER_ATTR)
            assert type(old) is JitterBuffer
            buf = use_marker_completion(video.receiver)
            assert isinstance(buf, MarkerJitterBuffer)
            assert getattr(video.receiver, BUFFER_ATTR) is buf
            assert buf.capacity == old.capacity  # 512 in aiortc 1.16, 128 before
            assert use_marker_completion(video.receiver) is buf  # idempotent
            with pytest.raises(ValueError):
                use_marker_completion(audio.receiver)
            assert type(getattr(audio.receiver, BUFFER_ATTR)) is JitterBuffer

            # enable_for swaps existing video receivers and later ones
            pc2 = RTCPeerConnection()
            first = pc2.addTransceiver("video")
            enable_for(pc2)
            enable_for(pc2)
            later = pc2.addTransceiver("video")
            assert isinstance(getattr(first.receiver, BUFFER_ATTR), MarkerJitterBuffer)
            assert type(getattr(later.receiver, BUFFER_ATTR)) is JitterBuffer
            pc2.emit("track", later.receiver.track)  # what setRemoteDescription does
            assert isinstance(getattr(later.receiver, BUFFER_ATTR), MarkerJitterBuffer)
            await pc2.close()
        finally:
            await pc.close()

    asyncio.run(main())


def test_swap_midstream_keeps_queued_packets(stream: EncodedStream) -> None:
    frames = packetize(stream)
    packets = flat(frames)
    receiver = SimpleNamespace(**{BUFFER_ATTR: stock(), "_RTCRtpReceiver__kind": "video"})
    split = len(frames[0]) + len(frames[1]) // 2 + 1  # in the middle of frame 1
    before, _ = feed(getattr(receiver, BUFFER_ATTR), packets[:split])
    buf = use_marker_completion(receiver)  # type: ignore[arg-type]
    after, _ = feed(buf, packets[split:])
    emitted = [e.frame for e in before + after]
    ref = reference(frames)
    assert [f.timestamp for f in emitted] == [f[0].timestamp for f in frames]
    assert all(f.data == ref[f.timestamp] for f in emitted)
    assert buf.early_frames >= len(frames) - 3


# -- end to end ---------------------------------------------------------------------


class MovingTrack(VideoStreamTrack):
    """640x480 moving picture at 30 fps; remembers when each frame left."""

    def __init__(self) -> None:
        super().__init__()
        self.images = _make_images(30)
        self.count = 0
        self.sent_at: dict[int, float] = {}

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.images[self.count % len(self.images)], format="rgb24")
        self.count += 1
        frame.pts = pts
        frame.time_base = time_base
        self.sent_at[pts] = time.monotonic()
        return frame


@dataclass
class LoopbackResult:
    frames: list[av.VideoFrame]
    latencies_ms: list[float]  # track.recv() on the sender -> decoded frame
    buffer: JitterBuffer
    packets_per_frame: dict[int, int]


async def _loopback(codec_name: str, marker: bool, n_frames: int) -> LoopbackResult:
    """Two aiortc peers on loopback, sender track -> receiver track."""
    config = RTCConfiguration(iceServers=[])  # loopback only, no STUN
    sender_pc = RTCPeerConnection(config)
    receiver_pc = RTCPeerConnection(config)
    if marker:
        enable_for(receiver_pc)
    tracks: asyncio.Queue = asyncio.Queue()
    packets_per_frame: dict[int, int] = {}

    @receiver_pc.on("track")
    def on_track(track: object) -> None:
        # enable_for's handler ran first: the buffer is already swapped
        receiver = next(t.receiver for t in receiver_pc.getTransceivers() if t.receiver.track is track)
        buf = getattr(receiver, BUFFER_ATTR)
        add = buf.add

        def counting_add(packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
            packets_per_frame[packet.timestamp] = packets_per_frame.get(packet.timestamp, 0) + 1
            return add(packet)

        buf.add = counting_add
        tracks.put_nowait((track, buf))

    try:
        source = MovingTrack()
        transceiver = sender_pc.addTransceiver(source, direction="sendonly")
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == f"video/{codec_name}"]
        )
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)

        track, buf = await asyncio.wait_for(tracks.get(), 5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        frames: list[av.VideoFrame] = []
        latencies: list[float] = []
        while len(frames) < n_frames and loop.time() < deadline:
            frame = await asyncio.wait_for(track.recv(), deadline - loop.time())
            # both sides' pts start at 0 with the 90 kHz clock
            if frame.pts in source.sent_at and len(frames) >= 10:
                latencies.append((time.monotonic() - source.sent_at[frame.pts]) * 1000)
            frames.append(frame)
        return LoopbackResult(frames, latencies, buf, packets_per_frame)
    finally:
        await sender_pc.close()
        await receiver_pc.close()


@pytest.mark.parametrize("codec_name", ["VP8", "H264"])
def test_end_to_end_loopback(codec_name: str) -> None:
    result = asyncio.run(asyncio.wait_for(_loopback(codec_name, True, 45), 20))
    assert len(result.frames) >= 45, f"only {len(result.frames)} frames in 10 s"
    assert all((f.width, f.height) == (WIDTH, HEIGHT) for f in result.frames)
    buf = result.buffer
    assert isinstance(buf, MarkerJitterBuffer)
    assert buf.early_frames >= 0.8 * (buf.early_frames + buf.fallback_frames)
    assert buf.dropped_frames == 0
    counts = result.packets_per_frame.values()
    assert max(counts) >= 10  # keyframe
    assert sum(n >= 2 for n in counts) >= 10


def test_end_to_end_latency_gain() -> None:
    """The point of it all: about one frame interval (33 ms) less latency."""

    async def both() -> tuple[LoopbackResult, LoopbackResult]:
        return (
            await _loopback("VP8", False, 60),
            await _loopback("VP8", True, 60),
        )

    stock_run, marker_run = asyncio.run(asyncio.wait_for(both(), 30))
    assert type(stock_run.buffer) is JitterBuffer
    assert isinstance(marker_run.buffer, MarkerJitterBuffer)
    assert len(stock_run.latencies_ms) >= 30 and len(marker_run.latencies_ms) >= 30
    stock_ms = float(np.median(stock_run.latencies_ms))
    marker_ms = float(np.median(marker_run.latencies_ms))
    assert marker_ms < stock_ms - 15, (stock_ms, marker_ms)
