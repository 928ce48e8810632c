"""`livediff serve`'s jobs flags (each also read from `LIVEDIFF_<FLAG>`) -> `JobSettings`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from livediff.jobs.settings import JobSettings


def add_jobs_flags(
    parser: argparse.ArgumentParser,
    env: Callable[[str, Any], Any],
    int_range: Callable[[int, int], Any],
    float_range: Callable[[float, float], Any],
) -> None:
    d = JobSettings()
    group = parser.add_argument_group("jobs: clips over HTTP, POST /api/jobs (each flag also reads LIVEDIFF_<FLAG>)")
    group.add_argument(
        "--jobs-db",
        default=env("jobs_db", d.db),
        help="postgresql://user@host/db: a job store shared by replicas (claims with SKIP LOCKED); "
        "none: SQLite, jobs.db in --state-dir",
    )
    group.add_argument(
        "--jobs-storage",
        default=env("jobs_storage", None),
        help="folder of the jobs' and recordings' files (none: jobs/ in --state-dir), or s3://bucket/prefix: "
        "S3-compatible storage (endpoint and keys: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; docs/jobs.md)",
    )
    group.add_argument(
        "--max-jobs", type=int_range(1, 64), default=env("max_jobs", d.max_jobs), help="jobs run at once"
    )
    group.add_argument(
        "--jobs-max-bytes",
        type=int_range(1, 1 << 50),
        default=env("jobs_max_bytes", d.max_bytes),
        help="largest upload; refused with 413 while it streams in",
    )
    group.add_argument(
        "--jobs-max-seconds",
        type=float_range(0.001, 1e7),
        default=env("jobs_max_seconds", d.max_seconds),
        help="longest clip in seconds (422 beyond)",
    )
    group.add_argument(
        "--jobs-lease",
        type=float_range(0.5, 86400),
        default=env("jobs_lease", d.lease_s),
        help="seconds without progress after which a job is taken up again (its server died)",
    )
    group.add_argument(
        "--jobs-max-attempts",
        type=int_range(1, 100),
        default=env("jobs_max_attempts", d.max_attempts),
        help="attempts of a job failing with transient errors (out of memory, storage), the first included",
    )
    group.add_argument(
        "--jobs-batch",
        type=int_range(0, 64),
        default=env("jobs_batch", d.batch),
        help="frames of one job per engine step; 0: --max-batch",
    )
    group.add_argument(
        "--idempotency-ttl",
        type=float_range(1, 365 * 86400),
        default=env("idempotency_ttl", d.idempotency_ttl_s),
        help="seconds an Idempotency-Key is remembered",
    )
    group.add_argument(
        "--webhook-secret",
        default=env("webhook_secret", ""),
        help="whsec_... secret signing the webhooks (Standard Webhooks); none: made once, kept in --state-dir",
    )
    group.add_argument(
        "--webhook-allow-private",
        action="store_true",
        default=env("webhook_allow_private", "") in ("1", "true", "yes"),
        help="allow callback URLs on loopback, link-local and private addresses (refused by default)",
    )
    group.add_argument(
        "--webhook-max-attempts",
        type=int_range(1, 100),
        default=env("webhook_max_attempts", d.webhook_max_attempts),
        help="delivery attempts of one webhook event (1 s doubling to 60 s apart, with jitter)",
    )
    group.add_argument(
        "--jobs-retention",
        type=float_range(0, 100 * 365 * 86400),
        default=env("jobs_retention", d.retention_s),
        help="seconds after which finished jobs and recordings are deleted, records and files; 0: kept",
    )
    group.add_argument(
        "--recordings-callback-url",
        default=env("recordings_callback_url", d.recordings_callback_url),
        help="http(s) URL each recording's state changes are POSTed to, signed as job webhooks; none: not sent",
    )


def jobs_settings(args: argparse.Namespace) -> JobSettings:
    return JobSettings(
        db=args.jobs_db, max_jobs=args.max_jobs, max_bytes=args.jobs_max_bytes,
        max_seconds=args.jobs_max_seconds, lease_s=args.jobs_lease, max_attempts=args.jobs_max_attempts,
        batch=args.jobs_batch, idempotency_ttl_s=args.idempotency_ttl, webhook_secret=args.webhook_secret,
        webhook_allow_private=args.webhook_allow_private, webhook_max_attempts=args.webhook_max_attempts,
        retention_s=args.jobs_retention, recordings_callback_url=_callback(args),
        **_storage(args.jobs_storage),
    )  # fmt: skip


def _callback(args: argparse.Namespace) -> str:
    """--recordings-callback-url, checked as a job's callback_url is (`ConfigError` naming the flag)."""
    from livediff.errors import ConfigError
    from livediff.jobs.webhooks import CallbackRefused, check_callback_url

    url: str = args.recordings_callback_url or ""
    if url:
        try:
            check_callback_url(url, args.webhook_allow_private)
        except CallbackRefused as exc:
            raise ConfigError(f"--recordings-callback-url: {str(exc).replace('callback_url', 'the URL')}") from None
    return url


def _storage(value: str | None) -> dict[str, Any]:
    """--jobs-storage: a folder, or an s3:// URL (its working copy then in the state folder)."""
    if value and value.startswith("s3://"):
        return {"storage_url": value}
    return {"storage": Path(value) if value else None}
