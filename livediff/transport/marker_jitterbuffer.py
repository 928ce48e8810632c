"""Complete received video frames on the RTP marker bit, not one frame late.

Why
---
aiortc's video ``JitterBuffer`` (``aiortc/jitterbuffer.py``) only decides that a
frame is complete when the *first packet of the next frame* arrives (a packet
with a different RTP timestamp, contiguous in sequence numbers).  The frame is
therefore handed to the decoder one frame interval after its last packet
arrived: +33 ms per aiortc receive hop at 30 fps (+50 ms at 20 fps), on top of
network, decode and inference time.  Senders (aiortc's ``RTCRtpSender``,
browsers) set the RTP marker bit on the last packet of every video frame, so
the frame is known to be complete as soon as its packets are contiguous from
its first packet up to the marker packet.

What
----
:class:`MarkerJitterBuffer` subclasses aiortc's ``JitterBuffer`` and keeps its
``add()`` untouched (so the ``pli_flag`` on misorder resets and capacity
overflow, dropping of late/duplicate packets and ``smart_remove`` are exactly
aiortc's).  It only extends frame extraction:

* the frame at the buffer origin is emitted as soon as it is *provably
  complete*: its first packet is known to start the frame (the packet just
  before it, sequence-wise, was seen and had another timestamp) and every
  sequence number from there to a packet with the marker bit (same timestamp)
  is present.  Frames are only ever emitted in order, from the origin, and a
  frame with a hole is held (until a retransmission fills it) or dropped by
  aiortc's overflow handling, never emitted partially;
* otherwise aiortc's own rule applies (fallback): a frame is emitted when the
  next frame's first packet arrives.  Marker-less streams, the first frame of
  a stream and the first frame after an overflow/reset use this path (one
  frame late, exactly as stock aiortc).  One deliberate deviation: after a
  capacity overflow, aiortc's ``smart_remove`` can leave the origin right
  after a *missing* packet, i.e. possibly in the middle of a frame whose head
  was lost, and stock aiortc then emits that partial frame.  We drop such a
  frame instead (``dropped_frames``); the overflow already requested a PLI;
* an emitted frame's packets are removed from the buffer, so the next frame's
  first packet does not emit it again; late duplicates/retransmissions are
  behind the origin and dropped by aiortc's ``add()``; packets that follow an
  early-emitted frame with the *same* timestamp (e.g. padding-only packets,
  whose empty payload would make PyAV flush the decoder) are discarded.

``add()`` still returns at most one frame per packet: if several frames become
complete at once (e.g. a retransmission fills a hole), the rest come out on the
following packets, as with stock aiortc.

How to apply
------------
``RTCRtpReceiver.__init__`` creates the video jitter buffer and stores it as
the name-mangled attribute ``_RTCRtpReceiver__jitter_buffer``; the receiver
looks that attribute up for every RTP packet, so replacing it on the instance
is enough.  The cleanest hook is :func:`enable_for`, called right after the
peer connection is created::

    pc = RTCPeerConnection()
    enable_for(pc)          # before setRemoteDescription()

It swaps the buffer of every existing video receiver and listens to the
connection's ``"track"`` event, which aiortc emits inside
``setRemoteDescription()`` before it starts the transports (so before any RTP
is received), for both offerer and answerer.  For a single receiver use
:func:`use_marker_completion`.  Swapping later is also safe: queued packets
are carried over (the first frame after the swap then uses the fallback).

Both functions first run :func:`check_aiortc_internals`, which raises
:class:`AiortcInternalsError` naming the installed aiortc version and what
moved if the private API relied upon is not there.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

from livediff.transport.aiortc_guard import TESTED_AIORTC_RANGE, AiortcInternalsError, moved, warn_if_untested

__all__ = [
    "TESTED_AIORTC_RANGE",
    "AiortcInternalsError",
    "MarkerJitterBuffer",
    "check_aiortc_internals",
    "enable_for",
    "use_marker_completion",
]

#: Private attribute of ``RTCRtpReceiver`` holding its jitter buffer.
_RECEIVER_BUFFER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_RECEIVER_KIND_ATTR = "_RTCRtpReceiver__kind"
#: Private state of ``JitterBuffer`` that the subclass reads.
_BUFFER_STATE_ATTRS = ("_capacity", "_origin", "_packets", "_prefetch", "_is_video")
_BUFFER_METHODS = ("add", "_remove_frame", "remove", "smart_remove")


def _fail(what: str) -> AiortcInternalsError:
    return moved("marker_jitterbuffer", what, "aiortc/jitterbuffer.py and aiortc/rtcrtpreceiver.py")


class MarkerJitterBuffer(JitterBuffer):
    """Video jitter buffer that emits a frame on its marker packet.

    Drop-in replacement for ``JitterBuffer(capacity, is_video=True)``; see the
    module docstring for the rules.  Counters: ``early_frames`` (emitted on
    the marker), ``fallback_frames`` (emitted by aiortc's next-frame rule),
    ``discarded_packets`` (same-timestamp packets after an early frame),
    ``dropped_frames`` (possibly headless frames after an overflow).
    """

    def __init__(self, capacity: int = 512) -> None:
        super().__init__(capacity=capacity, prefetch=0, is_video=True)
        # Sequence number / timestamp of the last packet removed from the
        # buffer (emitted, discarded or dropped); used to prove frame starts.
        self._prev_seq: int | None = None
        self._prev_ts: int | None = None
        self._emitted_ts: int | None = None
        # Set by smart_remove(): the new origin may follow a missing packet.
        self._check_gap = False
        self._suspect_origin: int | None = None
        self.early_frames = 0
        self.fallback_frames = 0
        self.discarded_packets = 0
        self.dropped_frames = 0

    # -- frame extraction -------------------------------------------------

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        """Called by ``add()``: stock rule first, then marker completion."""
        if self._check_gap and self._origin is not None:
            # smart_remove() moved the origin: unless the packet just before
            # it was seen (and belongs to another frame), the frame at the
            # origin may have lost its first packets.
            self._check_gap = False
            first = self._packets[self._origin % self._capacity]
            if first is None or not self._starts_frame(first):
                self._suspect_origin = self._origin
        while True:
            self._discard_emitted_tail()
            suspect = self._suspect_origin == self._origin
            frame = super()._remove_frame(sequence_number)
            if frame is not None:
                if suspect:
                    # Possibly headless frame: drop it (remove() has moved the
                    # origin and cleared the suspicion), then retry.
                    self.dropped_frames += 1
                    continue
                self.fallback_frames += 1
            else:
                frame = self._remove_marked_frame()
                if frame is None:
                    return None
                self.early_frames += 1
            self._emitted_ts = frame.timestamp
            return frame

    def _starts_frame(self, packet: RtpPacket) -> bool:
        """True if ``packet`` (at the origin) is known to be a frame's first."""
        assert self._origin is not None
        return self._prev_seq == uint16_add(self._origin, -1) and self._prev_ts != packet.timestamp

    def _discard_emitted_tail(self) -> None:
        """Drop packets at the origin that belong to an already-emitted frame."""
        while self._emitted_ts is not None and self._origin is not None:
            packet = self._packets[self._origin % self._capacity]
            if (
                packet is None
                or packet.timestamp != self._emitted_ts
                or self._prev_ts != self._emitted_ts
                or self._prev_seq != uint16_add(self._origin, -1)
            ):
                return
            self.remove(1)
            self.discarded_packets += 1

    def _remove_marked_frame(self) -> JitterFrame | None:
        """Emit the origin frame if contiguous from its start to its marker."""
        if self._origin is None:
            return None
        first = self._packets[self._origin % self._capacity]
        if first is None or not self._starts_frame(first):
            return None
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            seq = uint16_add(self._origin, count)
            packet = self._packets[seq % self._capacity]
            if packet is None or packet.sequence_number != seq or packet.timestamp != first.timestamp:
                return None
            packets.append(packet)
            if packet.marker:
                frame = JitterFrame(
                    data=b"".join(p._data for p in packets),  # type: ignore[attr-defined]
                    timestamp=first.timestamp,
                )
                self.remove(count + 1)
                return frame
        return None

    # -- removal bookkeeping ----------------------------------------------

    def _remember_last(self, packets: Sequence[RtpPacket | None], start: int, count: int) -> None:
        for i in range(count - 1, -1, -1):
            packet = packets[(start + i) % self._capacity]
            if packet is not None:
                self._prev_seq = packet.sequence_number
                self._prev_ts = packet.timestamp
                return

    def remove(self, count: int) -> None:
        """aiortc's ``remove``, remembering the last removed packet."""
        if self._origin is not None:
            self._remember_last(self._packets, self._origin, count)
        self._suspect_origin = None
        super().remove(count)

    def smart_remove(self, count: int) -> bool:
        """aiortc's ``smart_remove``, remembering the last removed packet."""
        start = self._origin
        snapshot = list(self._packets)
        emptied = super().smart_remove(count)
        if start is not None and self._origin is not None:
            removed = self._capacity if emptied else uint16_add(self._origin, -start)
            self._remember_last(snapshot, start, removed)
        self._suspect_origin = None
        self._check_gap = True
        return emptied

    def _adopt(self, other: JitterBuffer) -> None:
        """Take over the queued packets of a stock buffer of equal capacity."""
        self._origin = other._origin
        self._packets = list(other._packets)


def _check_jitterbuffer_api() -> None:
    for name in _BUFFER_METHODS:
        if not callable(getattr(JitterBuffer, name, None)):
            raise _fail(f"JitterBuffer.{name}() is missing")
    try:
        params = inspect.signature(JitterBuffer.__init__).parameters
        remove_params = list(inspect.signature(JitterBuffer._remove_frame).parameters)
    except (TypeError, ValueError) as exc:  # pragma: no cover
        raise _fail(f"cannot inspect JitterBuffer signatures ({exc})") from exc
    for name in ("capacity", "prefetch", "is_video"):
        if name not in params:
            raise _fail(f"JitterBuffer.__init__() has no '{name}' parameter")
    if remove_params != ["self", "sequence_number"]:
        raise _fail(f"JitterBuffer._remove_frame() signature changed to {remove_params}")

    stock = JitterBuffer(capacity=8, is_video=True)
    for name in _BUFFER_STATE_ATTRS:
        if not hasattr(stock, name):
            raise _fail(f"JitterBuffer instances have no '{name}' attribute")

    # Behavioural self-test of the subclass on the installed aiortc: the first
    # frame goes out by the stock rule, the second on its marker packet.
    def pkt(seq: int, ts: int, marker: int, data: bytes) -> RtpPacket:
        packet = RtpPacket(sequence_number=seq, timestamp=ts, marker=marker)
        packet._data = data  # type: ignore[attr-defined]
        return packet

    buf = MarkerJitterBuffer(capacity=8)
    results: list[Any] = [
        buf.add(pkt(65535, 1000, 1, b"a")),
        buf.add(pkt(0, 4000, 0, b"b")),
        buf.add(pkt(1, 4000, 1, b"c")),
    ]
    ok = (
        all(isinstance(r, tuple) and len(r) == 2 and r[0] is False for r in results)
        and results[0][1] is None
        and isinstance(results[1][1], JitterFrame)
        and (results[1][1].data, results[1][1].timestamp) == (b"a", 1000)
        and isinstance(results[2][1], JitterFrame)
        and (results[2][1].data, results[2][1].timestamp) == (b"bc", 4000)
        and buf._origin == 2
    )
    if not ok:
        raise _fail(
            "JitterBuffer.add() no longer behaves as expected "
            f"(returns {results!r}; expected (pli_flag, JitterFrame|None) with "
            "frame extraction through _remove_frame()/remove())"
        )

    if _RECEIVER_BUFFER_ATTR not in RTCRtpReceiver._handle_rtp_packet.__code__.co_names:
        raise _fail(
            "RTCRtpReceiver._handle_rtp_packet() no longer reads "
            f"self.{_RECEIVER_BUFFER_ATTR.replace('_RTCRtpReceiver', '', 1)}"
        )


def check_aiortc_internals(receiver: object | None = None) -> None:
    """Raise :class:`AiortcInternalsError` if aiortc's internals moved.

    Checks the ``JitterBuffer`` API (methods, constructor, private state and
    actual ``add()`` behaviour) and that ``RTCRtpReceiver`` still reads its
    buffer from ``_RTCRtpReceiver__jitter_buffer``; with ``receiver``, also
    that this receiver has that attribute holding a ``JitterBuffer``.  Warns
    (does not fail) if the aiortc version is outside ``TESTED_AIORTC_RANGE``.
    """
    warn_if_untested("MarkerJitterBuffer")
    _check_jitterbuffer_api()
    if receiver is None:
        return
    if not hasattr(receiver, _RECEIVER_BUFFER_ATTR):
        raise _fail(f"{type(receiver).__name__} has no attribute '{_RECEIVER_BUFFER_ATTR}'")
    buffer = getattr(receiver, _RECEIVER_BUFFER_ATTR)
    if not isinstance(buffer, JitterBuffer):
        raise _fail(f"'{_RECEIVER_BUFFER_ATTR}' holds {type(buffer).__name__}, not a JitterBuffer")
    if getattr(receiver, _RECEIVER_KIND_ATTR, None) not in ("audio", "video"):
        raise _fail(f"receiver has no '{_RECEIVER_KIND_ATTR}' of 'audio'/'video'")


def use_marker_completion(receiver: RTCRtpReceiver) -> MarkerJitterBuffer:
    """Swap a video receiver's jitter buffer for a :class:`MarkerJitterBuffer`.

    Keeps the capacity (and any queued packets); idempotent.  Raises
    :class:`AiortcInternalsError` if aiortc's internals moved and
    ``ValueError`` for an audio receiver.
    """
    check_aiortc_internals(receiver)
    if getattr(receiver, _RECEIVER_KIND_ATTR) != "video":
        raise ValueError("marker completion only applies to video receivers")
    old: JitterBuffer = getattr(receiver, _RECEIVER_BUFFER_ATTR)
    if isinstance(old, MarkerJitterBuffer):
        return old
    if not old._is_video or old._prefetch != 0:
        raise _fail(
            "the video receiver's JitterBuffer is no longer "
            f"(is_video=True, prefetch=0) but ({old._is_video}, {old._prefetch})"
        )
    new = MarkerJitterBuffer(capacity=old.capacity)
    if old._origin is not None:
        new._adopt(old)
    setattr(receiver, _RECEIVER_BUFFER_ATTR, new)
    return new


_enabled_pcs: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()


def enable_for(pc: RTCPeerConnection) -> None:
    """Use marker completion for every video receiver of ``pc``.

    Call right after creating ``pc`` (before ``setRemoteDescription``).
    Swaps existing video receivers now and new ones from the ``"track"``
    event, which aiortc emits before it starts receiving RTP.  Idempotent.
    """
    check_aiortc_internals()

    def swap_all(*_: object) -> None:
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                use_marker_completion(transceiver.receiver)

    swap_all()
    if pc not in _enabled_pcs:
        pc.on("track", swap_all)
        _enabled_pcs.add(pc)
