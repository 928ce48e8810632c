"""`JobSettings`: the jobs side of `livediff serve` (flags `--jobs-*`, `--max-jobs`, `--webhook-*`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livediff.errors import ConfigError


@dataclass(frozen=True)
class JobSettings:
    db: str = ""
    """`postgresql://...` for a store shared by replicas; empty: SQLite, `jobs.db` in the state folder."""
    storage: Path | None = None
    """Folder of the jobs' uploads and results; None: `jobs/` in the state folder."""
    storage_url: str = ""
    """`s3://bucket/prefix`: files kept in S3-compatible storage, `storage` their working copy (`livediff.jobs.s3`)."""
    max_jobs: int = 1
    """Jobs this server runs at once (each takes batch slots live sessions leave)."""
    max_bytes: int = 2 * 1024**3
    """Largest upload; a larger one is refused (413) while it streams in."""
    max_seconds: float = 600.0
    """Longest clip, in seconds of video; a longer one is refused (422)."""
    lease_s: float = 30.0
    """A job whose server stopped reporting progress this long is taken up again (a crash)."""
    max_attempts: int = 3
    """Attempts of a job that fails with transient errors, the first included."""
    retry_base_s: float = 1.0
    """Backoff before the second attempt; it doubles for each next one (with jitter)."""
    idempotency_ttl_s: float = 86400.0
    """How long an Idempotency-Key is remembered."""
    batch: int = 0
    """Frames of one job per engine step (its lanes); 0: the engine's max_batch."""
    poll_s: float = 1.0
    """How often the worker looks for queued jobs and stale ones besides being woken (other replicas' jobs)."""
    webhook_secret: str = ""
    """`whsec_<base64>` signing secret (Standard Webhooks); empty: made once and kept in the state folder."""
    webhook_allow_private: bool = False
    """Allow callback URLs that resolve to loopback, link-local or private addresses."""
    webhook_max_attempts: int = 8
    """Delivery attempts of one webhook event before it is given up."""
    webhook_timeout_s: float = 10.0
    """Seconds a receiver has to answer one delivery."""
    retention_s: float = 0.0
    """Finished jobs and recordings older than this (seconds since they ended) are deleted, records and files;
    0: kept until deleted by hand."""
    recordings_callback_url: str = ""
    """Where each recording's state changes are POSTed (signed as the jobs' webhooks are); empty: nowhere."""

    @property
    def sweep_s(self) -> float:
        """How often the retention sweep runs: a tenth of the retention, within 1 s and an hour."""
        return max(1.0, min(3600.0, self.retention_s / 10))

    def __post_init__(self) -> None:
        checks = {
            "max_jobs": (1, 64), "max_bytes": (1, 1 << 50), "max_seconds": (0.001, 1e7), "lease_s": (0.5, 86400),
            "max_attempts": (1, 100), "retry_base_s": (0.0, 3600), "idempotency_ttl_s": (1, 365 * 86400),
            "batch": (0, 64), "poll_s": (0.01, 60), "webhook_max_attempts": (1, 100),
            "webhook_timeout_s": (0.1, 300), "retention_s": (0, 100 * 365 * 86400),
        }  # fmt: skip
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in {low:g}..{high:g}, got {value}")
        if self.db and not self.db.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"jobs db must be a postgresql:// URL (or empty: SQLite), got {self.db!r}")
        if self.storage_url:
            from livediff.jobs.s3 import parse_url

            parse_url(self.storage_url)
        if self.webhook_secret and not self.webhook_secret.startswith("whsec_"):
            raise ConfigError("webhook secret must be whsec_ followed by base64 (Standard Webhooks)")

    def replace(self, **changes: Any) -> JobSettings:
        return dataclasses.replace(self, **changes)
