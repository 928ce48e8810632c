"""Batch choice by deadline (`livediff.deadline`): the rule on hand-built step tables, the scheduler's
pick under it, the measurement on the tiny engine, and what /readyz and /metrics say of it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.deadline import StepTable, measure_step_times, tightest_interval_ms
from livediff.engine import StreamEngine
from livediff.scheduler import Scheduler
from livediff.session import FrameIn

# An H200-like table: ~5.9 ms per step that does not grow with the batch, ~4.2 ms per frame that does.
H200 = StepTable({b: 5.9 + 4.2 * b for b in range(1, 9)})  # 10.1, 14.3, ..., 39.5 ms


def test_the_largest_batch_whose_step_fits_the_tightest_interval() -> None:
    thirty = 1000 / 30
    assert H200.batch_for(8, thirty, max_batch=8) == 6  # 31.1 ms fits 33.3, 7 frames (35.3 ms) would not
    assert H200.batch_for(3, thirty, max_batch=8) == 3  # never more than are ready
    assert H200.batch_for(8, thirty, max_batch=4) == 4  # nor more than max_batch
    assert H200.batch_for(8, 1000 / 60, max_batch=8) == 2  # a 60 fps stream: 14.3 ms fits 16.7
    assert H200.batch_for(8, 8.0, max_batch=8) == 8  # not even one frame fits: the fullest batch
    assert H200.batch_for(0, thirty, max_batch=8) == 0
    assert StepTable().batch_for(5, thirty, max_batch=4) == 4  # nothing measured: as without the rule


def test_capacity_counts_streams_at_a_camera_rate() -> None:
    # batch b fits 33.3 ms floor(33.3 / t(b)) times: b=1 3x3=3, b=2 2x2=4, b=3 2x... 18.5 -> 1x3=3, b=6 1x6=6
    assert H200.capacity(30) == 6
    assert H200.capacity(60) == 2  # t(1)=10.1 fits 16.7 once, t(2)=14.3 once: 2 streams
    assert StepTable({1: 5.0, 4: 8.0}).capacity(30) == 16  # 4 frames every 8 ms, 4 steps per interval
    assert StepTable({1: 50.0}).capacity(30) == 0
    described = StepTable({1: 10.123, 2: 14.3}).describe()
    assert described == {"step_ms": {"1": 10.12, "2": 14.3}, "streams_at_30fps": 4}


def test_a_table_refuses_nonsense_and_unknown_rhythms_count_as_30_fps() -> None:
    with pytest.raises(ValueError):
        StepTable({0: 5.0})
    with pytest.raises(ValueError):
        StepTable({1: 0.0})
    assert tightest_interval_ms([None, 0.05]) == pytest.approx(1000 / 30)
    assert tightest_interval_ms([0.02, 0.05]) == pytest.approx(20.0)
    assert tightest_interval_ms([]) == pytest.approx(1000 / 30)


async def test_the_scheduler_batches_by_deadline_when_asked(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=4, batch_by_deadline=True)
    await sched.load(
        lambda: StreamEngine(EngineSettings(model="tiny", height=64, width=64, max_batch=4), tiny_parts),
        warmup_frames=0,
    )
    try:
        sched._task.cancel()  # type: ignore[union-attr]  # drive ticks by hand
        sessions = [await sched.open_session(StreamParams(prompt="a", seed=i)) for i in range(4)]
        for i, session in enumerate(sessions):  # cameras at 30 fps
            for k in range(4):
                session.rhythm.observe(k / 30)
            session.inbox.put(FrameIn(torch.full((64, 64, 3), i, dtype=torch.uint8), None, None, float(i)))
        sched.step_table = StepTable({1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0})  # 3 frames fit 33 ms, 4 do not
        first = await sched.tick()
        assert [s.id for s, _ in first] == [s.id for s in sessions[:3]]  # oldest waiting first
        assert first[0][1].batch_size == 3
        second = await sched.tick()
        assert [s.id for s, _ in second] == [sessions[3].id]
        sched.batch_by_deadline = False  # off: every ready frame up to max_batch
        for i, session in enumerate(sessions):
            session.inbox.put(FrameIn(torch.full((64, 64, 3), i, dtype=torch.uint8), None, None, 10.0 + i))
        assert len(await sched.tick()) == 4
    finally:
        await sched.close()


def test_step_times_are_measured_for_every_batch_size(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    engine = StreamEngine(EngineSettings(model="tiny", height=64, width=64, max_batch=3), tiny_parts)
    table = measure_step_times(engine, 3, runs=2)
    assert sorted(table.step_ms) == [1, 2, 3] and all(ms > 0 for ms in table.step_ms.values())
    with pytest.raises(ValueError):
        measure_step_times(engine, 3, runs=0)


async def test_readyz_and_metrics_say_how_many_30_fps_streams_the_engine_holds(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    from aiohttp.test_utils import TestServer

    from livediff.config import ServerSettings
    from livediff.server import create_app
    from livediff.server.common import SERVICE

    app = create_app(EngineSettings(model="tiny", height=64, width=64, max_batch=2), ServerSettings(),
                     parts=tiny_parts)  # fmt: skip
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        while not app[SERVICE].ready:  # polled, as test_server_errors does: loading has no event to wait on
            assert app[SERVICE].load_error is None, app[SERVICE].load_error
            await asyncio.sleep(0.05)
        async with http.get(server.make_url("/readyz")) as response:
            ready = await response.json()
            assert response.status == 200, ready
        steps = ready["engine"]["steps"]
        table = app[SERVICE].scheduler.step_table
        assert sorted(steps["step_ms"]) == ["1", "2"]
        assert steps["streams_at_30fps"] == table.capacity(30)
        assert ready["engine"]["batch_by_deadline"] is False  # CPU: off unless asked for
        async with http.get(server.make_url("/metrics")) as response:
            text = await response.text()
        assert f'livediff_capacity_streams{{fps="30"}} {float(table.capacity(30))}' in text
        assert 'livediff_step_seconds_by_batch{batch="2"}' in text
    finally:
        await server.close()
