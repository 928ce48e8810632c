"""Send frames encoded once to many aiortc senders: the aiortc internals `livediff.transport.fanout` relies on.

Why
---
aiortc encodes per sender: a track's frames are encoded by each `RTCRtpSender` that sends them,
so every WHEP viewer of a session ran an encoder of its own (16 viewers halved the publisher's
output frame rate on a 2-core machine). A sender also takes already-encoded data: when its
track returns an `av.Packet` rather than a frame, `RTCRtpSender._next_encoded_frame` only
packetizes it (`Encoder.pack`). So one encoder per codec can feed every sender.

What, and the private API it rests on
-------------------------------------
* `BitstreamEncoder`: aiortc's own `Vp8Encoder` / `H264Encoder` (their settings, bitrate clamps,
  rebuild on a bitrate change, keyframe forcing), with their RTP packetization
  (`_packetize`, a classmethod) replaced by "the whole access unit": `encode()` returns one
  Annex B (H.264) or VP8 bitstream frame, which `pack()` of a sender's own encoder packetizes.
* `feed_packets(sender, ...)`: presets the sender's encoder (the name-mangled attribute
  `_RTCRtpSender__encoder`, which the sender creates lazily only when it is None) with a
  packer that forwards the receiver's bandwidth estimate (REMB, which the sender writes to
  `encoder.target_bitrate`) to the shared encoder, and replaces the instance's
  `_send_keyframe` (what the sender calls on a PLI or FIR) with the shared encoder's request;
  it may wrap the instance's `_retransmit` (what the sender awaits for each NACKed packet) to
  count NACKs.

`check_aiortc_internals()` checks every one of these before use and raises
`AiortcInternalsError` naming the aiortc version and what moved; the test suite runs it, and
sends real packets through real senders.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import av
from aiortc import RTCRtpSender
from aiortc.codecs import get_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import VIDEO_TIME_BASE
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from livediff.transport.aiortc_guard import AiortcInternalsError, moved, warn_if_untested

_SENDER_ENCODER_ATTR = "_RTCRtpSender__encoder"
ANNEX_B_START = b"\x00\x00\x00\x01"
H264_IDR, H264_SPS = 5, 7


def _fail(what: str) -> AiortcInternalsError:
    return moved("encoded_sender", what, "aiortc/rtcrtpsender.py and aiortc/codecs/{vpx,h264}.py")


def check_aiortc_internals() -> None:
    """Raise `AiortcInternalsError` if what this module relies on moved (see the module docstring)."""
    warn_if_untested("encoded_sender")
    next_frame = inspect.getsource(RTCRtpSender._next_encoded_frame)
    for needle, what in (
        ("self.__encoder.pack(", "packs non-frame data with self.__encoder.pack()"),
        ("if self.__encoder is None", "creates its encoder only when it has none"),
        ("isinstance(data, Frame)", "tells frames from packets"),
    ):
        if needle not in next_frame:
            raise _fail(f"RTCRtpSender._next_encoded_frame no longer {what}")
    rtcp = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    if "self._send_keyframe()" not in rtcp or "self.__encoder.target_bitrate = bitrate" not in rtcp:
        raise _fail(
            "RTCRtpSender._handle_rtcp_packet no longer calls self._send_keyframe() on PLI/FIR "
            "and writes REMB into self.__encoder.target_bitrate"
        )
    if "self._retransmit(" not in rtcp or not inspect.iscoroutinefunction(RTCRtpSender._retransmit):
        raise _fail("RTCRtpSender._handle_rtcp_packet no longer answers a NACK with await self._retransmit(seq)")
    for cls, params in ((Vp8Encoder, ["buffer", "picture_id"]), (H264Encoder, ["packages"])):
        packetize = inspect.getattr_static(cls, "_packetize", None)
        if not isinstance(packetize, classmethod) or list(inspect.signature(cls._packetize).parameters) != params:
            raise _fail(f"{cls.__name__}._packetize is no longer a classmethod taking {params}")
        if not hasattr(cls, "pack") or not isinstance(inspect.getattr_static(cls, "target_bitrate", None), property):
            raise _fail(f"{cls.__name__} has no pack() or no target_bitrate property")


class _Vp8Bitstream(Vp8Encoder):
    @classmethod
    def _packetize(cls, buffer: bytes, picture_id: int) -> list[bytes]:
        return [buffer] if buffer else []


class _H264Bitstream(H264Encoder):
    @classmethod
    def _packetize(cls, packages: Iterable[bytes]) -> list[bytes]:
        data = b"".join(ANNEX_B_START + nal for nal in packages)
        return [data] if data else []


class BitstreamEncoder:
    """aiortc's encoder for `codec`, returning whole encoded frames (as `av.Packet`) instead of RTP payloads."""

    def __init__(self, codec: RTCRtpCodecParameters) -> None:
        mime = codec.mimeType.lower()
        if mime == "video/vp8":
            self._encoder: Vp8Encoder | H264Encoder = _Vp8Bitstream()
        elif mime == "video/h264":
            self._encoder = _H264Bitstream()
        else:
            raise ValueError(f"no shared encoder for {codec.mimeType}")
        self.mime = mime

    @property
    def target_bitrate(self) -> int:
        """Bit/s; aiortc clamps it (VP8 0.25-1.5 Mbit/s, H.264 0.5-3) and rebuilds the codec on a >10% change."""
        return int(self._encoder.target_bitrate)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._encoder.target_bitrate = bitrate

    def encode(self, frame: av.VideoFrame, force_keyframe: bool) -> tuple[av.Packet | None, bool]:
        """One frame -> (its encoded frame, with `frame`'s time in the RTP video clock, is it a keyframe).

        (None, False) when the encoder gave nothing for this frame. Blocking: run it off the loop.
        """
        payloads, timestamp = self._encoder.encode(frame, force_keyframe)  # (the encoder rescales frame.pts)
        if not payloads:
            return None, False
        data = payloads[0]
        packet = av.Packet(data)
        packet.pts = timestamp
        packet.time_base = VIDEO_TIME_BASE
        return packet, is_keyframe(self.mime, data)


def is_keyframe(mime: str, data: bytes) -> bool:
    """Whether an encoded frame decodes on its own: a VP8 key frame (RFC 6386 9.1: bit 0 of the frame
    tag is 0) or an H.264 access unit with an IDR slice or a sequence parameter set (Annex B)."""
    if mime == "video/vp8":
        return bool(data) and not data[0] & 0x01
    start = 0
    while (start := data.find(b"\x00\x00\x01", start)) != -1 and start + 3 < len(data):
        if data[start + 3] & 0x1F in (H264_IDR, H264_SPS):
            return True
        start += 3
    return False


class _Packer(Encoder):
    """The encoder a fed sender holds: packetizes encoded frames; reports REMB to `on_bitrate`."""

    def __init__(self, codec: RTCRtpCodecParameters, on_bitrate: Callable[[int], None]) -> None:
        self._inner = get_encoder(codec)
        self._on_bitrate = on_bitrate
        self._bitrate: int | None = None

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        raise TypeError("a fed sender takes encoded frames only")

    def pack(self, packet: av.Packet) -> tuple[list[bytes], int]:
        return self._inner.pack(packet)  # type: ignore[no-any-return]

    @property
    def target_bitrate(self) -> int | None:
        """The receiver's last estimate (REMB), bit/s; None before the first."""
        return self._bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._bitrate = bitrate
        self._on_bitrate(bitrate)


def feed_packets(
    sender: RTCRtpSender,
    codec: RTCRtpCodecParameters,
    on_bitrate: Callable[[int], None],
    on_keyframe_request: Callable[[], None],
    on_nack: Callable[[int], None] | None = None,
) -> None:
    """Make `sender` take encoded frames (its track returns `av.Packet`s of `codec`).

    Call before the sender starts (it starts once the peer connects). `on_bitrate` gets the
    receiver's bandwidth estimates, `on_keyframe_request` runs on its PLI/FIR, `on_nack` (if
    given) gets each sequence number a NACK asks for (the sender still retransmits it, RFC 4585
    6.2.1, from its own history).
    """
    check_aiortc_internals()
    if not hasattr(sender, _SENDER_ENCODER_ATTR):
        raise _fail(f"RTCRtpSender has no attribute '{_SENDER_ENCODER_ATTR}'")
    if getattr(sender, _SENDER_ENCODER_ATTR) is not None:
        raise RuntimeError("the sender already encodes: feed it before it starts")
    setattr(sender, _SENDER_ENCODER_ATTR, _Packer(codec, on_bitrate))
    sender._send_keyframe = on_keyframe_request  # type: ignore[method-assign]
    if on_nack is not None:
        retransmit = sender._retransmit

        async def counted(sequence_number: int) -> None:
            on_nack(sequence_number)
            await retransmit(sequence_number)

        sender._retransmit = counted  # type: ignore[method-assign]
