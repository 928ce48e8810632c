"""A blocked event loop writes every thread's stack (livediff.server.stall)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from livediff.server.stall import StallReporter


def block_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # what a thread join or a lock taken on the loop does to a server


async def serve_for(reporter: StallReporter, seconds: float, blocked_s: float = 0.0) -> None:
    reporter.start()
    try:
        await asyncio.sleep(seconds / 2)
        if blocked_s:
            block_the_loop_for(blocked_s)
        await asyncio.sleep(seconds / 2)
    finally:
        reporter.stop()


def test_a_blocked_loop_writes_each_threads_stack_and_says_how_long(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as file:
        asyncio.run(serve_for(StallReporter(after_s=1.0, file=file), 0.6, blocked_s=2.5))
    text = out.read_text()
    assert "Timeout (0:00:01)!" in text
    assert "block_the_loop_for" in text and "serve_for" in text  # where the loop was stuck
    assert "livediff: the event loop was blocked for 2." in text


def test_a_turning_loop_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as file:
        asyncio.run(serve_for(StallReporter(after_s=1.0, file=file), 2.5))  # re-armed ten times
        time.sleep(1.3)  # past the last deadline: stop() cancelled the timer
    assert out.read_text() == ""


def test_the_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="after_s must be positive"):
        StallReporter(after_s=0)
