"""Recover from lost RTP packets on a video receiver: NACK again, give a hole up, ask for a keyframe.

Why
---
aiortc's video receiver sends one NACK (RFC 4585 6.2.1) per missing packet, when the gap is
first seen, and its jitter buffer waits at the first missing packet until 512 later packets have
come (`JitterBuffer.add`, capacity overflow). `MarkerJitterBuffer` kept that rule. So one packet
lost together with its single retransmission froze a 320x240 publisher's input for 14-16 s:
every later frame, and the keyframe the sender made after the overflow's PLI, waited behind the
hole. Receivers built for real networks (libwebrtc's NackRequester and frame buffer, Janus,
livekit) NACK a packet again while its retransmission can still arrive, give a hole up after a
deadline, drop what cannot be completed, ask for a keyframe and go on from it.

What
----
Per video receiver, one `LossRecovery` holds the rules, the round-trip estimate and the counters
(`LossStats`), and two patched parts of aiortc's receiver use it:

1. `NackScheduler` (replaces the receiver's `NackGenerator`): a missing sequence number is NACKed
   when the gap is seen, then again every `nack_interval` (1.25 x RTT, at least
   `RecoverySettings.min_nack_interval_s`) while a retransmission sent now can still arrive before
   the hole's deadline, at most `max_nacks` times. The round trip is measured from a packet's only
   NACK to its retransmission (Karn's rule: a packet NACKed twice gives no sample), smoothed as
   RFC 6298 smooths TCP's.
2. `RecoveringJitterBuffer` (replaces the receiver's jitter buffer; marker-bit completion as
   `MarkerJitterBuffer`): when frames wait behind a missing packet, that hole is given up
   `hole_deadline_s` after it was seen (longer on a slow path: 2.5 x RTT, at most 1 s), or at
   once when a later keyframe is complete in the buffer. Giving up drops the packets before the
   next frame start (those frames are "dropped incomplete"), and from then on frames are dropped
   until a keyframe ("dropped undecodable": they refer to what was lost), while keyframes are
   asked for: a PLI (RFC 4585 6.3.1) at most every `keyframe_request_interval_s`, and a FIR
   (RFC 5104 4.3.1) once `fir_after_plis` PLIs went unanswered. Frames whose first packets were
   given up never reach the decoder.

A freeze is counted as the W3C webrtc-stats define one (`freezeCount`, `totalFreezesDuration`):
a gap between two frames handed to the decoder longer than max(3 x the mean frame interval, the
mean + 150 ms), the mean taken over the last 30 frames.

How to apply, and what it relies on
-----------------------------------
`enable_for(pc, totals)` (instead of `marker_jitterbuffer.enable_for`) swaps both parts of every
video receiver of `pc`, now and from the `"track"` event (before any RTP is received). aiortc's
`RTCRtpReceiver._handle_rtp_packet` reads `self.__nack_generator.add(packet)` and then sends
`sorted(self.__nack_generator.missing)`; it reads `self.__jitter_buffer.add(packet)` and sends a
PLI when the first value returned is true. `check_aiortc_internals()` checks those, the
receiver's `_send_rtcp` and private `__rtcp_ssrc`/`__codecs` (for a FIR), and runs the marker
buffer's own checks; it raises `AiortcInternalsError` naming what moved.
"""

from __future__ import annotations

import asyncio
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpreceiver import NackGenerator
from aiortc.rtp import RTCP_PSFB_FIR, RtcpPsfbPacket, RtpPacket
from aiortc.utils import uint16_add, uint16_gt

from livediff.transport import marker_jitterbuffer
from livediff.transport.aiortc_guard import AiortcInternalsError, moved, warn_if_untested
from livediff.transport.encoded_sender import is_keyframe
from livediff.transport.marker_jitterbuffer import MarkerJitterBuffer

__all__ = [
    "AiortcInternalsError",
    "LossRecovery",
    "LossStats",
    "NackScheduler",
    "RecoveringJitterBuffer",
    "RecoverySettings",
    "check_aiortc_internals",
    "enable_for",
    "stats_of",
]

_RECEIVER_NACK_ATTR = "_RTCRtpReceiver__nack_generator"
_RECEIVER_BUFFER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_RECEIVER_KIND_ATTR = "_RTCRtpReceiver__kind"
_RECEIVER_CODECS_ATTR = "_RTCRtpReceiver__codecs"
_RECEIVER_RTCP_SSRC_ATTR = "_RTCRtpReceiver__rtcp_ssrc"
MAX_GAP = 1000
"""A jump of more sequence numbers than this is a sender restart, not loss: nothing is NACKed."""


def _fail(what: str) -> AiortcInternalsError:
    return moved("loss_recovery", what, "aiortc/rtcrtpreceiver.py and aiortc/jitterbuffer.py")


@dataclass(frozen=True)
class RecoverySettings:
    """The loss-recovery rules of a video receiver (times in seconds)."""

    hole_deadline_s: float = 0.35
    """A missing packet is waited for this long after its gap was seen (or 2.5 x RTT if longer, at most
    1 s), then given up. libwebrtc's frame buffer waits about as long before it asks for a keyframe."""
    max_nacks: int = 10
    """NACKs per missing packet at most (libwebrtc: 10)."""
    min_nack_interval_s: float = 0.02
    """A packet is NACKed again at most this often, and at most once per 1.25 x RTT."""
    initial_rtt_s: float = 0.1
    """The round trip assumed until a retransmission measured one (libwebrtc's default: 100 ms)."""
    keyframe_request_interval_s: float = 0.3
    """Keyframe requests (PLI or FIR) go out at most this often; one is repeated this often while
    frames wait for a keyframe."""
    fir_after_plis: int = 2
    """Unanswered PLIs after which the request is a FIR instead (a sender that ignores PLIs)."""


@dataclass
class LossStats:
    """Counters of one receiver (or, summed, of many: `add`). Times in seconds."""

    packets_missed: int = 0
    """Sequence numbers seen missing (a gap), recovered or not."""
    packets_recovered: int = 0
    """Of those, packets that came later (a retransmission or a late packet)."""
    packets_lost: int = 0
    """Packets given up: the frames that needed them were dropped."""
    nacks_sent: int = 0
    """RTCP NACK messages sent."""
    nacked_packets: int = 0
    """Sequence numbers asked for in those NACKs, repeats included."""
    plis_sent: int = 0
    firs_sent: int = 0
    frames_dropped_incomplete: int = 0
    """Frames with a packet given up (their packets were dropped, none decoded)."""
    frames_dropped_undecodable: int = 0
    """Complete frames dropped while waiting for a keyframe (they refer to a dropped frame)."""
    freeze_count: int = 0
    freeze_s: float = 0.0
    """Sum of the frame gaps counted as freezes (W3C `totalFreezesDuration`)."""

    def add(self, other: LossStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        values: dict[str, float] = dict(self.__dict__)
        values["freeze_s"] = round(self.freeze_s, 3)
        return values


@dataclass
class _Hole:
    since: float
    nacks: int = 0
    last_nack: float = float("-inf")


class LossRecovery:
    """One video receiver's loss recovery: rules, round-trip estimate, keyframe requests, counters.

    `receiver` sends the FIRs (PLIs go out through the receiver's own path); `clock` returns
    seconds (monotonic); `totals`, if given, is a `LossStats` that gets every count too (a
    server's totals for `/metrics`).
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver | None = None,
        settings: RecoverySettings | None = None,
        totals: LossStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RecoverySettings()
        self.stats = LossStats()
        self.rtt_s: float | None = None
        """Smoothed NACK-to-retransmission time; None until measured."""
        self.clock = clock
        self._totals = totals
        # weakly: `enable_for` keeps recoveries per peer connection in a WeakKeyDictionary, and a
        # value that led back to its key (receiver -> transport -> the connection) would keep both
        self._receiver = weakref.ref(receiver) if receiver is not None else None
        self.holes: dict[int, _Hole] = {}
        """Missing sequence numbers (after the RTX unwrap) -> when seen and NACKed."""
        self.awaiting_keyframe = False
        self._last_request = float("-inf")
        self._unanswered_plis = 0
        self._fir_seq = 0
        self.media_ssrc = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- counters ---------------------------------------------------------------------

    def count(self, name: str, n: float = 1) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + n)
        if self._totals is not None:
            setattr(self._totals, name, getattr(self._totals, name) + n)

    # -- timing rules -----------------------------------------------------------------

    @property
    def rtt(self) -> float:
        return self.rtt_s if self.rtt_s is not None else self.settings.initial_rtt_s

    @property
    def hole_deadline(self) -> float:
        """Seconds a missing packet is waited for."""
        return min(max(self.settings.hole_deadline_s, 2.5 * self.rtt), 1.0)

    @property
    def nack_interval(self) -> float:
        return max(self.settings.min_nack_interval_s, 1.25 * self.rtt)

    def rtt_sample(self, sample: float) -> None:
        """One NACK-to-retransmission time (seconds), smoothed as RFC 6298 2.3 smooths SRTT."""
        sample = min(max(sample, 0.001), 1.0)
        self.rtt_s = sample if self.rtt_s is None else 0.875 * self.rtt_s + 0.125 * sample

    # -- holes --------------------------------------------------------------------------

    def missing_since(self, seq: int, default: float) -> float:
        hole = self.holes.get(seq)
        return hole.since if hole is not None else default

    def give_up(self, seqs: list[int]) -> None:
        """These sequence numbers will not be waited for any more (their frames were dropped)."""
        for seq in seqs:
            self.holes.pop(seq, None)
        self.count("packets_lost", len(seqs))

    # -- keyframe requests --------------------------------------------------------------

    def request_keyframe(self, now: float) -> bool:
        """Ask for a keyframe if none was asked for within `keyframe_request_interval_s`.

        True: send a PLI now (the caller does, through aiortc's path). After `fir_after_plis`
        unanswered PLIs a FIR is sent here instead and False returned.
        """
        if now - self._last_request < self.settings.keyframe_request_interval_s:
            return False
        self._last_request = now
        if self._unanswered_plis >= self.settings.fir_after_plis and self._send_fir():
            return False
        self._unanswered_plis += 1
        self.count("plis_sent")
        return True

    def keyframe_arrived(self) -> None:
        self._unanswered_plis = 0
        self.awaiting_keyframe = False

    def _send_fir(self) -> bool:
        """A FIR (RFC 5104 4.3.1: media SSRC 0; FCI = SSRC, sequence number, 24 reserved bits)."""
        receiver = self._receiver() if self._receiver is not None else None
        sender_ssrc = getattr(receiver, _RECEIVER_RTCP_SSRC_ATTR, None)
        if receiver is None or sender_ssrc is None:
            return False
        self._fir_seq = (self._fir_seq + 1) % 256
        fci = struct.pack("!LB3x", self.media_ssrc, self._fir_seq)
        packet = RtcpPsfbPacket(fmt=RTCP_PSFB_FIR, ssrc=sender_ssrc, media_ssrc=0, fci=fci)
        try:
            task = asyncio.get_running_loop().create_task(receiver._send_rtcp(packet))
        except RuntimeError:  # no loop: nothing to send with
            return False
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.count("firs_sent")
        return True


class NackScheduler(NackGenerator):
    """aiortc's `NackGenerator` with NACKs repeated while they can still help (see the module docstring).

    `add(packet)` returns True when a NACK is due; `missing` then holds the sequence numbers to
    ask for now (aiortc's receiver sends `sorted(missing)` right after).
    """

    def __init__(self, recovery: LossRecovery) -> None:
        super().__init__()
        self.recovery = recovery

    def add(self, packet: RtpPacket) -> bool:
        recovery = self.recovery
        holes = recovery.holes
        now = recovery.clock()
        seq = packet.sequence_number
        recovery.media_ssrc = packet.ssrc
        if self.max_seq is None:
            self.max_seq = seq
        elif uint16_gt(seq, self.max_seq):
            gap = uint16_add(seq, -self.max_seq) - 1
            if gap > MAX_GAP:
                holes.clear()
            else:
                for i in range(1, gap + 1):
                    holes[uint16_add(self.max_seq, i)] = _Hole(since=now)
                if gap:
                    recovery.count("packets_missed", gap)
            self.max_seq = seq
        else:
            hole = holes.pop(seq, None)
            if hole is not None:
                recovery.count("packets_recovered")
                if hole.nacks == 1:  # Karn: only an unambiguous round trip is a sample
                    recovery.rtt_sample(now - hole.last_nack)
        deadline = recovery.hole_deadline
        interval = recovery.nack_interval
        rtt = recovery.rtt
        due: list[int] = []
        for missing, hole in list(holes.items()):
            age = now - hole.since
            if age > deadline or uint16_add(self.max_seq, -missing) > MAX_GAP:
                del holes[missing]  # the jitter buffer gives it up (or has): no more NACKs
                continue
            if hole.nacks < recovery.settings.max_nacks and now - hole.last_nack >= interval and age + rtt < deadline:
                hole.nacks += 1
                hole.last_nack = now
                due.append(missing)
        self.missing = set(due)
        if due:
            recovery.count("nacks_sent")
            recovery.count("nacked_packets", len(due))
        return bool(due)


class RecoveringJitterBuffer(MarkerJitterBuffer):
    """`MarkerJitterBuffer` that gives holes up, drops frames until a keyframe and asks for one.

    `codec_of(payload_type)` gives the MIME type (video/vp8, video/h264) of a payload type, to
    tell keyframes; other codecs get no keyframe wait (their frames are never dropped as
    undecodable).
    """

    def __init__(self, recovery: LossRecovery, codec_of: Callable[[int], str | None], capacity: int = 512) -> None:
        super().__init__(capacity=capacity)
        self.recovery = recovery
        self._codec_of = codec_of
        self._mime: str | None = None
        self._newest: int | None = None
        self._hole_seq: int | None = None
        self._hole_since = 0.0
        self._abandoned_ts: deque[int] = deque(maxlen=16)
        self._emitted_at: float | None = None
        self._intervals: deque[float] = deque(maxlen=30)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        recovery = self.recovery
        now = recovery.clock()
        self._mime = self._codec_of(packet.payload_type)
        if self._newest is None or uint16_gt(packet.sequence_number, self._newest):
            self._newest = packet.sequence_number
        pli, frame = super().add(packet)
        if pli:  # aiortc's own reasons (capacity overflow, a sender restart): rate-limited too
            if self._origin == packet.sequence_number:  # a restart: the buffer begins again here
                self._newest = packet.sequence_number
            pli = recovery.request_keyframe(now)
            recovery.awaiting_keyframe = True
        if frame is None and self._origin is not None:
            start = self._give_up_hole(packet, now)
            if start is not None:
                self._skip_to(start)
                frame = self._remove_frame(packet.sequence_number)  # a keyframe, when it is one we jump to
        if recovery.awaiting_keyframe:  # asked for at once, and again while none comes
            pli = recovery.request_keyframe(now) or pli
        return pli, frame

    # -- giving a hole up -------------------------------------------------------------

    def _first_missing(self) -> int | None:
        """The first missing sequence number from the origin, if packets after it are queued."""
        assert self._origin is not None and self._newest is not None
        span = uint16_add(self._newest, -self._origin)
        if span >= self._capacity:
            return None
        for i in range(span + 1):
            seq = uint16_add(self._origin, i)
            if self._packets[seq % self._capacity] is None:
                return seq
        return None

    def _give_up_hole(self, packet: RtpPacket, now: float) -> int | None:
        """Where to resume if the hole frames wait behind must be given up now; None to wait on."""
        missing = self._first_missing()
        if missing is None:
            self._hole_seq = None
            return None
        if missing != self._hole_seq:
            self._hole_seq = missing
            self._hole_since = self.recovery.missing_since(missing, now)
        key_start = self._complete_keyframe_after(missing, packet)
        if key_start is not None:
            return key_start
        if now - self._hole_since < self.recovery.hole_deadline:
            return None
        return self._next_frame_start(missing)

    def _at(self, seq: int) -> RtpPacket | None:
        packet = self._packets[seq % self._capacity]
        return packet if packet is not None and packet.sequence_number == seq else None

    def _next_frame_start(self, missing: int) -> int:
        """The first packet after `missing` known to start a frame, else one past the newest."""
        assert self._newest is not None
        seq = uint16_add(missing, 1)
        while uint16_gt(self._newest, seq) or seq == self._newest:
            before, packet = self._at(uint16_add(seq, -1)), self._at(seq)
            if packet is not None and (
                (before is not None and before.timestamp != packet.timestamp) or self._starts_keyframe(packet)
            ):
                return seq
            seq = uint16_add(seq, 1)
        return uint16_add(self._newest, 1)

    def _complete_keyframe_after(self, missing: int, packet: RtpPacket) -> int | None:
        """The first sequence number of a complete keyframe ending with `packet` (its marker), if any."""
        if not packet.marker or not uint16_gt(packet.sequence_number, missing):
            return None
        seq = packet.sequence_number
        while True:
            before = self._at(uint16_add(seq, -1))
            if before is None or before.timestamp != packet.timestamp:
                break
            seq = uint16_add(seq, -1)
        first = self._at(seq)
        if first is None or not uint16_gt(seq, missing):
            return None
        if not self._starts_keyframe(first):
            before = self._at(uint16_add(seq, -1))
            if before is None or self._mime is None:
                return None
            data = b"".join(
                p._data  # type: ignore[attr-defined]
                for i in range(uint16_add(packet.sequence_number, -seq) + 1)
                if (p := self._at(uint16_add(seq, i))) is not None
            )
            if not is_keyframe(self._mime, data):
                return None
        return seq

    def _starts_keyframe(self, packet: RtpPacket) -> bool:
        """Whether `packet` alone shows it is a keyframe's first: a VP8 partition-0 start whose frame
        tag says key frame with the start code (RFC 6386 9.1), or H.264 data opening with a
        sequence parameter set (what senders put before an IDR picture)."""
        data: bytes = getattr(packet, "_data", b"")
        if self._mime == "video/vp8":
            try:
                descriptor, _ = VpxPayloadDescriptor.parse(packet.payload)
            except ValueError:
                return False
            return (
                bool(descriptor.partition_start)
                and descriptor.partition_id == 0
                and len(data) >= 6
                and not data[0] & 0x01
                and data[3:6] == b"\x9d\x01\x2a"
            )
        if self._mime == "video/h264":
            return data[:4] == b"\x00\x00\x00\x01" and len(data) > 4 and data[4] & 0x1F == 7
        return False

    def _skip_to(self, start: int) -> None:
        """Drop every packet before `start` (they belong to frames that cannot complete)."""
        assert self._origin is not None
        count = uint16_add(start, -self._origin)
        stamps: set[int] = set()
        lost: list[int] = []
        for i in range(count):
            seq = uint16_add(self._origin, i)
            packet = self._at(seq)
            if packet is None:
                lost.append(seq)
            else:
                stamps.add(packet.timestamp)
        self._abandoned_ts.extend(stamps)
        self.recovery.count("frames_dropped_incomplete", max(len(stamps), 1))
        self.recovery.give_up(lost)
        while count > 0:
            step = min(count, self._capacity)
            self.remove(step)
            count -= step
        self._hole_seq = None
        self.recovery.awaiting_keyframe = True
        if self._at(start) is not None:  # a known frame start (else one past the newest packet)
            self._prev_seq, self._prev_ts = uint16_add(start, -1), None

    # -- emitting ---------------------------------------------------------------------

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        recovery = self.recovery
        while True:
            frame = super()._remove_frame(sequence_number)
            if frame is None:
                return None
            if frame.timestamp in self._abandoned_ts:  # the tail of a frame given up
                continue
            if self._mime not in ("video/vp8", "video/h264") or is_keyframe(self._mime, frame.data):
                recovery.keyframe_arrived()  # (other codecs: no keyframe to wait for)
            elif recovery.awaiting_keyframe:
                recovery.count("frames_dropped_undecodable")
                continue
            self._emitted(recovery.clock())
            return frame

    def _emitted(self, now: float) -> None:
        """Count a freeze as the W3C webrtc-stats do (see the module docstring)."""
        if self._emitted_at is not None:
            gap = now - self._emitted_at
            if len(self._intervals) >= 5:
                mean = sum(self._intervals) / len(self._intervals)
                if gap > max(3 * mean, mean + 0.15):
                    self.recovery.count("freeze_count")
                    self.recovery.count("freeze_s", gap)
            self._intervals.append(gap)
        self._emitted_at = now


def _check_receiver_api() -> None:
    code = RTCRtpReceiver._handle_rtp_packet.__code__
    for attr in (_RECEIVER_NACK_ATTR, _RECEIVER_BUFFER_ATTR, "missing", "add", "_send_rtcp_pli"):
        if attr not in code.co_names:
            raise _fail(f"RTCRtpReceiver._handle_rtp_packet() no longer uses '{attr}'")
    if not callable(getattr(RTCRtpReceiver, "_send_rtcp", None)):
        raise _fail("RTCRtpReceiver._send_rtcp() is missing")
    generator = NackGenerator()
    if not (hasattr(generator, "max_seq") and isinstance(getattr(generator, "missing", None), set)):
        raise _fail("NackGenerator has no 'max_seq' and 'missing' set")
    # A behavioural self-test: a gap is NACKed, then again after the interval, and a keyframe
    # after a hole that never fills is emitted at once.
    clock = [0.0]
    recovery = LossRecovery(clock=lambda: clock[0])
    nacks = NackScheduler(recovery)
    first = [nacks.add(RtpPacket(sequence_number=s)) for s in (10, 12)]
    clock[0] = 0.2
    again = nacks.add(RtpPacket(sequence_number=13))
    if first != [False, True] or not again or nacks.missing != {11}:
        raise _fail(f"NackGenerator.add() no longer usable as patched ({first}, {again}, {nacks.missing})")


def check_aiortc_internals(receiver: object | None = None) -> None:
    """Raise `AiortcInternalsError` if what this module (or `marker_jitterbuffer`) relies on moved."""
    warn_if_untested("loss_recovery")
    marker_jitterbuffer.check_aiortc_internals(receiver)
    _check_receiver_api()
    if receiver is None:
        return
    for attr in (_RECEIVER_NACK_ATTR, _RECEIVER_CODECS_ATTR, _RECEIVER_RTCP_SSRC_ATTR):
        if not hasattr(receiver, attr):
            raise _fail(f"{type(receiver).__name__} has no attribute '{attr}'")


_checked = False


def _check_once() -> None:
    global _checked
    if not _checked:
        check_aiortc_internals()
        _checked = True


def install(receiver: RTCRtpReceiver, totals: LossStats | None = None) -> LossRecovery:
    """Give a video receiver loss recovery (idempotent: returns the one it has)."""
    current = getattr(receiver, _RECEIVER_BUFFER_ATTR, None)
    if isinstance(current, RecoveringJitterBuffer):
        return current.recovery
    for attr in (_RECEIVER_NACK_ATTR, _RECEIVER_BUFFER_ATTR, _RECEIVER_CODECS_ATTR, _RECEIVER_RTCP_SSRC_ATTR):
        if not hasattr(receiver, attr):
            raise _fail(f"{type(receiver).__name__} has no attribute '{attr}'")
    if getattr(receiver, _RECEIVER_KIND_ATTR, None) != "video":
        raise ValueError("loss recovery applies to video receivers")
    codecs: dict[int, Any] = getattr(receiver, _RECEIVER_CODECS_ATTR)

    def codec_of(payload_type: int) -> str | None:
        codec = codecs.get(payload_type)
        return codec.mimeType.lower() if codec is not None else None

    recovery = LossRecovery(receiver, totals=totals)
    old = getattr(receiver, _RECEIVER_BUFFER_ATTR)
    buffer = RecoveringJitterBuffer(recovery, codec_of, capacity=old.capacity)
    if old._origin is not None:
        buffer._adopt(old)
    setattr(receiver, _RECEIVER_BUFFER_ATTR, buffer)
    setattr(receiver, _RECEIVER_NACK_ATTR, NackScheduler(recovery))
    return recovery


_recoveries: weakref.WeakKeyDictionary[RTCPeerConnection, list[LossRecovery]] = weakref.WeakKeyDictionary()


def enable_for(pc: RTCPeerConnection, totals: LossStats | None = None) -> None:
    """Loss recovery (and marker-bit completion) on every video receiver of `pc`; call right after
    creating it. `totals` also gets every count (for `/metrics`). Idempotent."""
    _check_once()
    if pc in _recoveries:
        return
    found = _recoveries.setdefault(pc, [])

    def swap_all(*_: object) -> None:
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                recovery = install(transceiver.receiver, totals)
                if recovery not in found:
                    found.append(recovery)

    swap_all()
    pc.on("track", swap_all)


def stats_of(pc: RTCPeerConnection) -> LossStats:
    """The counters of `pc`'s video receivers, summed (zeros without loss recovery)."""
    total = LossStats()
    for recovery in _recoveries.get(pc, ()):
        total.add(recovery.stats)
    return total
