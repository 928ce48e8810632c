"""Media tracks: the output track that reads a session's outbox, and the input pump.

The output track returns each transformed frame with the input frame's pts and time base, so
the sent frame rate follows the camera's. `SessionOutput` puts it behind a relay of the
session's own (buffered=False): the publisher's own peer and every WHEP viewer subscribe to it,
and each subscriber keeps only the newest frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import av
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from livediff.transport.slot import LatestSlot, SlotClosed

log = logging.getLogger(__name__)


class OutputTrack(MediaStreamTrack):
    """A video track whose frames come from a latest-only outbox of objects with an `.image` frame."""

    kind = "video"

    def __init__(self, outbox: LatestSlot[Any], on_send: Callable[[Any], None] | None = None) -> None:
        super().__init__()
        self._outbox = outbox
        self._on_send = on_send

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            item = await self._outbox.get()
        except SlotClosed:
            self.stop()
            raise MediaStreamError from None
        if self._on_send is not None:
            self._on_send(item)
        return item.image


class SessionOutput:
    """One session's output track and a relay of its own, which every sender of the session subscribes to.

    The relay is the session's, not the server's: a relay forgets a source only from its reader
    task, which starts when a subscriber first reads, so a server-wide relay kept every output
    that never had a reader (a peer that never connected, a send-only publisher nobody watched)
    and, through the track's `on_send`, its whole session. Here the relay goes with the session.
    """

    def __init__(self, outbox: LatestSlot[Any], on_send: Callable[[Any], None] | None = None) -> None:
        self.track = OutputTrack(outbox, on_send)
        self._relay = MediaRelay()

    def subscribe(self) -> MediaStreamTrack:
        """A track for one sender: the newest output frame whenever it reads (nothing queues)."""
        return self._relay.subscribe(self.track, buffered=False)

    def stop(self) -> None:
        self.track.stop()


async def pump(track: MediaStreamTrack, deliver: Callable[[av.VideoFrame], None]) -> None:
    """Hand every decoded frame of `track` to `deliver` until the track ends.

    aiortc's remote tracks queue without bound, so they must be read as fast as they come;
    `deliver` stores into a latest-only slot and returns at once.
    """
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        deliver(frame)


async def drain(track: MediaStreamTrack) -> None:
    """Read and drop every frame of `track` (received audio we do not use)."""
    await pump(track, lambda _frame: None)


def stop_later(track: MediaStreamTrack) -> None:
    """Stop `track` on the next loop iteration (from sync callbacks)."""
    asyncio.get_running_loop().call_soon(track.stop)
