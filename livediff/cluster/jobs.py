"""Jobs and recordings through the cluster's entry point (`livediff serve --cluster --jobs-db postgresql://...`).

Every replica runs the single server's job routes, worker and webhook sender (`livediff.server.jobs`) on
one shared store, the PostgreSQL database `--jobs-db` names, and one storage (`--jobs-storage`: a folder
every replica reaches, or `s3://...`). So any replica answers any job request, and a job is run by
whichever replica's worker claims it first (`SELECT ... FOR UPDATE SKIP LOCKED`): one whose running jobs
are below `--max-jobs`, that is, one with spare capacity. The gateway places no job itself.

How the gateway passes the requests on:

* `POST /api/jobs` (a clip of up to `--jobs-max-bytes`) and `GET /api/{jobs,recordings}/{id}/result`
  (an MP4, with range requests) are streamed, never held whole in the gateway's memory: straight to a
  ready replica's app at its own address on its node, over HTTP (`stream`), as the requests of a
  draining replica's sessions are. The upload goes to the ready replica with the fewest sessions;
  a result to any ready replica.
* the other job and recording routes (status, list, cancel, delete) are small: one Ray call each to
  any replica, as any other request (`Gateway.send`).

Without `--jobs-db` a cluster serves no jobs: those paths answer 501 naming the flag (`refusal`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from livediff.cluster.calls import end_to_end
from livediff.cluster.routing import ReplicaView

PATHS = re.compile(r"^/api/(?:jobs|recordings)(?:/.*)?$")
"""Paths of the job and recording routes."""
RESULT = re.compile(r"^/api/(?:jobs|recordings)/[^/]+/result$")
CHUNK = 256 * 1024


def is_job_path(path: str) -> bool:
    """A job or recording route (`/api/jobs...`, `/api/recordings...`)."""
    return PATHS.match(path) is not None


def is_streamed(method: str, path: str) -> bool:
    """A request whose body or answer may be large: the upload of a clip, a result's MP4."""
    return (method == "POST" and path == "/api/jobs") or (method in ("GET", "HEAD") and RESULT.match(path) is not None)


def refusal() -> dict[str, Any]:
    """The 501 body of a job route on a cluster started without a shared store."""
    return {
        "error": "jobs in a cluster need a store every replica shares: start it with --jobs-db postgresql://...",
        "field": "--jobs-db",
    }


def pick(replicas: list[ReplicaView], upload: bool) -> ReplicaView | None:
    """The replica a streamed request goes to: ready, with a known address; for an upload, the one with the
    fewest sessions (ties: the lowest key, so a burst is not spread by chance). None when none is ready."""
    ready = [r for r in replicas if r.ready and r.url]
    if not ready:
        return None
    return min(ready, key=lambda r: (r.sessions + r.placing, r.key)) if upload else min(ready, key=lambda r: r.key)


async def stream(
    http: aiohttp.ClientSession,
    replica: ReplicaView,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: AsyncIterator[bytes] | None,
) -> tuple[int, list[tuple[str, str]], AsyncIterator[bytes]]:
    """Send the request to `replica`'s app with `body` streamed as it comes (Content-Length kept when the
    client sent one): (status, end-to-end headers with Content-Length, the answer's body as it comes).
    The caller must iterate the body to its end (or close it): that releases the connection.
    Raises aiohttp's errors when the replica cannot be reached."""
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    sent = end_to_end(headers) + ([("Content-Length", length)] if length is not None else [])
    response = await http.request(method, replica.url + target, headers=sent, data=body, allow_redirects=False)
    answer = end_to_end(list(response.headers.items()))
    if "Content-Length" in response.headers:
        answer.append(("Content-Length", response.headers["Content-Length"]))

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                yield chunk
        finally:
            response.release()

    return response.status, answer, chunks()
