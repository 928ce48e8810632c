"""The server's job worker: claims queued jobs from the store and runs their frames through the server's
own scheduler (`Scheduler.run_background`), in the batch slots live sessions leave.

One job at a time by default (`JobSettings.max_jobs`). A job runs on a thread of its own (decode,
encode: `livediff.jobs.transcode`); its frames go to the scheduler's worker thread like live frames,
so there is one engine and one step loop. While it runs, a heartbeat stores its progress every
`lease_s / 4`; a job whose heartbeat stops (its server died) is taken back by `requeue_stale` and
run again from the start by whichever server claims it, writing the one result file anew.

Failures: a clip or params that cannot be used (`ClipError`, `ParamError`) fail the job at once as
`permanent`; anything else (out of memory, a full disk, storage errors) is `transient` and the job
is queued again after an exponential backoff with jitter, up to `max_attempts`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livediff.config import StreamParams
from livediff.errors import ConfigError
from livediff.jobs.clip import ClipError, probe
from livediff.jobs.settings import JobSettings
from livediff.jobs.storage import LocalStorage
from livediff.jobs.store import Job, JobStore
from livediff.jobs.transcode import Cancelled, Progress, independent_frames, transcode

log = logging.getLogger(__name__)


class PermanentError(Exception):
    """A job that no retry can fix: its message is the job's error."""


def job_params(default: StreamParams, data: dict[str, Any]) -> StreamParams:
    """A job's params JSON over the server's default params, checked as PATCH /api/sessions/{id} checks them:
    `ParamError` naming the field; a live-session field (probe) is one too."""
    from livediff.server.params import ParamError, parse_update

    params, session = parse_update(default, data)
    if session:
        name = next(iter(session))
        raise ParamError(name, f"{name} is a live-session field, not a clip's")
    return params


def backoff_s(attempt: int, base_s: float, cap_s: float = 60.0) -> float:
    """Seconds before try `attempt + 1`: base doubling per attempt, at most `cap_s`, times a random factor in
    [0.5, 1] ("equal jitter": retries of many jobs spread out, none comes sooner than half the step)."""
    return min(cap_s, base_s * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None] | None = None
    progress: Progress | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


class JobWorker:
    """Claims and runs jobs beside the live sessions of `scheduler` (see the module doc)."""

    def __init__(
        self,
        store: JobStore,
        storage: LocalStorage,
        scheduler: Any,
        settings: JobSettings,
        default_params: StreamParams,
        on_change: Callable[[Job], None] | None = None,
        on_finished: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.scheduler = scheduler
        self.settings = settings
        self.default_params = default_params
        self.on_change = on_change
        """Called on the loop after each state change this worker stores (webhooks, metrics)."""
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_finished = on_finished
        """Called with (how the attempt ended: a state, seconds it ran) after each attempt here: metrics."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="livediff-jobs")

    def wake(self) -> None:
        """A job was queued or cancelled: look now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming; running jobs stop and go back to the queue (not counted as an attempt)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for running in self.running.values():
            running.stop.set()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _changed(self, job: Job | None) -> Job | None:
        if job is not None and self.on_change is not None:
            self.on_change(job)
        return job

    async def _loop(self) -> None:
        if not self.store.postgres:  # SQLite is this server's alone: what it held before a crash is stale now
            for job in await self._call(self.store.requeue_stale, lease_s=0.0):
                log.info("job %s: taken up again after a restart", job.id)
                self._changed(job)
        while True:
            try:
                for job in await self._call(self.store.requeue_stale):
                    log.info("job %s: its worker stopped reporting; queued again", job.id)
                    self._changed(job)
                while len(self.running) < self.settings.max_jobs:
                    job = await self._call(self.store.claim, self.worker_id)
                    if job is None:
                        break
                    self._changed(job)
                    running = self.running[job.id] = _Running(job)
                    running.task = asyncio.create_task(self._run(running), name=f"livediff-job-{job.id}")
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is down for a moment: try again at the next poll
                log.exception("jobs: the store failed; trying again in %g s", self.settings.poll_s)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _run(self, running: _Running) -> None:
        job = running.job
        beat = asyncio.create_task(self._heartbeat(running))
        outcome = "cancelled"
        try:
            await self._attempt(running)
            outcome = "complete"
        except Cancelled:
            self.storage.result_path(job.id).unlink(missing_ok=True)  # cancelled while the file was finished
            if self._task is None:  # the server is closing: back to the queue, this attempt not counted
                outcome = "stopped"
                self._changed(await self._call(self.store.transition, job.id, "queued", ("processing", "encoding"),
                                               self.worker_id, worker=None, attempt=job.attempt - 1))  # fmt: skip
        except (PermanentError, ClipError) as exc:
            log.info("job %s failed: %s", job.id, exc)
            outcome = "failed"
            self._changed(await self._call(self.store.fail, job, self.worker_id, "permanent", str(exc)))
        except Exception as exc:  # noqa: BLE001 - out of memory, disk, storage: tried again later
            message = f"{type(exc).__name__}: {exc}"
            log.warning("job %s attempt %d failed (%s)", job.id, job.attempt, message)
            wait = backoff_s(job.attempt, self.settings.retry_base_s)
            after = self._changed(await self._call(self.store.fail, job, self.worker_id, "transient", message, wait))
            outcome = "retried" if after is not None and after.state == "queued" else "failed"
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            self.running.pop(job.id, None)
            if self.on_finished is not None:
                self.on_finished(outcome, time.monotonic() - running.started)
            self._wake.set()

    async def _heartbeat(self, running: _Running) -> None:
        """Progress to the store every lease/4; a job no longer held (cancelled, taken back) is stopped."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 4)
            p = running.progress
            held = await self._call(
                self.store.heartbeat, running.job.id, self.worker_id,
                p.frames_done if p else 0, p.frames_total if p else 0, p.fps if p else 0.0,
            )  # fmt: skip
            if not held:
                log.info("job %s: no longer held by this server (cancelled?): stopping", running.job.id)
                running.stop.set()
                return

    async def _attempt(self, running: _Running) -> None:
        job = running.job
        loop = asyncio.get_running_loop()
        engine = self.scheduler.engine
        from livediff.server.params import ParamError, refusal

        if self.scheduler.chunked:
            raise PermanentError(f"jobs run image models; this server runs the video model {engine.settings.model!r}")
        try:
            params = job_params(self.default_params, job.params)
            engine.check_params(params)
        except ParamError as exc:
            raise PermanentError(f"params: {exc.message}") from None
        except ConfigError as exc:
            raise PermanentError(f"params: {refusal(exc).message}") from None
        source = await self._call(self.storage.fetch, job.id, "input")
        if source is None:
            raise PermanentError("the uploaded clip is no longer stored")
        info = await self._call(probe, source, self.settings.max_seconds)
        lanes = (self.settings.batch or engine.settings.max_batch) if independent_frames(params, engine.settings) else 1
        # independent frames: two batches in flight (the next waits at the scheduler while one runs), each on
        # its own set of streams, so that two frames of one stream never meet in a step
        in_flight = 2 if lanes > 1 else 1
        sets = [[await self.scheduler.run_on_worker(engine.open_stream, params) for _ in range(lanes)]
                for _ in range(in_flight)]  # fmt: skip
        turn = [0]

        def transform(frames: list[Any]) -> Any:
            streams = sets[turn[0] % in_flight]
            turn[0] += 1
            return asyncio.run_coroutine_threadsafe(
                self.scheduler.run_background([(streams[lane], image) for lane, image in frames]), loop
            )

        def on_progress(progress: Progress) -> None:
            running.progress = progress

        def on_encoding() -> None:
            future = asyncio.run_coroutine_threadsafe(self._encoding(running), loop)
            if not future.result():
                raise Cancelled()

        size = (engine.settings.width, engine.settings.height)
        await self._call(
            transcode, source, self.storage.result_path(job.id), info, transform, lanes, size,
            on_progress, running.stop.is_set, on_encoding, in_flight,
        )  # fmt: skip
        await self._call(self.storage.store, job.id, "result.mp4")  # S3: put in the bucket before complete
        p = running.progress
        done = await self._call(
            self.store.transition, job.id, "complete", ("encoding",), self.worker_id,
            frames_done=p.frames_done if p else 0, frames_total=p.frames_done if p else 0, fps=p.fps if p else 0.0,
        )  # fmt: skip
        if done is None:
            raise Cancelled()
        self._changed(done)
        log.info("job %s complete: %d frames at %.1f fps", job.id, done.frames_done, done.fps)

    async def _encoding(self, running: _Running) -> bool:
        p = running.progress
        job = await self._call(
            self.store.transition, running.job.id, "encoding", ("processing",), self.worker_id,
            frames_done=p.frames_done if p else 0, frames_total=p.frames_total if p else 0, fps=p.fps if p else 0.0,
        )  # fmt: skip
        self._changed(job)
        return job is not None
