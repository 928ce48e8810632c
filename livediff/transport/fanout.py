"""One session's output, encoded once per codec, sent to every peer that shows it.

The publisher's own peer (sendrecv) and every WHEP viewer get an `EncodedTrack`: a sender fed
with encoded frames (`livediff.transport.encoded_sender`). One reader takes each output frame
from the session's outbox (latest-only) while at least one track is being read, encodes it once
for each codec some reading track uses (off the event loop, like aiortc's own encoders), and
hands the same encoded frame to each of those tracks. A viewer thus costs packetization and
encryption, not an encode: 16 viewers cost the publisher's output frame rate next to nothing
where 16 encoders halved it (docs/benchmarks.md#viewers).

Encoded frames depend on the ones before them, so a track cannot keep only the newest one:

* a track starts on a keyframe: when it is first read it asks its codec's encoder for one, and
  drops what comes before it;
* a track whose sender falls `MAX_QUEUED` frames behind drops what it holds, asks for a
  keyframe and waits for it (counted in `EncodedTrack.dropped`): latency stays bounded;
* a receiver's PLI/FIR asks the encoder for a keyframe; every `keyframe_interval_s` one comes
  anyway (recovery, and a picture within that time for a new viewer whose PLI was lost). Asked
  for keyframes come at most every `KEYFRAME_GAP_S` per codec: requests from any number of
  receivers meanwhile (a lossy viewer repeats its PLI until a keyframe comes) make one keyframe,
  which every receiver of the codec gets, so a lossy viewer costs the others at most one
  keyframe per `KEYFRAME_GAP_S`. PLIs, FIRs and NACKs are counted per track and reported to
  `on_feedback` (the server's `/metrics`).

Congestion: each receiver's estimate (REMB) reaches the encoder of its codec, which runs at the
lowest estimate among its tracks (never above the configured bitrate; changed at most every
`BITRATE_HOLD_S`, each change costing a keyframe in aiortc's encoders): one encoding for all
means the slowest receiver sets everyone's quality, as in any SFU without simulcast. NACK
retransmissions stay per sender (each keeps its own RTP history).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import av
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from livediff.transport.encoded_sender import BitstreamEncoder, feed_packets
from livediff.transport.slot import LatestSlot, SlotClosed

log = logging.getLogger(__name__)

MAX_QUEUED = 3
"""Encoded frames a track may hold unread; beyond, it drops them and waits for a keyframe."""
KEYFRAME_GAP_S = 0.5
"""Keyframes asked for (a new viewer, a PLI) come at most this often per codec; later requests wait.
One encoding serves every receiver: without it, each lossy receiver's PLIs would make every
frame a keyframe for all of them."""
BITRATE_HOLD_S = 2.0
"""The shared encoder's bitrate changes at most this often: aiortc rebuilds its codec (and sends a
keyframe) on a change of more than 10%, and the lowest of many receivers' estimates moves a lot.
Measured with 16 aiortc viewers on the bench: 21 keyframes in 44 frames without either limit."""


class EncodedTrack(MediaStreamTrack):
    """A video track of encoded frames (`av.Packet`) from a `Fanout`, for one fed sender."""

    kind = "video"

    def __init__(self, fanout: Fanout, codec: str) -> None:
        super().__init__()
        self.codec = codec
        """The codec's MIME type, lower case (video/vp8, video/h264)."""
        self.reading = False
        """True from the sender's first `recv()` (the peer connected)."""
        self.bitrate: int | None = None
        """The receiver's last bandwidth estimate (REMB), bit/s."""
        self.dropped = 0
        """Encoded frames dropped: before the first keyframe, and when the sender fell behind."""
        self.keyframe_requests = 0
        """PLIs and FIRs from this track's receiver."""
        self.nacked_packets = 0
        """Packets this track's receiver asked for again (NACK); its sender retransmits them."""
        self._fanout = fanout
        self._queue: deque[av.Packet] = deque()
        self._wake = asyncio.Event()
        self._waiting_for_keyframe = True

    def put(self, packet: av.Packet, keyframe: bool) -> None:
        """Queue an encoded frame for the sender (from the fanout's reader)."""
        if keyframe:
            self._waiting_for_keyframe = False
        elif self._waiting_for_keyframe:
            self.dropped += 1
            return
        elif len(self._queue) >= MAX_QUEUED:  # the sender fell behind: restart it on a keyframe
            self.dropped += len(self._queue) + 1
            self._queue.clear()
            self._waiting_for_keyframe = True
            self._fanout.request_keyframe(self.codec)
            return
        self._queue.append(packet)
        self._wake.set()

    async def recv(self) -> av.Packet:
        if not self.reading:
            self.reading = True
            self._fanout.started(self)
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._wake.set()
            self._fanout.forget(self)


class Fanout:
    """A session's output (its outbox of frames with an `.image`), encoded once per codec for every track."""

    def __init__(
        self,
        outbox: LatestSlot[Any],
        on_send: Callable[[Any], None] | None,
        bitrate: int,
        keyframe_interval_s: float,
        on_feedback: Callable[[str], None] | None = None,
    ) -> None:
        self._outbox = outbox
        self._on_send = on_send
        self._on_feedback = on_feedback
        """Told "keyframe_request" on each PLI/FIR and "nack" on each NACKed packet of any track."""
        self.bitrate = bitrate
        """The configured bitrate, bit/s: the most any encoder runs at."""
        self.keyframe_interval_s = keyframe_interval_s
        self.tracks: list[EncodedTrack] = []
        self.encoders: dict[str, BitstreamEncoder] = {}
        """Codec MIME type -> its one encoder, while some reading track uses that codec."""
        self.encoded = 0
        """Frames encoded, all codecs together (one per frame and codec in use, whatever the viewers)."""
        self.keyframes = 0
        """Of which keyframes (the first, the periodic ones, those asked for, and after a bitrate change)."""
        self.keyframe_requests = 0
        """PLIs and FIRs from every track's receiver (each coalesced: see `KEYFRAME_GAP_S`)."""
        self._codecs: dict[str, RTCRtpCodecParameters] = {}
        self._keyframe_due: dict[str, float] = {}
        self._last_keyframe: dict[str, float] = {}
        self._bitrate_set: dict[str, float] = {}
        self._reading = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def subscribe(self, sender: RTCRtpSender, codec: RTCRtpCodecParameters) -> EncodedTrack:
        """Feed `sender` (not started yet) this output's frames encoded with `codec`; returns its track."""
        if self._stopped:
            raise RuntimeError("the output has ended")
        mime = codec.mimeType.lower()
        track = EncodedTrack(self, mime)
        self._codecs.setdefault(mime, codec)

        def on_bitrate(bitrate: int) -> None:
            track.bitrate = bitrate  # applied by the reader, at most every BITRATE_HOLD_S

        def on_keyframe_request() -> None:  # a receiver's PLI or FIR
            track.keyframe_requests += 1
            self.keyframe_requests += 1
            if self._on_feedback is not None:
                self._on_feedback("keyframe_request")
            self.request_keyframe(mime)

        def on_nack(sequence_number: int) -> None:
            track.nacked_packets += 1
            if self._on_feedback is not None:
                self._on_feedback("nack")

        feed_packets(sender, codec, on_bitrate, on_keyframe_request, on_nack)
        sender.replaceTrack(track)
        self.tracks.append(track)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return track

    def started(self, track: EncodedTrack) -> None:
        """`track`'s sender reads now: it needs a keyframe, and the reader has someone to read for."""
        self.request_keyframe(track.codec)
        self._reading.set()

    def forget(self, track: EncodedTrack) -> None:
        if track in self.tracks:
            self.tracks.remove(track)

    def request_keyframe(self, codec: str) -> None:
        """A keyframe with `codec` soon: the next frame, or `KEYFRAME_GAP_S` after the last keyframe."""
        self._keyframe_due[codec] = min(
            self._keyframe_due.get(codec, 0.0), self._last_keyframe.get(codec, -KEYFRAME_GAP_S) + KEYFRAME_GAP_S
        )

    def stop(self) -> None:
        """End every track and the reader."""
        self._stopped = True
        for track in list(self.tracks):
            track.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _set_bitrate(self, codec: str, encoder: BitstreamEncoder, now: float) -> None:
        """The lowest estimate among the codec's reading tracks (at most the configured bitrate), held
        `BITRATE_HOLD_S` between changes."""
        if now - self._bitrate_set.get(codec, -BITRATE_HOLD_S) < BITRATE_HOLD_S:
            return
        estimates = [t.bitrate for t in self.tracks if t.codec == codec and t.reading and t.bitrate is not None]
        target = min([self.bitrate, *estimates])
        if encoder.target_bitrate != target:
            encoder.target_bitrate = target
            self._bitrate_set[codec] = now

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            readers = [t for t in self.tracks if t.reading]
            if not readers:  # nobody reads: leave the outbox alone (its frames count as dropped there)
                self._reading.clear()
                await self._reading.wait()
                continue
            try:
                item = await self._outbox.get()
            except SlotClosed:
                self.stop()
                return
            if self._on_send is not None:
                self._on_send(item)
            for codec in sorted({t.codec for t in self.tracks if t.reading}):
                now = time.monotonic()
                encoder = self._encoder(codec, now)
                self._set_bitrate(codec, encoder, now)
                force = now >= self._keyframe_due.get(codec, 0.0)
                # one codec after the other: aiortc's encoders mark the frame they are given (pict_type)
                packet, keyframe = await loop.run_in_executor(None, encoder.encode, item.image, force)
                self.encoded += 1
                if packet is None:
                    continue
                if keyframe:
                    self.keyframes += 1
                    self._last_keyframe[codec] = now
                    self._keyframe_due[codec] = now + self.keyframe_interval_s
                for track in self.tracks:
                    if track.codec == codec and track.reading:
                        track.put(packet, keyframe)
            for codec in set(self.encoders) - {t.codec for t in self.tracks if t.reading}:
                del self.encoders[codec]

    def _encoder(self, codec: str, now: float) -> BitstreamEncoder:
        if codec not in self.encoders:
            self.encoders[codec] = BitstreamEncoder(self._codecs[codec])
            self._bitrate_set.pop(codec, None)
            self._keyframe_due[codec] = now
        return self.encoders[codec]
