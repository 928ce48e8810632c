"""Where jobs live: one table of jobs, their webhook events and delivery attempts, and idempotency keys, in
SQLite (a file in the state folder; one server) or PostgreSQL (`postgresql://...`; any number of replicas).

The rules, as the Postgres job queues do it (procrastinate, pgqueuer):

- a job is claimed by one worker with one `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)`
  (PostgreSQL; SQLite has one writer at a time, so the same statement without the lock clause is safe);
- every state change is one UPDATE guarded by the states it may come from (and by the worker that holds
  the job), so a cancel and a completion cannot both win;
- retries are data: `attempt` and `next_run_at` on the row, not a task sleeping somewhere;
- a claimed job carries `heartbeat_at`; a job whose worker stopped beating for `lease_s` (its server died)
  goes back to `queued` and is claimed again;
- a state change and its webhook event are written in the same transaction (an outbox), so a receiver
  hears of every state that was stored, even across a crash.

The store is synchronous (sqlite3 / psycopg 3); the server calls it through `asyncio.to_thread`. One
connection per store, used by one thread at a time (`_lock`).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATES = ("queued", "processing", "encoding", "complete", "failed", "cancelled")
ACTIVE = ("queued", "processing", "encoding")
FINISHED = ("complete", "failed", "cancelled")
"""`queued -> processing -> encoding -> complete | failed | cancelled`; a transient failure goes back to queued."""


class IdempotencyMismatch(Exception):
    """An Idempotency-Key already used with another request body (draft-ietf-httpapi-idempotency-key-header: 422)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the Idempotency-Key was used for another request (job {job_id})")
        self.job_id = job_id


@dataclass
class Job:
    """One row of `jobs`."""

    id: str
    state: str
    params: dict[str, Any]
    """Stream params as the request gave them (PATCH /api/sessions/{id} JSON)."""
    callback_url: str | None = None
    input_name: str = ""
    """The uploaded file's name (for people; storage keys by id)."""
    input_bytes: int = 0
    frames_done: int = 0
    frames_total: int = 0
    """Estimated from the container; 0 while unknown."""
    fps: float = 0.0
    """Frames per second of the latest attempt."""
    attempt: int = 0
    """Attempts started (a claim adds one)."""
    max_attempts: int = 3
    next_run_at: float = 0.0
    """Unix seconds before which the job is not claimed (backoff after a transient failure)."""
    worker: str | None = None
    heartbeat_at: float | None = None
    error_kind: str | None = None
    """`transient` or `permanent`."""
    error_message: str | None = None
    request_hash: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def progress(self) -> float:
        """0-100; 100 once complete."""
        if self.state == "complete":
            return 100.0
        if not self.frames_total:
            return 0.0
        return round(min(99.0, 100.0 * self.frames_done / self.frames_total), 1)


JOB_COLUMNS = [f for f in Job.__dataclass_fields__]
_JSON = {"params"}


@dataclass
class Event:
    """A webhook event: one state change of a job, delivered to its callback URL until it is accepted."""

    id: str
    """The `webhook-id` (stable across delivery attempts, so receivers can drop repeats)."""
    job_id: str
    type: str
    """`job.<state>`."""
    url: str
    payload: str
    """The JSON body, fixed when the state changed."""
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0
    delivered_at: float | None = None
    failed_at: float | None = None
    last_error: str | None = None


EVENT_COLUMNS = [f for f in Event.__dataclass_fields__]


@dataclass
class Attempt:
    event_id: str
    attempt: int
    at: float
    status: int | None
    """The receiver's HTTP status; None when none came (refused, timed out)."""
    error: str | None = None


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, params TEXT NOT NULL, callback_url TEXT, input_name TEXT,
        input_bytes BIGINT NOT NULL DEFAULT 0, frames_done INTEGER NOT NULL DEFAULT 0,
        frames_total INTEGER NOT NULL DEFAULT 0, fps DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempt INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,
        next_run_at DOUBLE PRECISION NOT NULL DEFAULT 0, worker TEXT, heartbeat_at DOUBLE PRECISION,
        error_kind TEXT, error_message TEXT, request_hash TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, next_run_at, created_at)",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, job_id TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS webhook_events (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, type TEXT NOT NULL, url TEXT NOT NULL, payload TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL, delivered_at DOUBLE PRECISION,
        failed_at DOUBLE PRECISION, last_error TEXT)""",
    "CREATE INDEX IF NOT EXISTS webhook_due ON webhook_events (delivered_at, failed_at, next_attempt_at)",
    """CREATE TABLE IF NOT EXISTS webhook_attempts (
        event_id TEXT NOT NULL, attempt INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, status INTEGER,
        error TEXT, PRIMARY KEY (event_id, attempt))""",
    """CREATE TABLE IF NOT EXISTS deletions (
        id TEXT PRIMARY KEY, deleted_at DOUBLE PRECISION NOT NULL)""",
]


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex


def event_payload(job: Job, base_url: str = "") -> dict[str, Any]:
    """What a webhook says and `GET /api/jobs/{id}` answers about a job (its URLs relative to `base_url`)."""
    body: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "progress": job.progress,
        "frames_done": job.frames_done,
        "frames_total": job.frames_total,
        "fps": round(job.fps, 2),
        "attempt": job.attempt,
        "params": job.params,
        "input": {"name": job.input_name, "bytes": job.input_bytes},
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "status_url": f"{base_url}/api/jobs/{job.id}",
        "result_url": f"{base_url}/api/jobs/{job.id}/result" if job.state == "complete" else None,
        "error": {"kind": job.error_kind, "message": job.error_message} if job.error_message else None,
    }
    return body


class JobStore:
    """Jobs in SQLite (`JobStore(path)`) or PostgreSQL (`JobStore("postgresql://...")`).

    Every method is one transaction. Times are Unix seconds (`time.time()`), passed in where a test
    or a caller needs them fixed.
    """

    def __init__(self, target: str | Path, lease_s: float = 30.0) -> None:
        self.lease_s = lease_s
        """Seconds without a heartbeat after which a claimed job is taken back (`requeue_stale`)."""
        self._lock = threading.Lock()
        self.postgres = isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            import psycopg

            self._conn: Any = psycopg.connect(str(target), autocommit=True)
        else:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._tx() as cur:
            for statement in _SCHEMA:
                cur.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- plumbing --------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor inside one transaction (BEGIN IMMEDIATE on SQLite: the write lock from the start)."""
        with self._lock:
            if self.postgres:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield _Cursor(cur, "%s")
            else:
                cur = self._conn.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield _Cursor(cur, "?")
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")

    @property
    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED" if self.postgres else ""

    @staticmethod
    def _job(row: Sequence[Any] | None) -> Job | None:
        if row is None:
            return None
        values = dict(zip(JOB_COLUMNS, row))
        for name in _JSON:
            values[name] = json.loads(values[name])
        return Job(**values)

    @staticmethod
    def _event(row: Sequence[Any]) -> Event:
        return Event(**dict(zip(EVENT_COLUMNS, row)))

    def _add_event(self, cur: _Cursor, job: Job, now: float) -> None:
        """The webhook event of `job`'s new state, in the transaction that stored it."""
        if job.callback_url:
            self._insert_event(cur, job.id, f"job.{job.state}", job.callback_url, event_payload(job), now)

    @staticmethod
    def _insert_event(cur: _Cursor, subject: str, kind: str, url: str, data: dict[str, Any], now: float) -> Event:
        payload = json.dumps({"type": kind, "timestamp": _iso(now), "data": data})
        event = Event("msg_" + secrets.token_hex(12), subject, kind, url, payload, now, 0, now)
        cur.execute(
            f"INSERT INTO webhook_events ({', '.join(EVENT_COLUMNS)}) VALUES ({_marks(len(EVENT_COLUMNS))})",
            [getattr(event, name) for name in EVENT_COLUMNS],
        )
        return event

    def add_event(self, subject: str, kind: str, url: str, data: dict[str, Any], now: float | None = None) -> Event:
        """A webhook event about something that is not a job row (a recording: `subject` its id, `kind`
        `recording.<state>`), delivered as jobs' events are: `{"type": kind, "timestamp", "data": data}`."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            return self._insert_event(cur, subject, kind, url, data, now)

    def claim_deletion(self, subject: str, now: float | None = None) -> bool:
        """Whether this caller deletes `subject` (a recording, whose record lives in the storage, not here):
        the first to ask wins, every later ask (another replica sweeping the same recording, a repeated
        DELETE) gets False, so that it is deleted and announced once. One `INSERT ... ON CONFLICT DO NOTHING
        RETURNING`: the primary key decides, on PostgreSQL across connections as on SQLite. Claims older
        than the retention go with `sweep`."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute("INSERT INTO deletions (id, deleted_at) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING "
                        "RETURNING id", [subject, now])  # fmt: skip
            return cur.fetchone() is not None

    def sweep(self, before: float, now: float | None = None) -> list[str]:
        """Retention: finished jobs (complete, failed, cancelled) that ended before `before` and have no webhook
        event still to deliver are deleted with their events, attempts and idempotency keys -> their ids (their
        files are the caller's to remove). Delivered or given-up events older than `before` of subjects that
        are no job (recordings) go too, and expired idempotency keys."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM jobs WHERE state IN ('complete', 'failed', 'cancelled') AND finished_at < %s AND NOT "
                "EXISTS (SELECT 1 FROM webhook_events e WHERE e.job_id = jobs.id AND e.delivered_at IS NULL AND "
                "e.failed_at IS NULL) RETURNING id",
                [before],
            )
            ids = [str(row[0]) for row in cur.fetchall()]
            done = (
                "(delivered_at IS NOT NULL OR failed_at IS NOT NULL) AND created_at < %s "
                "AND job_id NOT IN (SELECT id FROM jobs)"
            )
            cur.execute(f"DELETE FROM webhook_attempts WHERE event_id IN (SELECT id FROM webhook_events WHERE {done})",
                        [before])  # fmt: skip
            cur.execute(f"DELETE FROM webhook_events WHERE {done}", [before])
            cur.execute("DELETE FROM idempotency_keys WHERE expires_at < %s OR job_id NOT IN (SELECT id FROM jobs)",
                        [now])  # fmt: skip
            cur.execute("DELETE FROM deletions WHERE deleted_at < %s", [before])
        return ids

    def _update(self, cur: _Cursor, sets: str, where: str, args: Sequence[Any], now: float) -> list[Job]:
        cur.execute(f"UPDATE jobs SET {sets} WHERE {where} RETURNING {', '.join(JOB_COLUMNS)}", args)
        jobs = [j for j in (self._job(row) for row in cur.fetchall()) if j is not None]
        for job in jobs:
            self._add_event(cur, job, now)
        return jobs

    # -- jobs ------------------------------------------------------------------------------------

    def create(self, job: Job, idempotency_key: str | None = None, key_ttl_s: float = 86400.0,
               now: float | None = None) -> tuple[Job, bool]:  # fmt: skip
        """Store a new queued job; (the job, True). With an `idempotency_key` already used for the same
        `request_hash` (and not expired): (that first job, False), nothing stored; for another hash:
        `IdempotencyMismatch`. Concurrent calls with one key store one job (the key's primary key)."""
        now = time.time() if now is None else now
        job.state, job.created_at, job.updated_at = "queued", now, now
        with self._tx() as cur:
            if idempotency_key is not None:
                cur.execute("DELETE FROM idempotency_keys WHERE key = %s AND expires_at < %s", [idempotency_key, now])
                cur.execute(
                    "INSERT INTO idempotency_keys (key, request_hash, job_id, expires_at) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (key) DO NOTHING RETURNING key",
                    [idempotency_key, job.request_hash, job.id, now + key_ttl_s],
                )
                if cur.fetchone() is None:
                    cur.execute("SELECT request_hash, job_id FROM idempotency_keys WHERE key = %s", [idempotency_key])
                    request_hash, first_id = cur.fetchone()
                    if request_hash != job.request_hash:
                        raise IdempotencyMismatch(first_id)
                    cur.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = %s", [first_id])
                    first = self._job(cur.fetchone())
                    assert first is not None
                    return first, False
            values = [json.dumps(v) if k in _JSON else v for k, v in zip(JOB_COLUMNS, _values(job))]
            cur.execute(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({_marks(len(JOB_COLUMNS))})", values)
            self._add_event(cur, job, now)
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._tx() as cur:
            cur.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = %s", [job_id])
            return self._job(cur.fetchone())

    def page(self, state: str | None = None, limit: int = 50, before: tuple[float, str] | None = None) -> list[Job]:
        """Newest first, `limit` at most; `before`: (created_at, id) of the last job of the previous page."""
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        if state is not None:
            where.append("state = %s")
            args.append(state)
        if before is not None:
            where.append("(created_at < %s OR (created_at = %s AND id < %s))")
            args += [before[0], before[0], before[1]]
        with self._tx() as cur:
            cur.execute(
                f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE {' AND '.join(where)} "
                "ORDER BY created_at DESC, id DESC LIMIT %s",
                [*args, limit],
            )
            return [j for j in (self._job(r) for r in cur.fetchall()) if j is not None]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state, 0 included)."""
        with self._tx() as cur:
            cur.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            found = dict(cur.fetchall())
        return {state: int(found.get(state, 0)) for state in STATES}

    def claim(self, worker: str, now: float | None = None) -> Job | None:
        """The oldest due queued job, now `processing` and held by `worker` (attempt + 1); None when none."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            jobs = self._update(
                cur,
                "state = 'processing', worker = %s, heartbeat_at = %s, attempt = attempt + 1, updated_at = %s, "
                "started_at = %s, frames_done = 0, error_kind = NULL, error_message = NULL",
                "id = (SELECT id FROM jobs WHERE state = 'queued' AND next_run_at <= %s ORDER BY created_at, id "
                f"LIMIT 1{self._skip_locked}) AND state = 'queued'",
                [worker, now, now, now, now],
                now,
            )
        return jobs[0] if jobs else None

    def heartbeat(self, job_id: str, worker: str, frames_done: int, frames_total: int, fps: float,
                  now: float | None = None) -> bool:  # fmt: skip
        """Progress of a held job; False when the worker no longer holds it (cancelled, taken back)."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(
                "UPDATE jobs SET frames_done = %s, frames_total = %s, fps = %s, heartbeat_at = %s, updated_at = %s "
                "WHERE id = %s AND worker = %s AND state IN ('processing', 'encoding') RETURNING id",
                [frames_done, frames_total, fps, now, now, job_id, worker],
            )
            return cur.fetchone() is not None

    def transition(self, job_id: str, to: str, sources: Sequence[str], held_by: str | None = None,
                   now: float | None = None, **fields: Any) -> Job | None:  # fmt: skip
        """Move a job from one of `sources` to `to` (held by worker `held_by` when given), setting `fields` too: the
        job as stored, or None when it was not in such a state (someone else moved it first)."""
        now = time.time() if now is None else now
        sets = ["state = %s", "updated_at = %s"] + [f"{name} = %s" for name in fields]
        args: list[Any] = [to, now, *fields.values()]
        if to in FINISHED:
            sets.append("finished_at = %s")
            args.append(now)
        where = f"id = %s AND state IN ({_marks(len(sources))})"
        args += [job_id, *sources]
        if held_by is not None:
            where += " AND worker = %s"
            args.append(held_by)
        with self._tx() as cur:
            jobs = self._update(cur, ", ".join(sets), where, args, now)
        return jobs[0] if jobs else None

    def fail(self, job: Job, worker: str, kind: str, message: str, backoff_s: float = 0.0,
             now: float | None = None) -> Job | None:  # fmt: skip
        """A failed attempt: a `transient` one with attempts left goes back to queued, due in `backoff_s`;
        otherwise the job is failed with the error."""
        now = time.time() if now is None else now
        retry = kind == "transient" and job.attempt < job.max_attempts
        return self.transition(
            job.id, "queued" if retry else "failed", ("processing", "encoding"), worker, now,
            error_kind=kind, error_message=message, worker=None,
            next_run_at=now + backoff_s if retry else job.next_run_at,
        )  # fmt: skip

    def requeue_stale(self, now: float | None = None, lease_s: float | None = None) -> list[Job]:
        """Jobs whose worker stopped beating (`lease_s`, default the store's) back to queued."""
        now = time.time() if now is None else now
        lease = self.lease_s if lease_s is None else lease_s
        with self._tx() as cur:
            return self._update(
                cur,
                "state = 'queued', worker = NULL, updated_at = %s",
                "state IN ('processing', 'encoding') AND (heartbeat_at IS NULL OR heartbeat_at < %s)",
                [now, now - lease],
                now,
            )

    # -- webhook events --------------------------------------------------------------------------

    def due_events(self, lease_s: float, limit: int = 16, now: float | None = None) -> list[Event]:
        """Events to deliver now, each held for `lease_s` (its next attempt moved past the delivery)."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(
                "UPDATE webhook_events SET next_attempt_at = %s WHERE id IN (SELECT id FROM webhook_events "
                "WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= %s "
                f"ORDER BY created_at LIMIT %s{self._skip_locked}) RETURNING {', '.join(EVENT_COLUMNS)}",
                [now + lease_s, now, limit],
            )
            return sorted((self._event(r) for r in cur.fetchall()), key=lambda e: e.created_at)

    def record_attempt(self, event: Event, status: int | None, error: str | None, delivered: bool,
                       next_attempt_at: float | None, now: float | None = None) -> None:  # fmt: skip
        """One delivery attempt: delivered, to be tried again at `next_attempt_at`, or (None) given up."""
        now = time.time() if now is None else now
        with self._tx() as cur:
            cur.execute(
                "UPDATE webhook_events SET attempts = attempts + 1, last_error = %s, delivered_at = %s, "
                "failed_at = %s, next_attempt_at = %s WHERE id = %s RETURNING attempts",
                [error, now if delivered else None, None if delivered or next_attempt_at else now,
                 next_attempt_at or now, event.id],
            )  # fmt: skip
            (attempt,) = cur.fetchone()
            cur.execute(
                "INSERT INTO webhook_attempts (event_id, attempt, at, status, error) VALUES (%s, %s, %s, %s, %s)",
                [event.id, attempt, now, status, error],
            )

    def events(self, job_id: str) -> list[tuple[Event, list[Attempt]]]:
        """A job's webhook events, oldest first, each with its attempts."""
        with self._tx() as cur:
            cur.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM webhook_events WHERE job_id = %s ORDER BY created_at",
                [job_id],
            )
            events = [self._event(r) for r in cur.fetchall()]
            cur.execute(
                "SELECT a.event_id, a.attempt, a.at, a.status, a.error FROM webhook_attempts a JOIN webhook_events e "
                "ON a.event_id = e.id WHERE e.job_id = %s ORDER BY a.attempt",
                [job_id],
            )
            attempts: dict[str, list[Attempt]] = {}
            for row in cur.fetchall():
                attempts.setdefault(row[0], []).append(Attempt(*row))
        return [(event, attempts.get(event.id, [])) for event in events]

    def webhook_counts(self) -> dict[str, int]:
        """Events delivered, failed (given up) and pending."""
        with self._tx() as cur:
            cur.execute(
                "SELECT COUNT(delivered_at), COUNT(failed_at), "
                "SUM(CASE WHEN delivered_at IS NULL AND failed_at IS NULL THEN 1 ELSE 0 END) FROM webhook_events"
            )
            delivered, failed, pending = cur.fetchone()
        return {"delivered": int(delivered or 0), "failed": int(failed or 0), "pending": int(pending or 0)}


@dataclass
class _Cursor:
    """A DB-API cursor taking `%s` placeholders whatever the driver's (`?` for sqlite3)."""

    cur: Any
    mark: str
    _last: Any = field(default=None)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.cur.execute(sql if self.mark == "%s" else sql.replace("%s", self.mark), list(args))

    def fetchone(self) -> Any:
        return self.cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self.cur.fetchall())


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


def _values(job: Job) -> list[Any]:
    return [getattr(job, name) for name in JOB_COLUMNS]


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
