"""A session's chunk inbox: the chunk cadence of a video engine, beside the latest-frame slot.

A causal video engine takes a session's frames a chunk at a time (`VideoEngine.chunk_frames`: 5 for
the first chunk, then 4). The inbox collects arriving frames into the next chunk; a complete chunk
waits for the scheduler. When the model falls behind and a newer chunk completes before the
waiting one was taken, the waiting one is dropped whole (latest-chunk policy: a chunk of stale
frames is worth less than a fresh one, and latency stays bounded at about two chunks); its frames
count as inbox drops, as a latest-frame slot counts a replaced frame. A first chunk is never
replaced by a shorter one: until a chunk has been handed to the engine, each chunk collects the
first chunk's length.

Used from the event loop thread only, like `LatestSlot`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ChunkInbox(Generic[T]):
    """Collects frames into chunks of `first` frames, then `size`; holds the newest complete chunk."""

    def __init__(self, first: int, size: int, on_drop: Callable[[list[T]], None] | None = None) -> None:
        self.first = first
        self.size = size
        self.on_drop = on_drop
        """Receives each complete chunk dropped unread (the newer one already stored)."""
        self._collecting: list[T] = []
        self._ready: list[T] | None = None
        self._started = False
        self.dropped_frames = 0
        self.dropped_chunks = 0
        self.chunks = 0
        self._in_flight: deque[list[Any]] = deque()
        """Chunks handed to the engine whose output frames have not come back (Stream Batch answers
        a chunk steps after it went in), oldest first, each as the scheduler handed it."""

    @property
    def need(self) -> int:
        """Frames the chunk being collected takes."""
        return self.size if self._started else self.first

    @property
    def ready(self) -> bool:
        return self._ready is not None

    def peek(self) -> list[T] | None:
        return self._ready

    def put(self, frame: T) -> int:
        """Add a frame; returns the frames dropped by it (a whole stale chunk, or 0)."""
        self._collecting.append(frame)
        if len(self._collecting) < self.need:
            return 0
        dropped = self._ready
        self._ready, self._collecting = self._collecting, []
        self.chunks += 1
        if dropped is None:
            return 0
        self.dropped_frames += len(dropped)
        self.dropped_chunks += 1
        if self.on_drop is not None:
            self.on_drop(dropped)
        return len(dropped)

    def take(self) -> list[T] | None:
        """The waiting chunk (None if none); from now on chunks collect `size` frames."""
        chunk, self._ready = self._ready, None
        if chunk is not None:
            self._started = True
        return chunk

    def handed(self, chunk: list[Any]) -> None:
        """`chunk` (what the scheduler pairs with its outputs: one item per frame) went to the engine."""
        self._in_flight.append(chunk)

    def came_back(self, frames: int) -> list[list[Any]]:
        """The oldest chunks in flight that `frames` output frames answer (whole chunks; fewer when a
        reset dropped some meanwhile: their outputs have no chunk to go with)."""
        out: list[list[Any]] = []
        while self._in_flight and frames >= len(self._in_flight[0]):
            frames -= len(self._in_flight[0])
            out.append(self._in_flight.popleft())
        return out

    @property
    def in_flight(self) -> int:
        """Chunks handed to the engine and not answered yet."""
        return len(self._in_flight)

    def reset(self) -> None:
        """Drop what is collected and waiting (a cache reset: no backlog survives it); the next chunk is a first one."""
        self._collecting, self._ready, self._started = [], None, False
        self._in_flight.clear()
