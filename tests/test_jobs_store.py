"""The job store on SQLite and on a real PostgreSQL: idempotency keys, claims (SKIP LOCKED), retries as data,
stale jobs taken back, cancel racing completion, webhook events in the same transaction as the state."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from livediff.jobs.store import IdempotencyMismatch, Job, JobStore, new_job_id
from tests.postgres_support import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | Path]:
    if request.param == "sqlite":
        yield tmp_path / "jobs.db"
    else:
        yield request.getfixturevalue("postgres_url")


def job(**fields: object) -> Job:
    values: dict[str, object] = {"id": new_job_id(), "state": "", "params": {"seed": 1}, "request_hash": "h"}
    values.update(fields)
    return Job(**values)  # type: ignore[arg-type]


def test_idempotency_keys_and_expiry(target: str | Path) -> None:
    store = JobStore(target)
    first, created = store.create(job(), "key", key_ttl_s=10, now=1000.0)
    assert created and first.state == "queued"
    again, created = store.create(job(), "key", key_ttl_s=10, now=1005.0)
    assert not created and again.id == first.id
    with pytest.raises(IdempotencyMismatch):
        store.create(job(request_hash="other"), "key", now=1005.0)
    later, created = store.create(job(), "key", key_ttl_s=10, now=1011.0)  # expired: a new job
    assert created and later.id != first.id
    assert store.counts()["queued"] == 2
    store.close()


def test_claim_progress_retry_and_finish(target: str | Path) -> None:
    store = JobStore(target, lease_s=5)
    a, _ = store.create(job(callback_url="http://hooks.example/x", max_attempts=2), now=100.0)
    b, _ = store.create(job(), now=101.0)
    claimed = store.claim("w1", now=110.0)
    assert claimed is not None and claimed.id == a.id and claimed.attempt == 1 and claimed.worker == "w1"
    assert store.heartbeat(a.id, "w1", 5, 10, 2.5, now=111.0)
    assert not store.heartbeat(a.id, "w2", 5, 10, 2.5, now=111.0)  # not its job
    retried = store.fail(claimed, "w1", "transient", "CUDA out of memory", backoff_s=30, now=112.0)
    assert retried is not None and retried.state == "queued" and retried.next_run_at == 142.0
    assert retried.error_kind == "transient"
    assert store.claim("w2", now=120.0).id == b.id  # type: ignore[union-attr]  # a is not due yet
    again = store.claim("w2", now=143.0)
    assert again is not None and again.id == a.id and again.attempt == 2
    failed = store.fail(again, "w2", "transient", "CUDA out of memory", backoff_s=30, now=144.0)
    assert failed is not None and failed.state == "failed"  # attempts used up
    # every state change of the job with a callback became one event, in order, in the same transaction
    assert [e.type for e, _ in store.events(a.id)] == ["job.queued", "job.processing", "job.queued",
                                                       "job.processing", "job.failed"]  # fmt: skip
    assert store.events(b.id) == []  # no callback_url, no events
    store.close()


def test_stale_jobs_are_taken_back_and_cancel_beats_completion(target: str | Path) -> None:
    store = JobStore(target, lease_s=5)
    a, _ = store.create(job(), now=100.0)
    store.claim("dead-server", now=101.0)
    assert store.requeue_stale(now=104.0) == []  # within its lease
    (back,) = store.requeue_stale(now=107.0)
    assert back.id == a.id and back.state == "queued" and back.worker is None
    running = store.claim("w2", now=108.0)
    assert running is not None and running.attempt == 2
    assert store.transition(a.id, "cancelled", ("queued", "processing", "encoding"), now=109.0) is not None
    # the worker's next moves find the job no longer its own
    assert store.transition(a.id, "encoding", ("processing",), "w2") is None
    assert not store.heartbeat(a.id, "w2", 1, 1, 1.0)
    assert store.get(a.id).state == "cancelled"  # type: ignore[union-attr]
    store.close()


def test_retention_deletes_old_finished_jobs_with_their_events_and_keys(target: str | Path) -> None:
    store = JobStore(target, lease_s=5)
    hook = "http://hooks.example/x"
    old, _ = store.create(job(callback_url=hook), "old-key", key_ttl_s=10_000, now=100.0)
    pending, _ = store.create(job(callback_url=hook), now=101.0)
    recent, _ = store.create(job(), now=102.0)
    running, _ = store.create(job(), now=103.0)
    for finished, at in ((old, 110.0), (pending, 111.0), (recent, 300.0)):
        store.claim("w", now=at - 1)
        store.transition(finished.id, "complete", ("processing",), "w", now=at)
    store.claim("w", now=120.0)  # `running`: still processing, however old
    for event in store.due_events(30.0, limit=100, now=130.0):  # every event delivered but pending's last one
        if not (event.job_id == pending.id and event.type == "job.complete"):
            store.record_attempt(event, 204, None, True, None, now=131.0)
    recording = store.add_event("rec_0a1b", "recording.complete", hook, {"id": "rec_0a1b"}, now=132.0)
    assert [e.type for e, _ in store.events("rec_0a1b")] == ["recording.complete"]
    assert store.sweep(before=200.0, now=140.0) == [old.id]  # pending: an event to deliver; recent: too new
    assert store.get(old.id) is None and store.events(old.id) == []
    assert len(store.events("rec_0a1b")) == 1  # not delivered yet: kept
    store.record_attempt(recording, 200, None, True, None, now=133.0)
    assert store.sweep(before=200.0, now=140.0) == [] and store.events("rec_0a1b") == []
    assert {store.get(j.id).state for j in (pending, recent, running)} == {"complete", "processing"}  # type: ignore[union-attr]
    reused, created = store.create(job(), "old-key", now=150.0)  # its key went with it: a new job, no error
    assert created and reused.id != old.id
    store.close()


def test_concurrent_claims_on_postgres_take_each_job_once(postgres_url: str) -> None:  # noqa: F811
    """Two stores (two connections, as two replicas) claiming from threads: every job once, none twice."""
    setup = JobStore(postgres_url)
    ids = {setup.create(job(), now=float(i))[0].id for i in range(40)}
    stores = [JobStore(postgres_url) for _ in range(2)]
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def worker(i: int) -> None:
        start.wait()
        while (got := stores[i].claim(f"w{i}")) is not None:
            claimed[i].append(got.id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = claimed[0] + claimed[1]
    assert sorted(everything) == sorted(ids) and len(set(everything)) == 40
    for store in (setup, *stores):
        store.close()


def test_a_claim_skips_a_row_another_transaction_holds(postgres_url: str) -> None:  # noqa: F811
    """SKIP LOCKED itself: while one connection holds the oldest queued row locked, a claim takes the next
    one at once instead of waiting for it."""
    import psycopg

    store = JobStore(postgres_url)
    oldest, _ = store.create(job(), now=1.0)
    newer, _ = store.create(job(), now=2.0)
    with psycopg.connect(postgres_url) as holder:
        holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", [oldest.id])
        got = store.claim("w1")  # without SKIP LOCKED this waits on the holder, which never lets go here
        assert got is not None and got.id == newer.id
        holder.rollback()
    got = store.claim("w1")
    assert got is not None and got.id == oldest.id
    store.close()


def test_a_deletion_is_claimed_once_and_forgotten_after_retention(target: str | Path) -> None:
    store = JobStore(target)
    assert store.claim_deletion("rec_a", now=100.0)
    assert not store.claim_deletion("rec_a", now=101.0)  # a second sweep, a repeated DELETE
    assert store.claim_deletion("rec_b", now=102.0)
    store.sweep(before=101.0, now=200.0)  # rec_a's claim is past the retention: forgotten, rec_b's kept
    assert store.claim_deletion("rec_a", now=201.0) and not store.claim_deletion("rec_b", now=201.0)
    store.close()


def test_replicas_sweeping_one_storage_delete_and_announce_each_recording_once(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
) -> None:
    """Two `Recordings` on one storage (two replicas), each claiming through its own connection to one
    PostgreSQL, sweep the same finished recordings from two threads at once: each is deleted and announced
    (`on_change` with `deleted`) by exactly one of them."""
    import json

    from livediff.jobs.recording import Recordings
    from livediff.jobs.storage import LocalStorage

    storage = LocalStorage(tmp_path / "jobs")
    ids = [f"rec_{i:032x}" for i in range(30)]
    for rec_id in ids:
        folder = storage.folder(rec_id)
        folder.mkdir()
        record = {"id": rec_id, "state": "complete", "started_at": 1.0, "ended_at": 2.0, "streams": {}}
        (folder / "recording.json").write_text(json.dumps(record))
    stores = [JobStore(postgres_url) for _ in range(2)]
    announced: list[list[str]] = [[], []]
    swept: list[list[str]] = [[], []]
    replicas = []
    for i, store in enumerate(stores):
        replica = Recordings(storage)
        replica.claim = store.claim_deletion
        replica.on_change = lambda record, i=i: (
            announced[i].append(record["id"]) if record["state"] == "deleted" else None
        )
        replicas.append(replica)
    start = threading.Barrier(2)

    def sweep(i: int) -> None:
        start.wait()
        swept[i] = replicas[i].sweep(before=10.0)

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(announced[0] + announced[1]) == ids  # every one once, none twice
    assert sorted(swept[0] + swept[1]) == ids and not set(swept[0]) & set(swept[1])
    assert storage.ids("rec_") == set()
    for store in stores:
        store.close()
