"""The chunk inbox (chunk cadence, whole stale chunks dropped) and the chunk pacer (no bursts)."""

from __future__ import annotations

import asyncio
import time

import pytest

from livediff.chunks import ChunkInbox
from livediff.transport.pacing import ChunkPacer

pytestmark = pytest.mark.timeout(60)


def test_chunks_collect_5_then_4_and_a_newer_chunk_drops_a_waiting_one_whole() -> None:
    dropped: list[list[int]] = []
    inbox: ChunkInbox[int] = ChunkInbox(5, 4, on_drop=dropped.append)
    for i in range(4):
        assert inbox.put(i) == 0 and not inbox.ready
    inbox.put(4)
    assert inbox.peek() == [0, 1, 2, 3, 4]
    for i in range(5, 10):  # not taken yet: the next chunk is a first chunk too (5), and replaces it
        inbox.put(i)
    assert dropped == [[0, 1, 2, 3, 4]] and inbox.dropped_frames == 5 and inbox.dropped_chunks == 1
    assert inbox.take() == [5, 6, 7, 8, 9] and inbox.need == 4
    assert [inbox.put(i) for i in range(10, 18)] == [0, 0, 0, 0, 0, 0, 0, 4]
    assert dropped[-1] == [10, 11, 12, 13] and inbox.take() == [14, 15, 16, 17]
    assert inbox.take() is None


def test_a_reset_drops_the_backlog_and_starts_a_first_chunk() -> None:
    inbox: ChunkInbox[int] = ChunkInbox(5, 4)
    for i in range(5):
        inbox.put(i)
    inbox.take()
    for i in range(6):
        inbox.put(i)
    inbox.reset()
    assert not inbox.ready and inbox.need == 5
    for i in range(4):
        inbox.put(i)
    assert not inbox.ready


async def test_the_pacer_plays_a_chunk_out_at_its_offsets_not_as_a_burst() -> None:
    played: list[tuple[float, str]] = []
    done = asyncio.Event()

    def put(item: str) -> None:
        played.append((time.monotonic(), item))
        if item == "d":
            done.set()

    pacer: ChunkPacer[str] = ChunkPacer(put)
    task = asyncio.create_task(pacer.run())
    try:
        start = time.monotonic()
        pacer.play([(0.0, "a"), (0.1, "b"), (0.2, "c"), (0.3, "d")], now=start)
        await asyncio.wait_for(done.wait(), 30)
        assert [item for _, item in played] == ["a", "b", "c", "d"]
        for (at, _), offset in zip(played, (0.0, 0.1, 0.2, 0.3)):
            assert at >= start + offset  # never before its time (how late depends on the machine's load)
    finally:
        task.cancel()


async def test_a_new_chunk_sends_the_previous_chunks_late_frames_at_once() -> None:
    played: list[str] = []
    pacer: ChunkPacer[str] = ChunkPacer(played.append)
    pacer.play([(0.0, "a"), (100.0, "b")])
    pacer.play([(100.0, "c")])  # no task ran: "a" and "b" were due still, and go out first, at once
    assert played == ["a", "b"] and pacer.pending == 1
