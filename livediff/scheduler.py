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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from livediff.admission import Admission, AdmissionError
from livediff.config import EngineSettings, StreamParams
from livediff.deadline import StepTable, measure_step_times, tightest_interval_ms
from livediff.session import FrameIn, FrameOut, Session

log = logging.getLogger(__name__)

R = TypeVar("R")
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
        `measure_steps`: then time a step of each batch size up to max_batch (`step_table`)."""
        self.engine = await self.run_on_worker(make_engine)
        if warmup_frames:
            log.info("warming up: %d frames", warmup_frames)
            await self.run_on_worker(self.engine.warmup, warmup_frames)
        if measure_steps:
            self.step_table = await self.run_on_worker(measure_step_times, self.engine, self.max_batch)
        self.start()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="livediff-scheduler")

    @property
    def max_batch(self) -> int:
        return int(self.engine.settings.max_batch)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await self.close_session(session)
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

        `connecting`: its client has yet to connect (a WebRTC peer): it holds a connecting slot
        until `connected()`, and a newer session may take that slot (this one is then closed).
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
        return session

    def connected(self, session: Session) -> bool:
        """`session`'s client connected: True when it took a live slot; False when none was free or it
        was evicted meanwhile (then close it)."""
        return not session.closed and self.admission.connected(session.id)

    def _evict(self, session_id: str) -> None:
        """Close a session that never connected, whose connecting slot a newer session took."""
        session = self.sessions.get(session_id) or self._opening.get(session_id)
        if session is None:
            return
        log.info("session %s: not connected, and a newer offer needed its connecting slot: ended", session_id)
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
        return bool(getattr(session.stream.conditioning, "truncated", False))

    # -- the loop --------------------------------------------------------------------------------

    def ready_sessions(self) -> list[Session]:
        """The open sessions with a frame waiting: what the loop steps while there are any.

        A closed session's frame never counts, even for the moment before its close empties its
        inbox: the loop would see work that `pick` refuses and go round without ever awaiting.
        """
        return [s for s in self.sessions.values() if s.inbox.ready and not s.closed]

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
        if not (session.params.passthrough and self._forward(session)):
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

    async def tick(self) -> list[tuple[Session, FrameOut]]:
        """One batch: pick, run on the worker thread, hand outputs to the outboxes."""
        picks = self.pick()
        if not picks:
            return []
        scheduled = time.monotonic()
        outputs = await self.run_on_worker(self._work, picks, scheduled)
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

    def _work(self, picks: list[_Pick], scheduled: float) -> list[FrameOut]:
        """On the worker thread: convert, step, convert back."""
        images = [self.convert_in(p.session, p.frame) for p in picks]
        result = self.engine.step([(p.session.stream, image) for p, image in zip(picks, images)])
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
        return outputs

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
            while self.ready_sessions():
                try:
                    if self.fresh_frames:
                        await self._hold_for_fresher_frames()
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad batch must not stop every session: log it and go on
                    log.exception("engine step failed; its frames are dropped")
