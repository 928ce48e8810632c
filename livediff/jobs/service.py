"""`Jobs`: the store, the files, the worker and the webhook sender of one server, started and closed together,
and their figures in `/metrics`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from livediff.config import StreamParams
from livediff.jobs.s3 import make_storage
from livediff.jobs.settings import JobSettings
from livediff.jobs.storage import LocalStorage
from livediff.jobs.store import STATES, Event, Job, JobStore
from livediff.jobs.webhooks import WebhookSender, load_secret
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
        if self.worker is not None:
            await self.worker.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self._counting is not None:
            await asyncio.gather(self._counting, return_exceptions=True)
        if self.store is not None:
            self.store.close()
