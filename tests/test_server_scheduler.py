"""The scheduler with a real tiny engine and no WebRTC: batching, order, admission, one worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.scheduler import AdmissionError, Scheduler
from livediff.session import CameraRhythm, FrameIn, FrameOut, Session

pytestmark = pytest.mark.timeout(120)


class ThreadCheckingEngine(StreamEngine):
    """Records the thread of every engine call."""

    threads: set[str]

    def open_stream(self, params=None):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        return super().open_stream(params)

    def update(self, stream, params):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        return super().update(stream, params)

    def step(self, batch):  # type: ignore[no-untyped-def]
        self.threads.add(threading.current_thread().name)
        return super().step(batch)


class Steps:
    def __init__(self) -> None:
        self.batches: list[list[tuple[Session, FrameOut]]] = []

    def on_step(self, outputs: list[tuple[Session, FrameOut]], dropped_out: int = 0) -> None:
        self.batches.append(outputs)


def frame(value: int, received: float) -> FrameIn:
    return FrameIn(torch.full((64, 64, 3), value, dtype=torch.uint8), None, None, received)


@pytest.fixture()
async def scheduler(tiny_parts):  # type: ignore[no-untyped-def]
    steps = Steps()
    sched = Scheduler(max_sessions=3, observer=steps)

    def make() -> StreamEngine:
        engine = ThreadCheckingEngine(EngineSettings(model="tiny", height=64, width=64, max_batch=2), tiny_parts)
        engine.threads = set()
        return engine

    await sched.load(make, warmup_frames=1)
    sched.steps_seen = steps  # type: ignore[attr-defined]
    yield sched
    await sched.close()


async def test_batches_newest_frames_oldest_waiting_first(scheduler) -> None:  # type: ignore[no-untyped-def]
    a = await scheduler.open_session(StreamParams(prompt="a", strength=1.0))
    b = await scheduler.open_session(StreamParams(prompt="zebra stripes everywhere", strength=1.0))
    c = await scheduler.open_session(StreamParams(prompt="a", strength=1.0))
    scheduler._task.cancel()  # drive ticks by hand
    now = time.monotonic()
    a.inbox.put(frame(1, now - 0.3))
    a.inbox.put(frame(100, now - 0.1))  # replaces the older frame: a drop
    b.inbox.put(frame(100, now - 0.2))
    c.inbox.put(frame(100, now - 0.05))
    assert a.inbox.replaced == 1
    delivered = await scheduler.tick()
    # max_batch 2: the two oldest waiting (b at -0.2, a's newest at -0.1); c waits for the next tick
    assert [s.id for s, _ in delivered] == [b.id, a.id]
    assert delivered[0][1].batch_size == 2 and int(delivered[1][1].source.image[0, 0, 0]) == 100
    assert c.inbox.ready and not a.inbox.ready
    # same input, different prompts: different outputs
    out_a, out_b = a.outbox.peek(), b.outbox.peek()
    assert (out_a.image.float() - out_b.image.float()).abs().mean() > 1.0
    assert [s.id for s, _ in await scheduler.tick()] == [c.id]
    # param update goes through the worker thread and applies to the next frame
    truncated = await scheduler.update(a, a.params.replace(prompt="zebra stripes everywhere"))
    assert truncated is False
    a.inbox.put(frame(100, time.monotonic()))
    b.inbox.put(frame(100, time.monotonic()))
    await scheduler.tick()
    assert (a.outbox.peek().image.float() - b.outbox.peek().image.float()).abs().mean() < 1e-3
    assert scheduler.engine.threads == {next(iter(scheduler.engine.threads))}
    assert next(iter(scheduler.engine.threads)).startswith("livediff-worker")


async def test_admission_and_close(scheduler) -> None:  # type: ignore[no-untyped-def]
    sessions = [await scheduler.open_session(StreamParams()) for _ in range(3)]
    with pytest.raises(AdmissionError):
        await scheduler.open_session(StreamParams())
    await scheduler.close_session(sessions[0])
    assert sessions[0].closed and sessions[0].id not in scheduler.sessions
    sessions[0].inbox.put(frame(1, time.monotonic()))  # ignored once closed
    assert not sessions[0].inbox.ready
    await scheduler.open_session(StreamParams())


async def test_a_closed_session_holding_a_frame_does_not_stop_the_event_loop(scheduler) -> None:  # type: ignore[no-untyped-def]
    """A session marked closed while a frame still waits in its inbox (the instant between a close and
    its inbox emptying, as when a peer leaves mid-step) once made the loop go round without awaiting:
    the server's whole event loop stopped, its process running (issue 11's stalled TURN server)."""
    session = await scheduler.open_session(StreamParams())
    done, stuck = threading.Event(), []

    def watchdog() -> None:  # off the loop: if the loop stops, note it and take the frame away so it goes on
        if not done.wait(5):
            stuck.append(True)
            session.inbox.take_nowait()

    threading.Thread(target=watchdog, daemon=True).start()
    session.inbox.put(frame(1, time.monotonic()))  # wakes the loop
    session.state = "closed"
    await asyncio.sleep(0.3)  # the loop must let this run
    done.set()
    assert not stuck, "the scheduler's loop spun on a closed session's frame and blocked the event loop"
    assert session.inbox.ready  # nothing stepped it: a closed session's frames are never picked


async def test_closing_a_session_empties_its_mailboxes_at_once(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    session.inbox.put(frame(1, time.monotonic()))
    closing = asyncio.ensure_future(scheduler.close_session(session))
    await asyncio.sleep(0)  # the close has started, its cleanups have not run
    assert session.closed and not session.inbox.ready and session.inbox.closed and session.outbox.closed
    await closing


async def test_loop_processes_frames_as_they_arrive(scheduler) -> None:  # type: ignore[no-untyped-def]
    session = await scheduler.open_session(StreamParams())
    for i in range(3):
        session.inbox.put(frame(i * 50, time.monotonic()))
        out = await session.outbox.get()
        assert out.image.shape == (64, 64, 3) and out.source.received <= out.scheduled <= out.finished
        assert set(out.stages_ms) == {"preprocess", "encode", "unet", "decode", "postprocess"}


async def test_passthrough_frames_the_transport_can_send_skip_the_worker(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    def pass_through(session: Session, frame: FrameIn) -> torch.Tensor | None:
        return None if frame.pts == 1 else frame.image  # pts 1 stands for "needs converting"

    steps = Steps()
    sched = Scheduler(max_sessions=2, observer=steps, pass_through=pass_through)

    def make() -> StreamEngine:
        engine = ThreadCheckingEngine(EngineSettings(model="tiny", height=64, width=64), tiny_parts)
        engine.threads = set()
        return engine

    await sched.load(make, warmup_frames=0)
    try:
        through = await sched.open_session(StreamParams(passthrough=True))
        model = await sched.open_session(StreamParams())
        sched.engine.threads.clear()
        as_is = frame(7, time.monotonic())
        through.inbox.put(as_is)
        # sent inside put(), on this thread: no engine step, no batch
        assert not through.inbox.ready and sched.steps == 0 and sched.engine.threads == set()
        out = through.outbox.take_nowait()
        assert out.image is as_is.image and out.batch_size == 0 and out.stages_ms == {}
        assert through.stats.processed == 1 and steps.batches[-1] == [(through, out)]
        # a frame pass_through refuses, and a model session's frame: both through the worker
        refused = FrameIn(torch.full((64, 64, 3), 9, dtype=torch.uint8), 1, None, time.monotonic())
        through.inbox.put(refused)
        model.inbox.put(frame(7, time.monotonic()))
        outs = {session.id: out for session, out in [(through, await through.outbox.get()),
                                                      (model, await model.outbox.get())]}  # fmt: skip
        assert sched.steps >= 1 and all(name.startswith("livediff-worker") for name in sched.engine.threads)
        assert outs[through.id].batch_size >= 1 and torch.equal(outs[through.id].image, refused.image)
        assert set(outs[model.id].stages_ms) >= {"encode", "unet", "decode"}
    finally:
        await sched.close()


def rhythm_session(scheduler: Scheduler, interval: float, last: float) -> Session:
    """A session whose camera sent a frame every `interval` s, the last one at `last` (still waiting)."""
    session = Session(params=StreamParams())
    for k in range(5, -1, -1):
        session.rhythm.observe(last - k * interval)
    session.inbox.put(frame(1, last))
    scheduler.sessions[session.id] = session
    return session


def test_fresher_frames_are_awaited_only_when_every_waiting_frame_is_stale() -> None:
    sched = Scheduler(max_sessions=4)
    now = 100.0
    assert sched.fresher_frames_due_in(now) is None  # nothing waits
    stale = rhythm_session(sched, interval=0.040, last=now - 0.030)  # 30 of 40 ms old: next one due in 10
    assert sched.fresher_frames_due_in(now) == pytest.approx(0.040 * 1.1 - 0.030)
    fresh = rhythm_session(sched, interval=0.040, last=now - 0.010)  # one fresh frame is reason to go now
    assert sched.fresher_frames_due_in(now) is None
    del sched.sessions[fresh.id]
    new = Session(params=StreamParams())  # a camera whose rhythm is not known yet: go now
    new.inbox.put(frame(1, now - 0.5))
    sched.sessions[new.id] = new
    assert sched.fresher_frames_due_in(now) is None
    del sched.sessions[new.id]
    assert sched.fresher_frames_due_in(now + 0.020) is None  # past the due time: go with what there is
    assert stale.inbox.ready


async def test_a_stale_frame_waits_for_the_next_one_and_no_longer(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    """Every wait here ends on an event or on the hold's own due time, never on the test's timing: a
    loaded machine can make any step slow without changing what is asserted."""
    sched = Scheduler(max_sessions=2)
    await sched.load(
        lambda: StreamEngine(EngineSettings(model="tiny", height=64, width=64), tiny_parts), warmup_frames=0
    )
    sched._task.cancel()  # drive the hold by hand
    try:
        session = await sched.open_session(StreamParams())
        # a camera with a 4 s interval whose last frame is already 60% of an interval old
        interval = 4.0
        start = time.monotonic()
        for k in range(6):
            session.inbox.put(frame(k, start - (5 - k) * interval - 0.6 * interval))
        last = session.rhythm.last
        assert last is not None and session.rhythm.interval == pytest.approx(interval)
        # the rule: wait until that camera's next frame is due, plus a tenth of an interval
        now = last + 0.6 * interval
        assert sched.fresher_frames_due_in(now) == pytest.approx(0.5 * interval)
        assert sched.fresher_frames_due_in(last + 1.2 * interval) is None  # past due: step now
        assert sched.fresher_frames_due_in(last + 0.4 * interval) is None  # fresh enough: step now
        hold = asyncio.ensure_future(sched._hold_for_fresher_frames())
        for _ in range(5):  # let the hold start waiting (its due time is about 2 s away)
            await asyncio.sleep(0)
        assert not hold.done()
        session.inbox.put(frame(99, time.monotonic()))  # the next frame: the hold ends at once
        await asyncio.wait_for(hold, 10.0)
        assert int(session.inbox.peek().image[0, 0, 0]) == 99
        # the camera stalls: the hold gives up at the due time, not before (a short interval now)
        short = 0.2
        session.rhythm = CameraRhythm()
        begin = time.monotonic()
        for k in range(5):
            session.inbox.put(frame(200 + k, begin - (4 - k) * short - 0.6 * short))
        started = time.monotonic()
        due = sched.fresher_frames_due_in(started)  # the due time is absolute: last + 1.1 intervals
        assert due is not None
        await asyncio.wait_for(sched._hold_for_fresher_frames(), 10.0)  # it ends by itself: no frame came
        assert time.monotonic() - started >= due - 0.001
    finally:
        await sched.close()
