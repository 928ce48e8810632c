"""Send a chunk's output frames at the camera's pace, not as a burst.

A video engine returns a chunk's frames together (4 at a time). Sent at once, a viewer would see
four frames in a few milliseconds and then nothing for a chunk's length: the same frame rate on
average, but the motion stutters and the receiver's jitter buffer grows. `ChunkPacer` hands frame i
of a chunk to `put` at the chunk's arrival plus frame i's offset in the input (its receive time
minus the chunk's first frame's), so the output keeps the input's rhythm, each frame with its own
timestamps. When the next chunk arrives before the last one was played out (the model is ahead),
the frames still due go out at once: the newest picture is never held back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ChunkPacer(Generic[T]):
    """Plays items out at given offsets; `run` is the playing task (one per session)."""

    def __init__(self, put: Callable[[T], None]) -> None:
        self._put = put
        self._due: deque[tuple[float, T]] = deque()
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._due)

    def play(self, items: list[tuple[float, T]], now: float | None = None) -> None:
        """Hand each (offset in seconds, item) to `put` at `now + offset`; the first offset is usually 0."""
        now = time.monotonic() if now is None else now
        while self._due:  # the previous chunk's late frames: at once, before the new chunk's
            self._put(self._due.popleft()[1])
        for offset, item in items:
            self._due.append((now + max(0.0, offset), item))
        self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._due:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._due[0][0] - time.monotonic()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)  # a new chunk may come first
                except asyncio.TimeoutError:
                    pass
                continue
            self._put(self._due.popleft()[1])
