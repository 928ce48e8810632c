"""The job worker on a real scheduler and tiny engine: a storage failure is transient (queued again after a
backoff, the attempt recorded), a clip that cannot be used is permanent at once, a closing server puts its
running job back in the queue without counting the attempt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.jobs.settings import JobSettings
from livediff.jobs.storage import LocalStorage
from livediff.jobs.store import Job, JobStore, new_job_id
from livediff.jobs.worker import JobWorker, backoff_s
from livediff.scheduler import Scheduler
from tests.clips import make_clip

pytestmark = pytest.mark.timeout(240)


@pytest.fixture()
async def scheduler(tiny_parts) -> AsyncIterator[Scheduler]:  # type: ignore[no-untyped-def]
    sched = Scheduler(max_sessions=2)
    await sched.load(lambda: StreamEngine(EngineSettings(model="tiny", height=64, width=64), tiny_parts), 0)
    yield sched
    await sched.close()


async def _until(store: JobStore, job_id: str, check, timeout: float = 180) -> Job:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        job = await asyncio.to_thread(store.get, job_id)
        assert job is not None
        if check(job):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


def _submit(store: JobStore, storage: LocalStorage, clip: Path, max_attempts: int = 3) -> Job:
    job_id = new_job_id()
    storage.folder(job_id).mkdir(parents=True)
    storage.input_path(job_id).write_bytes(clip.read_bytes())
    return store.create(Job(id=job_id, state="", params={"seed": 2}, max_attempts=max_attempts))[0]


async def test_a_storage_failure_is_retried_after_a_backoff(scheduler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, storage = JobStore(tmp_path / "jobs.db"), LocalStorage(tmp_path / "files")
    job = _submit(store, storage, make_clip(tmp_path / "in.mp4", frames=4, audio=False))
    blocker = storage.result_path(job.id).with_name("result.mp4.part")
    blocker.mkdir()  # where the result is written, a folder: the write fails as a full disk would
    settings = JobSettings(poll_s=0.05, retry_base_s=2.0, lease_s=4.0)
    worker = JobWorker(store, storage, scheduler, settings, StreamParams())
    worker.start()
    try:
        retried = await _until(store, job.id, lambda j: j.error_kind is not None)
        assert retried.state == "queued" and retried.error_kind == "transient" and retried.attempt == 1
        assert "result.mp4.part" in (retried.error_message or "")
        assert retried.next_run_at >= retried.updated_at + 1.0  # 2 s x [0.5, 1] later, not at once
        blocker.rmdir()  # the disk is back
        done = await _until(store, job.id, lambda j: j.state in ("complete", "failed"))
        assert done.state == "complete" and done.attempt == 2 and done.frames_done == 4
        assert storage.result_path(job.id).is_file()
    finally:
        await worker.close()
        store.close()


async def test_a_clip_that_cannot_be_used_fails_at_once(scheduler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, storage = JobStore(tmp_path / "jobs.db"), LocalStorage(tmp_path / "files")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n" * 20)
    job = _submit(store, storage, bad)
    worker = JobWorker(store, storage, scheduler, JobSettings(poll_s=0.05), StreamParams())
    worker.start()
    try:
        failed = await _until(store, job.id, lambda j: j.state == "failed")
        assert failed.error_kind == "permanent" and failed.attempt == 1
        assert "not a video file PyAV can open" in (failed.error_message or "")
    finally:
        await worker.close()
        store.close()


async def test_closing_puts_the_running_job_back_without_counting_it(scheduler, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, storage = JobStore(tmp_path / "jobs.db"), LocalStorage(tmp_path / "files")
    job = _submit(store, storage, make_clip(tmp_path / "in.mp4", frames=2000, audio=False))
    worker = JobWorker(store, storage, scheduler, JobSettings(poll_s=0.05, lease_s=1.0), StreamParams())
    worker.start()
    await _until(store, job.id, lambda j: j.frames_done > 0)
    await worker.close()
    back = await asyncio.to_thread(store.get, job.id)
    assert back is not None and back.state == "queued" and back.attempt == 0 and back.worker is None
    assert not list(storage.folder(job.id).glob("*.part"))  # the part file went with the attempt
    store.close()


def test_backoff_doubles_from_its_base_with_jitter_and_a_cap() -> None:
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (30, 60.0)]:
        waits = [backoff_s(attempt, 1.0, 60.0) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits) and max(waits) - min(waits) > 0
