"""Recording routes: `GET /api/recordings` (newest first), `GET /api/recordings/{id}` (its record: state,
frames and drops per stream, the timeline of param changes, its webhooks), `GET
/api/recordings/{id}/result[?stream=input]` (the MP4, with range requests, once the recording is complete),
`DELETE /api/recordings/{id}` (a finished recording, files and record). Recordings start and stop with the
session field `record` (`livediff.jobs.recording`, `Service.record`)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from livediff.jobs.recording import STREAMS, RecordingActive, Recordings
from livediff.server.common import SERVICE
from livediff.server.errors import ApiError

RECORDINGS: web.AppKey[Recordings] = web.AppKey("recordings", Recordings)


def setup(app: web.Application, recordings: Recordings) -> None:
    """The routes, and the service's recordings (the `record` session field works once this ran)."""
    app[RECORDINGS] = recordings
    app[SERVICE].recordings = recordings
    app.router.add_get("/api/recordings", list_recordings)
    app.router.add_get("/api/recordings/{id}", get_recording)
    app.router.add_get("/api/recordings/{id}/result", result)
    app.router.add_delete("/api/recordings/{id}", delete_recording)


async def _find(request: web.Request) -> dict[str, Any]:
    rec_id = request.match_info["id"]
    record = await asyncio.to_thread(request.app[RECORDINGS].get, rec_id)
    if record is None:
        raise ApiError(404, f"no recording {rec_id!r}")
    return record


async def list_recordings(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[RECORDINGS].list)
    return web.json_response({"recordings": records})


async def get_recording(request: web.Request) -> web.Response:
    record = await _find(request)
    webhooks = request.app[RECORDINGS].webhooks
    if webhooks is not None:
        found = await asyncio.to_thread(webhooks, record["id"])
        if found is not None:
            record["webhooks"] = found
    return web.json_response(record)


async def delete_recording(request: web.Request) -> web.Response:
    rec_id = request.match_info["id"]
    try:
        record = await asyncio.to_thread(request.app[RECORDINGS].delete, rec_id)
    except RecordingActive as exc:
        raise ApiError(409, str(exc)) from None
    if record is None:
        raise ApiError(404, f"no recording {rec_id!r}")
    return web.json_response({"id": rec_id, "state": "deleted"})


async def result(request: web.Request) -> web.StreamResponse:
    stream = request.query.get("stream", "output")
    if stream not in STREAMS:
        raise ApiError(422, f"stream must be one of {', '.join(STREAMS)}, got {stream!r}", "stream")
    record = await _find(request)
    if record["state"] != "complete":
        status = 409 if record["state"] == "recording" else 410
        raise ApiError(status, f"recording {record['id']} is {record['state']}: it has no result yet")
    if stream not in record["streams"]:
        raise ApiError(404, f"recording {record['id']} has no {stream} stream (record_input was not set)", "stream")
    path = await asyncio.to_thread(request.app[RECORDINGS].result_path, record["id"], stream)
    if path is None:
        raise ApiError(410, f"recording {record['id']} has no {stream} file (no frame was recorded)")
    return web.FileResponse(path, headers={"Content-Type": "video/mp4"})
