"""Received media: the pump that hands a remote track's frames on, and the drain for what we do not use.

(A session's output goes out through `livediff.transport.fanout`.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)


async def pump(track: MediaStreamTrack, deliver: Callable[[av.VideoFrame], None]) -> None:
    """Hand every decoded frame of `track` to `deliver` until the track ends.

    aiortc's remote tracks queue without bound, so they must be read as fast as they come;
    `deliver` stores into a latest-only slot and returns at once.
    """
    while True:
        try:
            # aiortc types recv() as any frame or packet; a remote track yields decoded frames
            frame = cast(av.VideoFrame, await track.recv())
        except MediaStreamError:
            return
        deliver(frame)


async def drain(track: MediaStreamTrack) -> None:
    """Read and drop every frame of `track` (received audio we do not use)."""
    await pump(track, lambda _frame: None)


def stop_later(track: MediaStreamTrack) -> None:
    """Stop `track` on the next loop iteration (from sync callbacks)."""
    asyncio.get_running_loop().call_soon(track.stop)
