"""A latest-only mailbox: a newer item replaces an older one, so nothing ever queues up.

Every hop of the frame path holds at most one frame; when a consumer is slower than its
producer, the producer's older frames are dropped here and counted, and latency stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SlotClosed(Exception):
    """The slot was closed while (or before) a consumer waited on it."""


class LatestSlot(Generic[T]):
    """Holds the newest item only; `replaced` counts the items dropped unread.

    Used from the event loop thread only (not thread-safe), like asyncio's own primitives.
    `on_put` runs after each `put`, the item stored; it may take the item at once.
    `on_drop` (settable later) receives each item replaced unread, before the new one is stored.
    """

    def __init__(self, on_put: Callable[[], None] | None = None) -> None:
        self._item: T | None = None
        self._event = asyncio.Event()
        self._closed = False
        self._on_put = on_put
        self.on_drop: Callable[[T], None] | None = None
        self.replaced = 0
        self.put_count = 0

    @property
    def ready(self) -> bool:
        return self._item is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def peek(self) -> T | None:
        return self._item

    def put(self, item: T) -> bool:
        """Store `item`; True when it replaced an unread one (a dropped frame). Ignored once closed."""
        if self._closed:
            return False
        dropped = self._item is not None
        self.replaced += dropped
        if dropped and self.on_drop is not None:
            self.on_drop(self._item)  # type: ignore[arg-type]
        self.put_count += 1
        self._item = item
        self._event.set()
        if self._on_put is not None:
            self._on_put()
        return dropped

    def take_nowait(self) -> T | None:
        item, self._item = self._item, None
        self._event.clear()
        return item

    async def get(self) -> T:
        """The next item; raises `SlotClosed` once the slot is closed."""
        while self._item is None:
            if self._closed:
                raise SlotClosed
            await self._event.wait()
        item = self.take_nowait()
        assert item is not None
        return item

    def close(self) -> None:
        """Wake every waiter with `SlotClosed` and drop the held item."""
        self._closed = True
        self._item = None
        self._event.set()
