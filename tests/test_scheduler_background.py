"""Job frames in the scheduler (`run_background`): they fill the batch slots live frames leave, run alone when
no live frame waits, never put one stream twice in a step, and never push a live frame out of a step."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.scheduler import Scheduler
from livediff.session import FrameIn

pytestmark = pytest.mark.timeout(120)


class RecordingEngine(StreamEngine):
    """Records the streams of every step."""

    batches: list[list[int]]

    def step(self, batch):  # type: ignore[no-untyped-def]
        self.batches.append([id(stream) for stream, _ in batch])
        return super().step(batch)


@pytest.fixture()
async def scheduler(tiny_parts):  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=4, fresh_frames=False)

    def make() -> StreamEngine:
        engine = RecordingEngine(EngineSettings(model="tiny", height=64, width=64, max_batch=3), tiny_parts)
        engine.batches = []
        return engine

    await sched.load(make, warmup_frames=0)
    yield sched
    await sched.close()


def image(value: int) -> torch.Tensor:
    return torch.full((64, 64, 3), value, dtype=torch.uint8)


async def test_job_frames_fill_the_slots_live_frames_leave(scheduler) -> None:  # type: ignore[no-untyped-def]
    live = await scheduler.open_session(StreamParams(prompt="live"))
    job_a, job_b = [await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams()) for _ in range(2)]
    scheduler._task.cancel()  # drive the ticks by hand
    pending = asyncio.ensure_future(
        scheduler.run_background([(job_a, image(10)), (job_a, image(20)), (job_b, image(30))])
    )
    await asyncio.sleep(0)  # queued
    live.inbox.put(FrameIn(image(200), None, None, time.monotonic()))
    delivered = await scheduler.tick()
    # max_batch 3: the live frame first, then one frame of each job stream (never job_a twice)
    assert [s.id for s, _ in delivered] == [live.id]
    assert delivered[0][1].batch_size == 1  # the live frame's own count; the step itself held 3
    assert scheduler.engine.batches[-1] == [id(live.stream), id(job_a), id(job_b)]
    assert not pending.done()
    await scheduler.tick()  # job_a's second frame runs alone: no live frame waits
    assert scheduler.engine.batches[-1] == [id(job_a)]
    outputs = await pending
    assert len(outputs) == 3 and all(o.shape == (64, 64, 3) and o.dtype == torch.uint8 for o in outputs)
    # the outputs are in the order given, each its own frame's (a stream's output follows its input)
    assert (outputs[0].float().mean() - outputs[1].float().mean()).abs() > 0.1


async def test_live_frames_keep_their_places_when_jobs_wait(scheduler) -> None:  # type: ignore[no-untyped-def]
    sessions = [await scheduler.open_session(StreamParams()) for _ in range(3)]
    jobs = [await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams()) for _ in range(3)]
    scheduler._task.cancel()
    pending = asyncio.ensure_future(scheduler.run_background([(j, image(5)) for j in jobs]))
    await asyncio.sleep(0)
    for s in sessions:
        s.inbox.put(FrameIn(image(100), None, None, time.monotonic()))
    assert {s.id for s, _ in await scheduler.tick()} == {s.id for s in sessions}
    assert scheduler.engine.batches[-1] == [id(s.stream) for s in sessions]  # no job frame took a live place
    await scheduler.tick()
    assert scheduler.engine.batches[-1] == [id(j) for j in jobs]
    assert len(await pending) == 3


async def test_the_loop_runs_job_frames_when_idle_and_cancelling_withdraws_them(scheduler) -> None:  # type: ignore[no-untyped-def]
    stream = await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams())
    outputs = await asyncio.wait_for(scheduler.run_background([(stream, image(1)), (stream, image(2))]), 60)
    assert len(outputs) == 2
    scheduler._task.cancel()
    await asyncio.gather(scheduler._task, return_exceptions=True)
    waiting = asyncio.ensure_future(scheduler.run_background([(stream, image(3))]))
    await asyncio.sleep(0)
    assert len(scheduler.background) == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert len(scheduler.background) == 0
