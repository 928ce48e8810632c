"""The scheduler: which frames go into the next engine step, and the one worker thread that runs it.

All sessions that share the engine (one model, one size) are served here. Each tick takes the
newest frame of every session that has one, oldest waiting first, up to `max_batch`, and runs
them as one `StreamEngine.step` on the device's single worker thread; the event loop only does
bookkeeping, so signalling stays responsive while the model runs. Everything else that touches
the engine (opening streams, param updates that run the text encoder) goes through the same
thread, because the engine is not thread-safe.

WebRTC is not known here: `convert_in` / `convert_out` (given by the server) turn the
transport's frames into engine tensors and back, on the worker thread, only for frames that are
actually processed (a dropped frame costs no conversion).

Background frames (clips, `livediff.jobs.worker`) come through `run_background`: they take the
batch slots live frames leave in a step, and run steps of their own when no live frame waits. A
live frame is never held back for them: it waits at most for the step already running. Two frames
of one engine stream never share a step (a stream's frames are in order). How many they get is
read off the measured step time per batch size (`step_ms`), so the same rule suits a GPU, where a
fuller batch costs little more, and a CPU, where it costs about its size: beside live frames, only
as many as keep the step within `BACKGROUND_SHARE` more than the live frames' own step; in a step of
their own while sessions are live, only as many as run within `IDLE_SHARE` of the shortest camera
interval (at least one, so a job always moves); with no live session, a full batch.

Fresh frames first (`fresh_frames`): a model slower than the camera finds, each time it is free,
a newest frame that has already waited half a camera interval on average. When every waiting
frame is older than half its camera's interval, the step waits (at most until the next frames
are due) for newer ones: each output then shows a fresher input, for a little idle time (about
an eighth of a camera interval per step on average). A faster model always finds fresh frames
and never waits.

Batch by deadline (`batch_by_deadline`, `livediff.deadline`): with the step time of each batch size
measured at warm-up (`load(measure_steps=True)`), a tick takes the largest batch whose step fits the
shortest camera interval of the open sessions, and leaves the other ready frames to the next tick.

Passthrough sessions (`StreamParams.passthrough`, transport measurements) need no engine: when
`pass_through` (also the server's) can send a frame as it came, the frame goes straight to the
outbox the moment it arrives, so it never waits behind a model step nor takes a place in a
batch. Frames it cannot send as they are (another size than the engine's) take the worker path,
where the engine returns its input.

A chunked engine (a causal video model, `chunked = True`) takes frames a chunk at a time: each
arriving frame moves from the inbox into the session's `ChunkInbox` (the chunk cadence: a complete
chunk waits for a step, a newer complete chunk drops a waiting one whole, counted as inbox drops),
each tick runs the complete chunks of up to `max_batch` sessions as one engine step, and each
chunk's output frames go to the outbox through the session's `ChunkPacer`, at the input's rhythm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from livediff.admission import Admission, AdmissionError
from livediff.chunks import ChunkInbox
from livediff.config import EngineSettings, StreamParams
from livediff.deadline import StepTable, measure_step_times, tightest_interval_ms
from livediff.errors import ConfigError
from livediff.session import FrameIn, FrameOut, Session
from livediff.transport.pacing import ChunkPacer

log = logging.getLogger(__name__)

R = TypeVar("R")
BACKGROUND_SHARE = 0.1
"""Background frames may make a step with live frames this much longer (by the measured `step_ms`)."""
IDLE_SHARE = 0.5
"""A background step while sessions are live lasts at most this part of the shortest camera interval:
a live frame arriving meanwhile waits for it (its p99 age grows by at most that)."""
ConvertIn = Callable[[Session, FrameIn], torch.Tensor]
ConvertOut = Callable[[Session, FrameIn, torch.Tensor], Any]
PassThrough = Callable[[Session, FrameIn], Any | None]


class Engine(Protocol):
    """What the scheduler needs of `livediff.engine.StreamEngine`."""

    settings: EngineSettings

    def open_stream(self, params: StreamParams | None = None) -> Any: ...
    def update(self, stream: Any, params: StreamParams) -> None: ...
    def step(self, batch: Any) -> Any: ...


class StepObserver(Protocol):
    def on_step(self, outputs: list[tuple[Session, FrameOut]], dropped_out: int = 0) -> None: ...


class StepObservers:
    """Several observers as one, called in order."""

    def __init__(self, *observers: StepObserver) -> None:
        self.observers = observers

    def on_step(self, outputs: list[tuple[Session, FrameOut]], dropped_out: int = 0) -> None:
        for observer in self.observers:
            observer.on_step(outputs, dropped_out)


@dataclass
class _Pick:
    session: Session
    frame: FrameIn


@dataclass(eq=False)
class _Background:
    """A background frame waiting for a step: `image` through `stream`, the output set on `future`."""

    stream: Any
    image: torch.Tensor
    future: asyncio.Future[torch.Tensor]


def _identity_in(session: Session, frame: FrameIn) -> torch.Tensor:
    return frame.image


def _identity_out(session: Session, frame: FrameIn, image: torch.Tensor) -> torch.Tensor:
    return image


class Scheduler:
    """Batches the sessions' newest frames into engine steps on one worker thread."""

    def __init__(
        self,
        max_sessions: int,
        convert_in: ConvertIn = _identity_in,
        convert_out: ConvertOut = _identity_out,
        observer: StepObserver | None = None,
        thread_name: str = "livediff-worker",
        pass_through: PassThrough | None = None,
        fresh_frames: bool = True,
        max_connecting: int | None = None,
        id_prefix: str = "",
        batch_by_deadline: bool = False,
    ) -> None:
        self.max_sessions = max_sessions
        self.admission = Admission(max_sessions, max_connecting or max_sessions, "sessions")
        """Live slots (connected sessions) and connecting ones (see `livediff.admission`)."""
        self.id_prefix = id_prefix
        """Put before every session id (`ServerSettings.session_id_prefix`)."""
        self.convert_in = convert_in
        self.convert_out = convert_out
        self.pass_through = pass_through
        self.fresh_frames = fresh_frames
        self.observer = observer
        self.batch_by_deadline = batch_by_deadline
        """Take the largest batch whose measured step fits every stream's frame interval (`livediff.deadline`)."""
        self.step_table: StepTable | None = None
        """The measured step time per batch size (`load(measure_steps=True)`), else None."""
        self.engine: Any = None
        self.sessions: dict[str, Session] = {}
        self.steps = 0
        self.background: deque[_Background] = deque()
        """Background frames (`run_background`), oldest first."""
        self.step_ms: dict[int, float] = {}
        """Batch size -> its step's wall time in ms, a moving average (what background slots cost)."""
        self._opening: dict[str, Session] = {}
        self._evicting: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the worker thread -----------------------------------------------------------------------

    async def run_on_worker(self, fn: Callable[..., R], *args: Any) -> R:
        """Run `fn(*args)` on the device's worker thread (where every engine call happens)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load(self, make_engine: Callable[[], Any], warmup_frames: int = 2, measure_steps: bool = False) -> None:
        """Build the engine and run a warm-up inference on the worker thread, then start ticking.
        `warmup_frames`: what `engine.warmup` runs: frames (an image engine), or chunks (a chunked engine).
        `measure_steps`: then time a step of each batch size up to max_batch (`step_table`)."""
        self.engine = await self.run_on_worker(make_engine)
        if warmup_frames:
            log.info("warming up: %d %s", warmup_frames, "chunks" if self.chunked else "frames")
            await self.run_on_worker(self.engine.warmup, warmup_frames)
        if measure_steps and not self.chunked:  # (a chunked engine's step takes chunks, not frames)
            self.step_table = await self.run_on_worker(measure_step_times, self.engine, self.max_batch)
            self.step_ms.update(self.step_table.step_ms)  # where background frames start from (then learnt)
        self.start()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="livediff-scheduler")

    @property
    def chunked(self) -> bool:
        """Whether the engine takes whole chunks (a causal video engine) rather than single frames."""
        return bool(getattr(self.engine, "chunked", False))

    @property
    def max_batch(self) -> int:
        return int(self.engine.settings.max_batch)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await self.close_session(session)
        for item in self.background:
            item.future.cancel()
        self.background.clear()
        await asyncio.gather(*self._evicting, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.engine is not None:
            self.engine.close()  # ControlNet loads still queued are dropped, not run after the end
        self._executor.shutdown(wait=True)

    # -- sessions --------------------------------------------------------------------------------

    async def open_session(
        self, params: StreamParams, kind: str = "offer", probe: bool = False, connecting: bool = False
    ) -> Session:
        """Admit a session (or raise `AdmissionError`) and open its engine stream.

        `connecting`: its client has yet to connect (a WebRTC peer): once its answer is out
        (`answered()`), a newer session may take its slot if it has not connected within the
        admission's grace (this one is then closed).
        Otherwise it is connected at once (engine-only users, tests).
        """
        session = Session(params=params, kind=kind, probe=probe)
        session.id = self.id_prefix + session.id
        evicted = self.admission.admit(session.id)
        if evicted is not None:
            self._evict(evicted)
        self._opening[session.id] = session
        try:
            session.inbox = type(session.inbox)(on_put=lambda: self._on_put(session))
            session.stream = await self.run_on_worker(self.engine.open_stream, params)
            if session.closed or (not connecting and not self.admission.connected(session.id)):
                raise AdmissionError(
                    f"server is at its limit of {self.max_sessions} sessions: its slot was "
                    "taken while its stream opened",
                    self.max_sessions,
                )
        except BaseException:
            self.admission.release(session.id)
            raise
        finally:
            self._opening.pop(session.id, None)
        self.sessions[session.id] = session
        session.on_close(self._forget(session))
        if self.chunked:
            self._start_chunks(session)
        return session

    def _start_chunks(self, session: Session) -> None:
        """The session's chunk inbox and output pacer (a chunked engine)."""

        def dropped(chunk: list[FrameIn]) -> None:
            session.inbox.replaced += len(chunk)  # counted as the latest-frame slot counts its drops
            if session.inbox.on_drop is not None:
                for frame in chunk:
                    session.inbox.on_drop(frame)

        def put(out: FrameOut) -> None:
            if not session.closed:
                session.outbox.put(out)

        first, size = self.engine.chunk_frames
        session.chunks = ChunkInbox(first, size, on_drop=dropped)
        session.pacer = ChunkPacer(put)
        session.spawn(session.pacer.run(), "pacer")

    async def reset(self, session: Session) -> None:
        """Start `session` over from its next frame (a scene cut): what it collected is dropped and,
        with a chunked engine, its caches are emptied. `ConfigError` when the engine keeps no past."""
        reset = getattr(self.engine, "reset", None)
        if reset is None:
            raise ConfigError("reset applies to video models (their caches); this engine keeps no past")
        if session.chunks is not None:
            session.chunks.reset()
        await self.run_on_worker(reset, session.stream)

    def connected(self, session: Session) -> bool:
        """`session`'s client connected: True when it took a live slot; False when none was free or it
        was evicted meanwhile (then close it)."""
        return not session.closed and self.admission.connected(session.id)

    def answered(self, session: Session) -> None:
        """`session`'s answer went out: the grace in which its slot waits for it starts now."""
        self.admission.answered(session.id)

    def _evict(self, session_id: str) -> None:
        """Close a session that had not connected in its grace, whose slot a newer offer took."""
        session = self.sessions.get(session_id) or self._opening.get(session_id)
        if session is None:
            return
        log.info(
            "session %s ended: not connected %g s after its answer, a newer offer took its slot",
            session_id,
            self.admission.grace_s,
        )
        task = asyncio.ensure_future(self.close_session(session))
        self._evicting.add(task)
        task.add_done_callback(self._evicting.discard)

    def _forget(self, session: Session) -> Callable[[], Any]:
        async def forget() -> None:
            self.sessions.pop(session.id, None)
            self.admission.release(session.id)

        return forget

    async def close_session(self, session: Session) -> None:
        await session.close()
        self.sessions.pop(session.id, None)
        self.admission.release(session.id)

    async def update(self, session: Session, params: StreamParams) -> bool:
        """Apply `params` from the session's next frame on; True when a prompt was truncated.

        Callers serialise updates of one session (the server's `Control` runs one at a time).
        """
        await self.run_on_worker(self.engine.update, session.stream, params)
        session.params = params
        return self.prompt_truncated(session)

    def prompt_truncated(self, session: Session) -> bool:
        return bool(getattr(getattr(session.stream, "conditioning", None), "truncated", False))

    # -- the loop --------------------------------------------------------------------------------

    def ready_sessions(self) -> list[Session]:
        """The open sessions with a frame waiting: what the loop steps while there are any.

        A closed session's frame never counts, even for the moment before its close empties its
        inbox: the loop would see work that `pick` refuses and go round without ever awaiting.
        """
        return [
            s
            for s in self.sessions.values()
            if (s.inbox.ready or (s.chunks is not None and s.chunks.ready)) and not s.closed
        ]

    def pick(self) -> list[_Pick]:
        """The newest frame of each ready session, oldest waiting first, up to max_batch."""
        ready = self.ready_sessions()
        ready.sort(key=lambda s: s.inbox.peek().received)  # type: ignore[union-attr]
        picks = []
        for session in ready[: self.batch_limit(len(ready))]:
            frame = session.inbox.take_nowait()
            assert frame is not None
            picks.append(_Pick(session, frame))
        return picks

    def batch_limit(self, ready: int) -> int:
        """How many of `ready` frames the next step takes: up to max_batch, and with
        `batch_by_deadline` the largest batch whose step fits the tightest camera interval of the
        open sessions (`StepTable.batch_for`)."""
        if not self.batch_by_deadline or self.step_table is None:
            return min(ready, self.max_batch)
        intervals = [s.rhythm.interval for s in self.sessions.values() if not s.closed]
        return self.step_table.batch_for(ready, tightest_interval_ms(intervals), self.max_batch)

    def _on_put(self, session: Session) -> None:
        """A frame arrived in `session`'s inbox: forward it now if it is passthrough, else wake the loop."""
        frame = session.inbox.peek()
        if frame is not None:
            session.rhythm.observe(frame.received)
        if session.params.passthrough and self._forward(session):
            return
        if session.chunks is not None:  # the chunk cadence: the frame joins the chunk being collected
            taken = session.inbox.take_nowait()
            if taken is not None:
                session.chunks.put(taken)
        self._wake.set()

    def _forward(self, session: Session) -> bool:
        """Send the inbox's passthrough frame as it came, if `pass_through` takes it; True when sent."""
        frame = session.inbox.peek()
        if self.pass_through is None or frame is None or session.closed:
            return False
        image = self.pass_through(session, frame)
        if image is None:  # needs converting: the worker path
            return False
        session.inbox.take_nowait()
        now = time.monotonic()
        self._deliver([(session, FrameOut(image=image, source=frame, scheduled=now, finished=now,
                                          stages_ms={}, batch_size=0))])  # fmt: skip
        return True

    async def run_background(self, frames: list[tuple[Any, torch.Tensor]]) -> list[torch.Tensor]:
        """Background frames, (engine stream, (H, W, 3) uint8 image) pairs: their outputs, in order, once
        steps have run them in the slots live frames leave. Cancelling the call withdraws those not run yet."""
        if self.chunked:  # its steps take whole chunks of live sessions only (`_tick_chunks`)
            raise ConfigError("background frames need an image model; this engine takes chunks")
        loop = asyncio.get_running_loop()
        items = [_Background(stream, image, loop.create_future()) for stream, image in frames]
        self.background.extend(items)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            waiting = set(items)
            if any(item in waiting for item in self.background):  # withdrawn (cancelled, or one failed)
                self.background = deque(item for item in self.background if item not in waiting)
            for item in items:
                item.future.cancel()  # no-op for those that ran

    def background_slots(self, live: int) -> int:
        """How many background frames the next step takes beside `live` live frames (module doc)."""
        free = self.max_batch - live
        if free <= 0 or not self.background:
            return 0
        if not any(not s.closed for s in self.sessions.values()):
            return free
        if live:
            own = self.step_ms.get(live)
            if own is None:
                return 0  # the live step's own cost is learnt first
            budget = own * (1 + BACKGROUND_SHARE)
        else:
            intervals = [s.rhythm.interval for s in self.sessions.values() if s.rhythm.interval]
            budget = IDLE_SHARE * min(intervals, default=1 / 30) * 1000.0
        slots = 0
        while slots < free:
            cost = self.step_ms.get(live + slots + 1)
            if cost is None:
                return slots + 1  # not measured yet: one more frame, to learn what it costs
            if cost > budget:
                break
            slots += 1
        return slots if live else max(slots, 1)

    def _measured(self, size: int, ms: float) -> None:
        known = self.step_ms.get(size)
        self.step_ms[size] = ms if known is None else 0.8 * known + 0.2 * ms

    def pick_background(self, slots: int) -> list[_Background]:
        """Up to `slots` background frames, oldest first, one per engine stream."""
        picked: list[_Background] = []
        streams: set[int] = set()
        for item in self.background:
            if len(picked) == slots:
                break
            if id(item.stream) not in streams and not item.future.done():
                picked.append(item)
                streams.add(id(item.stream))
        for item in picked:
            self.background.remove(item)
        return picked

    async def tick(self) -> list[tuple[Session, FrameOut]]:
        """One batch: pick (live frames first, background frames in the slots left), run on the worker
        thread, hand outputs to the outboxes and the background callers. A chunked engine (a video
        model) steps whole chunks instead (`_tick_chunks`; it takes no background frames)."""
        if self.chunked:
            return await self._tick_chunks()
        picks = self.pick()
        extra = self.pick_background(self.background_slots(len(picks)))
        if not picks and not extra:
            return []
        scheduled = time.monotonic()
        try:
            outputs, extra_out = await self.run_on_worker(self._work, picks, scheduled, extra)
            self._measured(len(picks) + len(extra), (time.monotonic() - scheduled) * 1000.0)
        except BaseException as exc:
            for item in extra:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            raise
        for item, image in zip(extra, extra_out):
            if not item.future.done():
                item.future.set_result(image)
        self.steps += 1
        return self._deliver([(p.session, out) for p, out in zip(picks, outputs)])

    def _deliver(self, outputs: list[tuple[Session, FrameOut]]) -> list[tuple[Session, FrameOut]]:
        """Put each output in its session's outbox (unless the session closed meanwhile)."""
        delivered = []
        dropped_out = 0
        for session, out in outputs:
            if session.closed:
                continue
            session.stats.processed += 1
            session.stats.skipped += out.skipped
            dropped_out += session.outbox.put(out)
            delivered.append((session, out))
        if self.observer is not None and delivered:
            self.observer.on_step(delivered, dropped_out)
        return delivered

    def _work(
        self, picks: list[_Pick], scheduled: float, extra: list[_Background] | None = None
    ) -> tuple[list[FrameOut], list[torch.Tensor]]:
        """On the worker thread: convert, step, convert back; background frames go as they are."""
        images = [self.convert_in(p.session, p.frame) for p in picks]
        batch = [(p.session.stream, image) for p, image in zip(picks, images)]
        batch += [(item.stream, item.image) for item in extra or ()]
        result = self.engine.step(batch)
        outputs = []
        for pick, image_in, image, skipped in zip(picks, images, result.outputs, result.skipped):
            outputs.append(
                FrameOut(
                    image=self.convert_out(pick.session, pick.frame, image),
                    source=pick.frame,
                    scheduled=scheduled,
                    finished=time.monotonic(),
                    stages_ms=dict(result.timings_ms),
                    batch_size=len(picks),
                    skipped=skipped,
                    frames=(image_in, image),
                )
            )
        return outputs, list(result.outputs[len(picks) :])

    async def _tick_chunks(self) -> list[tuple[Session, FrameOut]]:
        """One step of a chunked engine: the complete chunks of up to `max_batch` sessions (oldest
        first), their output frames handed to each session's pacer."""
        ready = [s for s in self.ready_sessions() if s.chunks is not None and s.chunks.ready]
        ready.sort(key=lambda s: s.chunks.peek()[0].received)
        picks = [(s, s.chunks.take()) for s in ready[: self.max_batch]]
        if not picks:
            return []
        scheduled = time.monotonic()
        outputs = await self.run_on_worker(self._work_chunks, picks, scheduled)
        self.steps += 1
        delivered = []
        for (session, _), outs in zip(picks, outputs):
            if session.closed or not outs:
                continue
            session.stats.processed += len(outs)
            session.pacer.play([(out.source.received - outs[0].source.received, out) for out in outs])
            delivered += [(session, out) for out in outs]
        if self.observer is not None and delivered:
            self.observer.on_step(delivered)
        return delivered

    def _work_chunks(self, picks: list[tuple[Session, list[FrameIn]]], scheduled: float) -> list[list[FrameOut]]:
        """On the worker thread: convert each chunk's frames, one engine step, convert back. A chunk
        whose length the stream does not take (it cannot happen by the inbox's rule) is dropped, said."""
        valid = [(s, chunk) for s, chunk in picks if len(chunk) == s.stream.frames_needed]
        for session, chunk in picks:
            if len(chunk) != session.stream.frames_needed:
                log.warning("session %s: a chunk of %d frames dropped (the stream takes %d)", session.id,
                            len(chunk), session.stream.frames_needed)  # fmt: skip
        if not valid:
            return [[] for _ in picks]
        images = [[self.convert_in(s, frame) for frame in chunk] for s, chunk in valid]
        for (session, chunk), inputs in zip(valid, images):  # an engine may answer a chunk steps later (Stream Batch)
            assert session.chunks is not None
            session.chunks.handed(list(zip(chunk, inputs)))
        result = self.engine.step([(s.stream, chunk_images) for (s, _), chunk_images in zip(valid, images)])
        finished = time.monotonic()
        done: dict[int, list[FrameOut]] = {}
        for (session, chunk), outs in zip(valid, result.outputs):
            assert session.chunks is not None
            answered, start = [], 0
            for sources in session.chunks.came_back(len(outs)):  # whole chunks, oldest first
                stages = dict(result.timings_ms)
                stages["chunk_wait"] = (scheduled - sources[-1][0].received) * 1000.0
                answered += [
                    FrameOut(image=self.convert_out(session, frame, image), source=frame, scheduled=scheduled,
                             finished=finished, stages_ms=stages, batch_size=len(valid), frames=(image_in, image))
                    for (frame, image_in), image in zip(sources, outs[start:])
                ]  # fmt: skip
                start += len(sources)
            done[id(chunk)] = answered
        return [done.get(id(chunk), []) for _, chunk in picks]

    def fresher_frames_due_in(self, now: float) -> float | None:
        """Seconds to wait for fresher frames before the next step, or None to step now.

        Wait only when every waiting frame is older than half its camera's interval; then until
        the last of those cameras' next frames is due (plus a little jitter), never longer.
        """
        due = []
        for session in self.sessions.values():
            frame, interval, last = session.inbox.peek(), session.rhythm.interval, session.rhythm.last
            if frame is None or session.closed:
                continue
            if interval is None or last is None or now - frame.received < interval / 2:
                return None  # a fresh frame (or a camera whose rhythm is not known yet): go now
            due.append(last + interval * 1.1)
        wait = max(due, default=now) - now
        return wait if wait > 0 else None

    async def _hold_for_fresher_frames(self) -> None:
        while True:
            self._wake.clear()  # before looking: a frame that comes after this wakes the wait
            wait = self.fresher_frames_due_in(time.monotonic())
            if wait is None:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.ready_sessions() or self.background:
                try:
                    if self.fresh_frames and self.ready_sessions():
                        await self._hold_for_fresher_frames()
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad batch must not stop every session: log it and go on
                    log.exception("engine step failed; its frames are dropped")
