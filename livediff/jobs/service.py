"""`Jobs`: the store, the files, the worker and the webhook sender of one server, started and closed together,
their figures in `/metrics`, the webhooks of recordings (`--recordings-callback-url`) and the retention sweep
(`--jobs-retention`: finished jobs and recordings older than that deleted, records and files)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from livediff.config import StreamParams
from livediff.jobs.recording import Recordings
from livediff.jobs.s3 import make_storage
from livediff.jobs.settings import JobSettings
from livediff.jobs.storage import LocalStorage
from livediff.jobs.store import STATES, Event, Job, JobStore
from livediff.jobs.webhooks import WebhookSender, describe_events, load_secret
from livediff.jobs.worker import JobWorker

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
FPS_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 240)


class _JobsCollector(Collector):
    """Read at scrape time: jobs per state (as last counted) and the running jobs' frames per second."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[Any]:
        states = GaugeMetricFamily(
            "livediff_jobs", "Jobs in the store per state (queue depth: queued)", labels=["state"]
        )
        for state in STATES:
            states.add_metric([state], self.jobs.counts.get(state, 0))
        yield states
        fps = GaugeMetricFamily("livediff_job_fps", "Frames per second of each job running here", labels=["job"])
        worker = self.jobs.worker
        for job_id, running in worker.running.items() if worker is not None else ():
            fps.add_metric([job_id], running.progress.fps if running.progress else 0.0)
        yield fps


class Jobs:
    """Everything jobs need on a server; `start()` once the engine is loaded, `close()` before the scheduler."""

    def __init__(self, settings: JobSettings, state_dir: Path, scheduler: Any, default_params: StreamParams,
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.state_dir = state_dir
        self.scheduler = scheduler
        self.default_params = default_params
        self.storage: LocalStorage = make_storage(settings.storage, settings.storage_url, state_dir)
        self.secret = load_secret(state_dir, settings.webhook_secret)
        self.store: JobStore | None = None
        self.worker: JobWorker | None = None
        self.webhooks: WebhookSender | None = None
        self.counts: dict[str, int] = {}
        self._counting: asyncio.Task[None] | None = None
        self.recordings: Recordings | None = None
        """The server's recordings (set with the routes): their webhooks, their retention."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeping: asyncio.Task[None] | None = None
        self._events_lock = asyncio.Lock()
        self._event_tasks: set[asyncio.Task[None]] = set()
        registry = registry or CollectorRegistry()
        self.durations = Histogram(
            "livediff_job_seconds", "Seconds each job attempt ran, by its end: complete, failed, retried, cancelled, "
            "stopped", ["state"], registry=registry, buckets=SECONDS_BUCKETS,
        )  # fmt: skip
        self.job_fps = Histogram("livediff_job_complete_fps", "Frames per second of each completed job",
                                 registry=registry, buckets=FPS_BUCKETS)  # fmt: skip
        self.webhook_attempts = Counter("livediff_webhook_attempts", "Webhook delivery attempts by result",
                                        ["result"], registry=registry)  # fmt: skip
        registry.register(_JobsCollector(self))

    async def open_store(self) -> JobStore:
        """The store, connected (PostgreSQL) or opened (SQLite) on first use."""
        self._loop = asyncio.get_running_loop()
        if self.store is None:
            target: str | Path = self.settings.db or self.state_dir / "jobs.db"
            self.store = await asyncio.to_thread(JobStore, target, self.settings.lease_s)
            self.webhooks = WebhookSender(self.store, self.settings, self.secret, self._attempted)
            self.webhooks.start()
        return self.store

    async def start(self) -> None:
        """Start taking jobs (the engine is loaded)."""
        store = await self.open_store()
        self.worker = JobWorker(store, self.storage, self.scheduler, self.settings, self.default_params,
                                on_change=self.changed, on_finished=self._finished)  # fmt: skip
        self.worker.start()
        self.counts = await asyncio.to_thread(store.counts)
        if self.recordings is not None:  # recordings a dead server left `recording` end as failed
            await asyncio.to_thread(self.recordings.recover)
        if self.settings.retention_s:
            self._sweeping = asyncio.create_task(self._sweep_loop(), name="livediff-jobs-retention")

    # -- recordings' webhooks ----------------------------------------------------------------------

    def recording_changed(self, record: dict[str, Any]) -> None:
        """`Recordings.on_change`: the recording's new state as a webhook event (callable from any thread)."""
        if self.settings.recordings_callback_url and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._recording_event_soon, record)

    def recording_webhooks(self, rec_id: str) -> list[dict[str, Any]] | None:
        """A recording's webhook events with every attempt, as `GET /api/recordings/{id}` shows them; None
        when recordings send none or the store is not open yet. Blocks: call off the event loop."""
        if not self.settings.recordings_callback_url or self.store is None:
            return None
        return describe_events(self.store.events(rec_id))

    def recording_claim(self, rec_id: str) -> bool:
        """`Recordings.claim`: whether this server deletes the recording (`JobStore.claim_deletion`; True while
        the store is not open). Blocks: call off the event loop."""
        return True if self.store is None else self.store.claim_deletion(rec_id)

    def _recording_event_soon(self, record: dict[str, Any]) -> None:
        task = asyncio.ensure_future(self._recording_event(record))
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _recording_event(self, record: dict[str, Any]) -> None:
        try:
            async with self._events_lock:  # in the order the changes came (tasks take the lock first come first)
                store = await self.open_store()
                kind = f"recording.{record['state']}"
                await asyncio.to_thread(store.add_event, record["id"], kind, self.settings.recordings_callback_url,
                                        record)  # fmt: skip
        except Exception:  # noqa: BLE001 - the store is down: this event is lost, said in the log
            log.exception("recording %s: its %s webhook could not be stored", record["id"], record["state"])
            return
        if self.webhooks is not None:
            self.webhooks.wake()

    # -- retention ---------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the store or the storage failed for a moment: the next sweep tries
                log.exception("jobs: the retention sweep failed")
            await asyncio.sleep(self.settings.sweep_s)

    async def sweep(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """Delete the finished jobs and recordings that ended over `retention_s` before `now`, records and files
        -> (job ids, recording ids)."""
        before = (time.time() if now is None else now) - self.settings.retention_s
        store = await self.open_store()
        jobs = await asyncio.to_thread(store.sweep, before)
        for job_id in jobs:  # rows first: a crash here leaves files no row names, never a row without its file
            await asyncio.to_thread(self.storage.remove, job_id)
        recordings = await asyncio.to_thread(self.recordings.sweep, before) if self.recordings is not None else []
        if jobs or recordings:
            log.info("jobs: retention removed %d jobs and %d recordings", len(jobs), len(recordings))
            self.changed()
        return jobs, recordings

    def changed(self, job: Job | None = None) -> None:
        """A job's state changed (here or by a request): deliver its webhook, count again."""
        if self.webhooks is not None:
            self.webhooks.wake()
        if job is not None and job.state == "complete" and job.fps:
            self.job_fps.observe(job.fps)
        if self._counting is None or self._counting.done():
            self._counting = asyncio.ensure_future(self._count())

    async def _count(self) -> None:
        if self.store is not None:
            try:
                self.counts = await asyncio.to_thread(self.store.counts)
            except Exception:  # noqa: BLE001 - a figure, not worth failing anything for
                log.debug("jobs: counting failed", exc_info=True)

    def _finished(self, outcome: str, seconds: float) -> None:
        self.durations.labels(outcome).observe(seconds)

    def _attempted(self, event: Event, delivered: bool) -> None:
        self.webhook_attempts.labels("delivered" if delivered else "failed").inc()

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)
        if self.worker is not None:
            await self.worker.close()
        if self.recordings is not None:  # end them now, while their webhook events can still be stored
            for session_id in list(self.recordings.active):
                await asyncio.to_thread(self.recordings.stop, session_id)
        await asyncio.gather(*self._event_tasks, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.close()
        if self._counting is not None:
            await asyncio.gather(self._counting, return_exceptions=True)
        if self.store is not None:
            self.store.close()
