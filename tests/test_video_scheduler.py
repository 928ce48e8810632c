"""The scheduler with the tiny video engine and no WebRTC: chunk cadence, pacing, reset, freeing."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.video import VideoEngine
from livediff.errors import ConfigError
from livediff.models.video import load_video_model
from livediff.scheduler import Scheduler
from livediff.session import FrameIn, FrameOut, Session

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]
SIZE = 64


@pytest.fixture(scope="module")
def video_parts():  # type: ignore[no-untyped-def]
    return load_video_model("tiny-video")


@pytest.fixture()
async def scheduler(video_parts):  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=3)
    await sched.load(lambda: VideoEngine(EngineSettings(model="tiny-video", height=SIZE, width=SIZE), video_parts),
                     warmup_frames=1)  # fmt: skip
    yield sched
    await sched.close()


def frame(value: int, received: float) -> FrameIn:
    return FrameIn(torch.full((SIZE, SIZE, 3), value, dtype=torch.uint8), value, None, received)


async def outputs(session: Session, count: int) -> list[tuple[float, FrameOut]]:
    got = []
    for _ in range(count):
        out = await asyncio.wait_for(session.outbox.get(), 60)
        got.append((time.monotonic(), out))
    return got


async def test_a_chunk_comes_back_frame_by_frame_at_the_cameras_pace(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    start = time.monotonic()
    for i in range(5):  # a 10 fps camera, its frames stamped 0.1 s apart
        session.inbox.put(frame(10 + i, start - 0.4 + 0.1 * i))
    got = await outputs(session, 5)
    assert [out.source.pts for _, out in got] == [10, 11, 12, 13, 14]  # each frame with its own timestamps
    assert got[-1][0] - got[0][0] >= 0.4 - 0.01  # paced over the input's 0.4 s, not a burst
    assert all(out.stages_ms["chunk_wait"] >= 0 for _, out in got)
    assert {"encode", "transformer", "decode"} <= set(got[0][1].stages_ms)
    assert session.stats.processed == 5 and session.inbox.replaced == 0
    start = time.monotonic()
    for i in range(4):  # the next chunk takes 4
        session.inbox.put(frame(20 + i, start - 0.3 + 0.1 * i))
    got = await outputs(session, 4)
    assert [out.source.pts for _, out in got] == [20, 21, 22, 23]


async def test_when_behind_whole_stale_chunks_are_dropped_and_counted(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    scheduler._task.cancel()  # drive ticks by hand: the model is "behind"
    now = time.monotonic()
    for i in range(10):
        session.inbox.put(frame(i, now))
    assert session.inbox.replaced == 5 and session.chunks.dropped_chunks == 1
    delivered = await scheduler.tick()
    assert [out.source.pts for _, out in delivered] == [5, 6, 7, 8, 9]
    for i in range(12):
        session.inbox.put(frame(100 + i, now))
    assert session.inbox.replaced == 5 + 8
    delivered = await scheduler.tick()
    assert [out.source.pts for _, out in delivered] == [108, 109, 110, 111]


async def test_two_sessions_share_one_step(scheduler) -> None:  # type: ignore[no-untyped-def]
    a = await scheduler.open_session(StreamParams(prompt="a red fox"))
    b = await scheduler.open_session(StreamParams(prompt="ink", steps=2))
    scheduler._task.cancel()
    now = time.monotonic()
    for i in range(5):
        a.inbox.put(frame(i, now))
        b.inbox.put(frame(i, now))
    delivered = await scheduler.tick()
    # one step for both; b's 2 steps (Stream Batch) answer its chunk one step later
    assert [s for s, _ in delivered] == [a] * 5 and {out.batch_size for _, out in delivered} == {2}
    assert scheduler.steps == 1 and b.chunks is not None and b.chunks.in_flight == 1
    for i in range(5, 9):
        a.inbox.put(frame(i, now + 0.1 * i))
        b.inbox.put(frame(i, now + 0.1 * i))
    delivered = await scheduler.tick()
    assert [s for s, _ in delivered] == [a] * 4 + [b] * 5 and scheduler.steps == 2
    assert [out.source.pts for s, out in delivered if s is b] == [0, 1, 2, 3, 4]  # b's first chunk, its own frames


async def test_a_reset_drops_the_backlog_and_starts_a_first_chunk(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    scheduler._task.cancel()
    now = time.monotonic()
    for i in range(5):
        session.inbox.put(frame(i, now))
    await scheduler.tick()
    for i in range(6):
        session.inbox.put(frame(i, now))
    await scheduler.reset(session)
    assert not session.chunks.ready and session.stream.frames_needed == 5 and session.stream.cache.frames == 0
    for i in range(5):
        session.inbox.put(frame(i, now))
    assert len(await scheduler.tick()) == 5


async def test_a_closed_session_frees_its_cache(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    for i in range(5):
        session.inbox.put(frame(i, time.monotonic()))
    await outputs(session, 1)
    freed = weakref.ref(session.stream.cache.keys)
    await scheduler.close_session(session)
    assert session.id not in scheduler.sessions
    del session
    for _ in range(500):  # the loop may hold the last step's locals for an iteration or two
        gc.collect()
        if freed() is None:
            break
        await asyncio.sleep(0.01)
    assert freed() is None


async def test_reset_is_refused_by_an_image_engine(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=1)
    await sched.load(lambda: StreamEngine(EngineSettings(model="tiny", height=64, width=64), tiny_parts), 0)
    try:
        session = await sched.open_session(StreamParams())
        assert session.chunks is None
        with pytest.raises(ConfigError, match="reset"):
            await sched.reset(session)
    finally:
        await sched.close()


async def test_background_frames_are_refused_by_a_chunked_engine(scheduler) -> None:  # type: ignore[no-untyped-def]
    """Job frames fill an image engine's free batch slots; a video model's steps take whole chunks of
    live sessions only, so they are refused at once (a queued one would never run, and the loop would
    go round on it without awaiting)."""
    from livediff.errors import ConfigError

    stream = await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams())
    with pytest.raises(ConfigError, match="image model"):
        await scheduler.run_background([(stream, torch.zeros((SIZE, SIZE, 3), dtype=torch.uint8))])
    assert not scheduler.background


async def test_the_warm_up_log_speaks_of_chunks(video_parts, caplog) -> None:  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=1)
    with caplog.at_level("INFO", logger="livediff.scheduler"):
        await sched.load(lambda: VideoEngine(EngineSettings(model="tiny-video", height=SIZE, width=SIZE), video_parts),
                         warmup_frames=2)  # fmt: skip
    await sched.close()
    assert "warming up: 2 chunks" in caplog.text, caplog.text
