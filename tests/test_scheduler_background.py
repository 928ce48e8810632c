"""Job frames in the scheduler (`run_background`): they fill the batch slots live frames leave as far as the
measured step times allow, run alone when no live frame waits, never put one stream twice in a step, and
never push a live frame out of a step."""

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
    scheduler._measured = lambda size, ms: None  # keep the step times below (what a GPU measures)
    scheduler.step_ms = {1: 20.0, 2: 20.5, 3: 21.0}  # a fuller batch costs next to nothing
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


async def test_where_a_fuller_batch_costs_its_size_job_frames_wait_for_idle_time(scheduler) -> None:  # type: ignore[no-untyped-def]
    """What a CPU measures: each frame adds its own time, so no job frame joins a live step (it would make
    the step 50% longer); between camera frames, a job step of one frame (half an interval at most)."""
    live = await scheduler.open_session(StreamParams())
    job = await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams())
    scheduler._task.cancel()
    scheduler._measured = lambda size, ms: None
    scheduler.step_ms = {1: 10.0, 2: 20.0, 3: 30.0}
    for i in range(5):  # a 30 fps camera: its interval is known
        live.rhythm.observe(100.0 + i / 30)
    pending = asyncio.ensure_future(scheduler.run_background([(job, image(5))]))
    await asyncio.sleep(0)
    assert scheduler.background_slots(1) == 0 and scheduler.background_slots(0) == 1
    live.inbox.put(FrameIn(image(100), None, None, time.monotonic()))
    await scheduler.tick()
    assert scheduler.engine.batches[-1] == [id(live.stream)]
    await scheduler.tick()
    assert scheduler.engine.batches[-1] == [id(job)]
    assert len(await pending) == 1
    scheduler.step_ms = {1: 10.0, 2: 11.0}  # unmeasured sizes are tried once, one frame more, to learn them
    scheduler.background.extend([object()])  # type: ignore[arg-type]
    assert scheduler.background_slots(1) == 2
    scheduler.background.clear()


async def test_live_frames_keep_their_places_when_jobs_wait(scheduler) -> None:  # type: ignore[no-untyped-def]
    sessions = [await scheduler.open_session(StreamParams()) for _ in range(3)]
    jobs = [await scheduler.run_on_worker(scheduler.engine.open_stream, StreamParams()) for _ in range(3)]
    scheduler._task.cancel()
    scheduler._measured = lambda size, ms: None
    scheduler.step_ms = {1: 5.0, 2: 5.2, 3: 5.4}  # a GPU's: a full job step fits in half a camera interval
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
