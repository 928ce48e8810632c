"""One session: a camera in, a transformed stream out. Every piece of per-session state lives here.

A session is created by the scheduler (admission, engine stream) and closed exactly once; closing
runs its registered cleanups (peer connections, tasks) newest first, each one whatever the others
do: a cleanup that raises is logged and the rest still run, so the one that frees the session's
slot always does. It knows nothing of WebRTC: the transport layer registers what it must tear down.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import statistics
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from livediff.admission import Admission
from livediff.config import StreamParams
from livediff.transport.slot import LatestSlot

log = logging.getLogger(__name__)

Cleanup = Callable[[], Awaitable[None]]


class SessionClosed(Exception):
    """The session ended (or is ending): it takes no new task, cleanup, viewer or update (HTTP 404)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} has ended")
        self.session_id = session_id


@dataclass
class FrameIn:
    """A received frame waiting in a session's inbox; `image` is whatever the transport decoded."""

    image: Any
    pts: int | None
    time_base: Fraction | None
    received: float
    """time.monotonic() when the frame came off the network decoder."""
    frame_id: int | None = None
    """The probe id read from the frame (probe mode only)."""


@dataclass
class FrameOut:
    """A transformed frame in a session's outbox, with the times it passed each hop."""

    image: Any
    source: FrameIn
    scheduled: float
    """When the scheduler took the input frame into a batch."""
    finished: float
    """When the worker thread handed the output back."""
    stages_ms: dict[str, float]
    batch_size: int
    """Frames in the engine step that made it; 0 for a passthrough frame sent as it came."""
    skipped: bool = False
    frames: tuple[Any, Any] | None = None
    """(input, output) at the engine's size, (H, W, 3) uint8 host tensors, for sampling the session's
    temporal quality off the frame path (`livediff.server.quality`); None for passthrough frames."""


@dataclass
class CameraRhythm:
    """When a session's frames arrive: the last arrival and the usual gap (median of the last 15)."""

    last: float | None = None
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=15))

    def observe(self, received: float) -> None:
        if self.last is not None:
            self.gaps.append(received - self.last)
        self.last = received

    @property
    def interval(self) -> float | None:
        """The camera's frame interval in seconds, once a few frames came (None before)."""
        return statistics.median(self.gaps) if len(self.gaps) >= 3 else None


@dataclass
class SessionStats:
    frames_in: int = 0
    dropped_in: int = 0
    processed: int = 0
    skipped: int = 0
    dropped_out: int = 0
    sent: int = 0
    last_age_ms: float = 0.0
    stats_dropped: int = 0
    """`stats` messages not sent because the client's control channel was backed up."""

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Session:
    params: StreamParams
    kind: str = "offer"
    """`offer` (demo page) or `whip` (OBS and other WHIP publishers)."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    stream: Any = None
    """The engine's per-stream state (livediff.engine.Stream); touched only on the worker thread."""
    probe: bool = False
    state: str = "new"
    """new -> live (media flowing) -> closed."""
    created: float = field(default_factory=time.time)
    stats: SessionStats = field(default_factory=SessionStats)
    rhythm: CameraRhythm = field(default_factory=CameraRhythm)
    inbox: LatestSlot[FrameIn] = field(default_factory=LatestSlot)
    outbox: LatestSlot[FrameOut] = field(default_factory=LatestSlot)
    chunks: Any = None
    """With a chunked (video) engine: the `livediff.chunks.ChunkInbox` collecting the next chunk."""
    pacer: Any = None
    """With a chunked engine: the `livediff.transport.pacing.ChunkPacer` playing chunks out to the outbox."""
    viewers: dict[str, Cleanup] = field(default_factory=dict)
    """WHEP viewers: id -> how to end the viewer."""
    viewer_slots: Admission | None = None
    """The viewers' live and connecting slots (made by the server with its limits)."""
    control: Any = None
    """The server's live control of this session (`livediff.server.control.Control`): its pending update."""
    quality: Any = None
    """Live temporal quality figures (`livediff.server.quality.LiveQuality`), once sampled."""
    controlnet_state: dict[str, str] = field(default_factory=dict)
    """The session's ControlNets (and `depth model`) -> `loading`, `ready` or `failed`
    (`livediff.server.controlnets.follow_loads`)."""
    loss: Callable[[], dict[str, float]] | None = None
    """The loss-recovery counters of the session's video receiver (`livediff.transport.loss_recovery`)."""
    closed_event: asyncio.Event = field(default_factory=asyncio.Event)
    _cleanups: list[Cleanup] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _closing: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def ensure_open(self) -> None:
        """Raise `SessionClosed` once the session is closing: call it again after every wait."""
        if self.closed:
            raise SessionClosed(self.id)

    def on_close(self, cleanup: Cleanup) -> None:
        """Run `cleanup` when the session closes; `SessionClosed` if it already did (it would never run)."""
        self.ensure_open()
        self._cleanups.append(cleanup)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` for the life of the session; cancelled and awaited on close.

        A closing session starts nothing: `coro` is closed unstarted and `SessionClosed` raised.
        """
        if self.closed:
            if inspect.iscoroutine(coro):
                coro.close()
            raise SessionClosed(self.id)
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}:{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Ends viewers, tasks and peers, then frees the slots; idempotent, every caller waits for the end.

        Runs in a task of its own, so a caller that is cancelled meanwhile (a request whose client
        went away, a session task that closes its own session) does not stop it halfway.
        """
        if self._closing is None:
            self.state = "closed"
            self.inbox.close()  # at once, with the state: no frame of a closed session is ever stepped or sent
            self.outbox.close()
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        for viewer_id, end_viewer in list(self.viewers.items()):
            await self._run_cleanup(f"end of viewer {viewer_id}", end_viewer)
        self.viewers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cleanup in reversed(self._cleanups):
            await self._run_cleanup(getattr(cleanup, "__qualname__", repr(cleanup)), cleanup)
        self._cleanups.clear()
        self.closed_event.set()

    async def _run_cleanup(self, name: str, cleanup: Cleanup) -> None:
        """Run one cleanup; an error is logged, never raised: the next cleanup runs anyway."""
        try:
            await cleanup()
        except Exception:
            log.exception("session %s: cleanup %s failed (the other cleanups still run)", self.id, name)

    def describe(self) -> dict[str, Any]:
        stats = self.stats.as_dict()
        stats["dropped_in"] = self.inbox.replaced
        stats["dropped_out"] = self.outbox.replaced
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "created": self.created,
            "probe": self.probe,
            "viewers": len(self.viewers),
            "params": params_to_json(self.params),
            "stats": stats,
            "quality": self.quality.as_dict() if self.quality is not None else None,
            "controlnet_state": dict(self.controlnet_state),
        }


def watch_rank(state: str, created: float) -> tuple[bool, float]:
    """How `POST /whep` (no session named) ranks sessions to watch, highest first: live ones (media
    flowing: a picture at once) before those still starting, then the newest (`created`, Unix
    seconds). One rule for the server and for the cluster's gateway, which sees sessions as JSON."""
    return state == "live", created


def params_to_json(params: StreamParams) -> dict[str, Any]:
    data = dict(params.__dict__)
    data["t_index_list"] = list(params.t_index_list) if params.t_index_list is not None else None
    data["blend"] = {"prompt": data.pop("blend_prompt"), "weight": data.pop("blend_weight")}
    motion = data.pop("motion_strength")
    data["temporal"] = {
        "bank": data.pop("temporal_bank"),
        "weight": data.pop("temporal_weight"),
        "motion_strength": list(motion) if motion is not None else None,
    }
    data["controlnet"] = [dict(control.__dict__) for control in params.controlnet]
    data["loras"] = [dict(lora.__dict__) for lora in params.loras]
    prompt = params.image_prompt
    data["image_prompt"] = None if prompt is None else {"image": prompt.image, "scale": prompt.scale}
    return data
