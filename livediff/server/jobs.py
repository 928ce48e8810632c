"""Job routes: `POST /api/jobs` (multipart: file, params, callback_url) -> 202 {id, status_url};
`GET /api/jobs`, `GET|DELETE /api/jobs/{id}`, `GET /api/jobs/{id}/result` (an MP4, with range requests).

`Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header): a key names one request; the same key with
the same request (params, callback_url and the file's bytes, hashed) answers the first job, also when
both arrive at once (the key is the store's primary key: one insert wins); with another request it is
422. Keys are forgotten after `JobSettings.idempotency_ttl_s`.

The file streams to storage part by part as it arrives (never whole in memory) and is refused with 413
the moment it passes `--jobs-max-bytes`; it is then probed (a clip PyAV cannot use is 422 naming `file`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from livediff.errors import ConfigError
from livediff.jobs.clip import ClipError, probe
from livediff.jobs.service import Jobs
from livediff.jobs.settings import JobSettings
from livediff.jobs.storage import TooLarge
from livediff.jobs.store import ACTIVE, STATES, IdempotencyMismatch, Job, event_payload, new_job_id
from livediff.jobs.webhooks import CallbackRefused, check_callback_url, describe_events
from livediff.jobs.worker import job_params
from livediff.server.common import LOAD_TASK, SERVICE
from livediff.server.errors import ApiError
from livediff.server.params import refusal

JOBS: web.AppKey[Jobs] = web.AppKey("jobs", Jobs)
MAX_KEY_CHARS = 255
CHUNK = 256 * 1024


def setup(app: web.Application, settings: JobSettings, state_dir: Path) -> None:
    """Routes, and the jobs' start (once the model is loaded) and close (before the scheduler's)."""
    service = app[SERVICE]
    app[JOBS] = Jobs(settings, state_dir, service.scheduler, service.default_params, service.metrics.registry)
    app.router.add_post("/api/jobs", submit)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{id}", get_job)
    app.router.add_delete("/api/jobs/{id}", cancel_job)
    app.router.add_get("/api/jobs/{id}/result", result)
    from livediff.jobs.recording import Recordings
    from livediff.server import recordings

    kept = Recordings(app[JOBS].storage, service.metrics.registry)
    kept.on_change = app[JOBS].recording_changed  # their webhooks (--recordings-callback-url)
    kept.webhooks = app[JOBS].recording_webhooks
    kept.claim = app[JOBS].recording_claim  # replicas sweeping one storage delete each recording once
    app[JOBS].recordings = kept
    recordings.setup(app, kept)
    app.on_startup.append(_start)
    app.on_shutdown.append(_stop)


async def _start(app: web.Application) -> None:
    async def start_when_loaded() -> None:
        await app[JOBS].open_store()  # submissions are taken while the model loads
        await asyncio.shield(app[LOAD_TASK])
        await app[JOBS].start()

    app[_STARTING] = asyncio.create_task(start_when_loaded(), name="livediff-jobs-start")


_STARTING: web.AppKey[asyncio.Task[None]] = web.AppKey("jobs_starting", asyncio.Task)


async def _stop(app: web.Application) -> None:
    task = app[_STARTING]
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await app[JOBS].close()


async def _store(request: web.Request) -> Any:
    return await request.app[JOBS].open_store()


def _describe(job: Job) -> dict[str, Any]:
    return event_payload(job)


# -- POST /api/jobs --------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    settings = jobs.settings
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_KEY_CHARS:
        raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters", "Idempotency-Key")
    if request.content_type != "multipart/form-data":
        raise ApiError(415, f"Content-Type must be multipart/form-data, got {request.content_type or 'none'!r}")
    if request.content_length is not None and request.content_length > settings.max_bytes + 1024 * 1024:
        raise ApiError(413, f"the file is over the limit of {settings.max_bytes} bytes", "file")
    if jobs.scheduler.chunked:  # its steps take live sessions' chunks only (Scheduler.run_background)
        model = jobs.scheduler.engine.settings.model
        raise ApiError(422, f"jobs run image models; this server runs the video model {model!r}")
    job_id = new_job_id()
    try:
        return await _receive(request, jobs, job_id, key)
    except BaseException:
        jobs.storage.remove(job_id)
        raise


async def _receive(request: web.Request, jobs: Jobs, job_id: str, key: str | None) -> web.Response:
    settings = jobs.settings
    reader = await request.multipart()
    fields: dict[str, Any] = {}
    upload = None
    small_limit = 256 * 1024
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name not in ("file", "params", "callback_url"):
            name = getattr(part, "name", None)
            raise ApiError(422, f"unknown form field {name!r}: send file, params, callback_url", name)
        if part.name in fields or (part.name == "file" and upload is not None):
            raise ApiError(422, f"form field {part.name!r} is given twice", part.name)
        if part.name == "file":
            upload = jobs.storage.upload(job_id, settings.max_bytes)
            try:
                while chunk := await part.read_chunk(CHUNK):
                    await asyncio.to_thread(upload.write, chunk)
            except TooLarge as exc:
                raise ApiError(413, str(exc), "file") from None
            except BaseException:
                upload.abort()
                raise
            await asyncio.to_thread(upload.commit)
            fields["file"] = part.filename or "upload"
        else:
            data = await part.read(decode=False)
            if len(data) > small_limit:
                raise ApiError(413, f"{part.name} is over {small_limit} bytes", part.name)
            try:
                fields[part.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, f"{part.name} is not UTF-8", part.name) from None
    if upload is None:
        raise ApiError(422, "the form has no file field: the clip to transform", "file")
    params = _params(jobs, fields.get("params", "{}"))
    callback = fields.get("callback_url") or None
    if callback is not None:
        try:
            await asyncio.to_thread(check_callback_url, callback, settings.webhook_allow_private)
        except CallbackRefused as exc:
            raise ApiError(422, str(exc), "callback_url") from None
    try:
        info = await asyncio.to_thread(probe, upload.path, settings.max_seconds)
    except ClipError as exc:
        raise ApiError(422, str(exc).replace(str(upload.path), fields["file"]), "file") from None
    digest = hashlib.sha256(json.dumps([params, callback, upload.sha256.hexdigest()], sort_keys=True).encode())
    job = Job(
        id=job_id, state="queued", params=params, callback_url=callback, input_name=str(fields["file"])[:255],
        input_bytes=upload.size, frames_total=info.estimated_frames, max_attempts=settings.max_attempts,
        request_hash=digest.hexdigest(),
    )  # fmt: skip
    store = await _store(request)
    try:
        stored, created = await asyncio.to_thread(store.create, job, key, settings.idempotency_ttl_s)
    except IdempotencyMismatch as exc:
        raise ApiError(422, f"{exc}: a key names one request", "Idempotency-Key") from None
    if created:
        jobs.changed(stored)
        if jobs.worker is not None:
            jobs.worker.wake()
    else:
        jobs.storage.remove(job_id)  # the first request's job answers
    status_url = f"/api/jobs/{stored.id}"
    headers = {"Location": status_url}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response({"id": stored.id, "status_url": status_url}, status=202, headers=headers)


def _params(jobs: Jobs, text: str) -> dict[str, Any]:
    """The params JSON, checked as PATCH /api/sessions/{id} checks it (422 naming the field)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"params is not JSON: {exc}", "params") from None
    if not isinstance(data, dict):
        raise ApiError(422, "params must be a JSON object", "params")
    params = job_params(jobs.default_params, data)  # ParamError: 422 naming the field (the error middleware)
    engine = jobs.scheduler.engine
    if engine is not None:
        try:
            engine.check_params(params)  # what this server's engine cannot run (temporal without the bank)
        except ConfigError as exc:
            raise refusal(exc) from None
    return data


# -- the other routes ------------------------------------------------------------------------------


async def _find(request: web.Request) -> Job:
    job_id = request.match_info["id"]
    job = await asyncio.to_thread((await _store(request)).get, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}")
    return job


async def get_job(request: web.Request) -> web.Response:
    job = await _find(request)
    store = await _store(request)
    body = _describe(job)
    body["webhooks"] = describe_events(await asyncio.to_thread(store.events, job.id))
    return web.json_response(body)


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise ApiError(422, f"state must be one of {', '.join(STATES)}, got {state!r}", "state")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(422, "limit must be an integer", "limit") from None
    if not 1 <= limit <= 500:
        raise ApiError(422, f"limit must be in 1..500, got {limit}", "limit")
    before = None
    if "cursor" in request.query:
        created, _, job_id = request.query["cursor"].partition(":")
        try:
            before = (float(created), job_id)
        except ValueError:
            raise ApiError(422, "cursor is not one this server gave", "cursor") from None
    page = await asyncio.to_thread((await _store(request)).page, state, limit, before)
    cursor = f"{page[-1].created_at!r}:{page[-1].id}" if len(page) == limit else None
    return web.json_response({"jobs": [_describe(job) for job in page], "next_cursor": cursor})


async def cancel_job(request: web.Request) -> web.Response:
    jobs = request.app[JOBS]
    job = await _find(request)
    store = await _store(request)
    cancelled = await asyncio.to_thread(store.transition, job.id, "cancelled", ACTIVE)
    if cancelled is None:
        current = await asyncio.to_thread(store.get, job.id)
        state = current.state if current is not None else job.state
        raise ApiError(409, f"job {job.id} is {state}: only a queued or running job can be cancelled")
    jobs.changed(cancelled)
    running = jobs.worker.running.get(job.id) if jobs.worker is not None else None
    if running is not None:
        running.stop.set()
    return web.json_response(_describe(cancelled))


async def result(request: web.Request) -> web.StreamResponse:
    jobs = request.app[JOBS]
    job = await _find(request)
    if job.state != "complete":
        raise ApiError(409 if job.state in ACTIVE else 410, f"job {job.id} is {job.state}: it has no result")
    path = await asyncio.to_thread(jobs.storage.fetch, job.id, "result.mp4")
    if path is None:
        raise ApiError(410, f"the result of job {job.id} is no longer stored")
    return web.FileResponse(path, headers={"Content-Type": "video/mp4"})
