"""Gateway: the cluster's entry point, a stateless Serve ingress in front of the engine replicas.

Every HTTP request becomes one call to a replica (`calls.HttpCall`), answered with what the
replica's own app answered, so routes, auth, CORS, limits and errors are the single server's:

* a request that names a session (`/whip/{id}`, `/whep/{id}[/{viewer}]`, `/api/sessions/{id}`)
  goes to the replica in its id; when that replica is gone, to any, which answers 404;
* `POST /offer` and `POST /whip` go to the replica with the most free room; one that answers 503
  (full since its stats) is skipped and the next tried; all full: the last 503 and its Retry-After;
* `GET /api/sessions` and `GET /metrics` ask every replica and merge (sessions gain `replica`,
  samples a `replica` label); `POST /whep` (the newest live session) asks every replica for its sessions;
* `GET /readyz` says how many replicas are ready (200 when at least one is), `GET /healthz` that
  the gateway answers; anything else (pages, `/api/ice-servers`, OPTIONS) goes to any replica;
* jobs and recordings (`/api/jobs...`, `/api/recordings...`): a clip's upload and a result's MP4
  stream to and from a ready replica's app directly; the rest go to any replica (`cluster.jobs`).

A replica that Serve stops drains: Serve no longer routes to it, so its sessions' requests go
straight to its app's address on its node (`direct`).

It keeps no table of sessions: the route is in the session id, and the replicas are those the
router sees (`routing.live_replicas`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from livediff.cluster import jobs, metrics
from livediff.cluster.calls import HttpCall, HttpReply, end_to_end, replay, session_route
from livediff.cluster.routing import (
    ReplicaView,
    choose_replica,
    draining_replicas,
    forget_replica,
    live_replicas,
    note_answered,
    note_opened,
)
from livediff.session import watch_rank

log = logging.getLogger(__name__)

ENGINE = "EngineReplica"
"""The engine replicas' deployment name."""
RETRY_AFTER_S = 5
"""Retry-After when no replica could take a request."""
BOOTSTRAP_S = 2.0
"""A gateway process's first call (which makes its router) waits at most this long for a replica."""


def _json(status: int, data: dict[str, Any], retry_after: int | None = None) -> HttpReply:
    headers = [("Content-Type", "application/json; charset=utf-8")]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return HttpReply(status, headers, json.dumps(data).encode(), "")


def _response(reply: HttpReply) -> Any:
    """`reply` as a Starlette response."""
    from starlette.responses import Response

    response = Response(content=reply.body, status_code=reply.status)
    for name, value in end_to_end(reply.headers):
        response.headers.append(name, value)
    return response


class Gateway:
    """Serve ingress deployment (bound in `livediff.cluster.app`)."""

    def __init__(
        self, engines: Any, app_name: str, max_body_bytes: int, call_timeout_s: float, with_jobs: bool = False
    ) -> None:
        self.engines = engines
        """DeploymentHandle of the EngineReplica deployment."""
        self.app_name = app_name
        self.max_body_bytes = max_body_bytes
        self.call_timeout_s = call_timeout_s
        self.with_jobs = with_jobs
        """The replicas serve jobs on a shared store (`--jobs-db`); else job routes answer 501."""
        self._session: aiohttp.ClientSession | None = None
        self._streams: aiohttp.ClientSession | None = None

    async def __call__(self, request: Any) -> Any:
        """A Starlette request from Serve's HTTP proxy -> a Starlette response."""
        if jobs.is_job_path(request.url.path) and not self.with_jobs:
            return _response(_json(501, jobs.refusal()))
        if self.with_jobs and jobs.is_streamed(request.method, request.url.path):
            return await self.stream(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                reply = _json(413, {"error": f"the body is larger than {self.max_body_bytes} bytes"})
                break
        else:
            call = HttpCall(request.method, request.url.path, request.url.query, list(request.headers.items()),
                            bytes(body))  # fmt: skip
            reply = await self.handle(call)
        return _response(reply)

    async def stream(self, request: Any) -> Any:
        """A clip's upload or a result's download, streamed through to a ready replica's app (`cluster.jobs`).
        A replica that refuses the connection (it died; Serve has not noticed yet) is passed over for the next:
        nothing of the body was sent to it."""
        from starlette.responses import StreamingResponse

        upload = request.method == "POST"

        async def body() -> Any:
            async for chunk in request.stream():
                if chunk:
                    yield chunk

        target = request.url.path + ("?" + request.url.query if request.url.query else "")
        replicas, gone = await self.replicas(), set()
        while (replica := jobs.pick([r for r in replicas if r.key not in gone], upload)) is not None:
            try:
                status, headers, chunks = await jobs.stream(
                    self._streaming(), replica, request.method, target, list(request.headers.items()),
                    body() if upload else None,
                )  # fmt: skip
            except aiohttp.ClientConnectorError as exc:
                log.warning("replica %s refused %s %s: %s", replica.key, request.method, request.url.path, exc)
                gone.add(replica.key)
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("%s %s to replica %s failed: %s", request.method, request.url.path, replica.key, exc)
                return _response(_json(503, {"error": "the replica did not take the request; try again"},
                                       RETRY_AFTER_S))  # fmt: skip
            response = StreamingResponse(chunks, status_code=status)
            for name, value in headers:
                response.headers.append(name, value)
            return response
        return _response(_json(503, {"error": "no replica is ready"}, RETRY_AFTER_S))

    def _streaming(self) -> aiohttp.ClientSession:
        """The HTTP client of streamed requests: no total timeout (a large clip takes as long as it takes)."""
        if self._streams is None or self._streams.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.call_timeout_s)
            self._streams = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
        return self._streams

    async def handle(self, call: HttpCall) -> HttpReply:
        """The answer to `call`, from the replica(s) it concerns (module docstring)."""
        if call.path == "/healthz":
            return _json(200, {"status": "ok"})
        if call.path == "/readyz" and call.method == "GET":
            return await self.readyz()
        route = session_route(call.path)
        if route is not None:
            return await self.send(call, route=route, pinned=True)
        if call.opens_session:
            return await self.place(call)
        if call.path == "/api/sessions" and call.method == "GET":
            return await self.list_sessions(call)
        if call.path == "/metrics" and call.method == "GET":
            return await self.metrics(call)
        if call.path == "/whep" and call.method == "POST":
            return await self.view_any(call)
        return await self.send(call)

    # -- calls ------------------------------------------------------------------------------------

    async def send(
        self, call: HttpCall, route: str | None = None, pinned: bool = False, timeout_s: float | None = None
    ) -> HttpReply:
        """One call to a replica. A replica that dies under it: 404 for a session's request (the
        session ended with its replica), else 503 with Retry-After; so is no answer in `timeout_s`
        (default `call_timeout_s`: Serve holds a call while no replica is up)."""
        timeout_s = timeout_s or self.call_timeout_s
        if route is not None:
            draining = draining_replicas(self.app_name, ENGINE).get(route)
            if draining is not None:
                return await self.direct(draining, call, pinned)
        try:
            return await asyncio.wait_for(self.engines.remote(call, route=route), timeout_s)
        except asyncio.TimeoutError:
            return _json(503, {"error": f"no replica answered in {timeout_s:g} s"}, RETRY_AFTER_S)
        except Exception as exc:  # noqa: BLE001 - Ray's errors for a replica that died under the call
            log.warning("call %s %s failed: %s", call.method, call.path, exc)
            if pinned:
                return _json(404, {"error": f"no resource {call.path!r}: its replica ended"})
            return _json(503, {"error": "the replica ended while answering; try again"}, RETRY_AFTER_S)

    async def direct(self, replica: ReplicaView, call: HttpCall, pinned: bool) -> HttpReply:
        """`call` to a replica Serve no longer routes to (it drains), at its app's own address. One
        that refuses the connection has ended (its sessions with it: 404); one that is only slow
        keeps its sessions and is asked again next time (503 with Retry-After)."""
        try:
            return await replay(self._http(), replica.url, call, replica.key)
        except aiohttp.ClientConnectorError:
            forget_replica(self.app_name, ENGINE, replica.key)  # it ended: ask Serve's replicas from now on
            if pinned:
                return _json(404, {"error": f"no resource {call.path!r}: its replica ended"})
            return _json(503, {"error": "the replica ended; try again"}, RETRY_AFTER_S)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("draining replica %s did not answer %s %s: %s", replica.key, call.method, call.path, exc)
            return _json(503, {"error": "the session's replica did not answer in time; try again"}, RETRY_AFTER_S)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False, timeout=aiohttp.ClientTimeout(total=self.call_timeout_s)
            )
        return self._session

    async def close(self) -> None:
        for session in (self._session, self._streams):
            if session is not None:
                await session.close()

    async def replicas(self) -> list[ReplicaView]:
        """The replicas the router sees (one call first makes this process's router)."""
        seen = live_replicas(self.app_name, ENGINE)
        if seen is None:
            await self.send(HttpCall("GET", "/healthz"), timeout_s=BOOTSTRAP_S)
            seen = live_replicas(self.app_name, ENGINE) or []
        return seen

    async def each(self, call: HttpCall) -> list[HttpReply]:
        """`call` sent to every replica, draining ones too; the answers of those that answered themselves."""
        keys = [r.key for r in await self.replicas()] + list(draining_replicas(self.app_name, ENGINE))
        # one after the other: Serve's router matches a routed call to its request by the incoming
        # request's id, which calls made together for one request share (they were crossed)
        replies = [await self.send(call, route=key) for key in keys]
        return [reply for reply, key in zip(replies, keys) if reply.replica == key]

    # -- routes -----------------------------------------------------------------------------------

    async def place(self, call: HttpCall) -> HttpReply:
        """A new session on the replica with the most free room; one that is full is skipped."""
        refused: list[str] = []
        reply = _json(503, {"error": "no replica is ready"}, RETRY_AFTER_S)
        while (chosen := choose_replica(await self.replicas(), tuple(refused))) is not None:
            opening = note_opened(self.app_name, ENGINE, chosen.key)
            opened, session = True, ""  # until an answer says otherwise (a call that failed may have made one)
            try:
                reply = await self.send(call, route=chosen.key)
                opened, session = reply.status < 300, reply.opened_session()
            finally:
                note_answered(self.app_name, ENGINE, chosen.key, opening, opened, session)
            if reply.status != 503 or not reply.replica or reply.replica in refused:
                return reply
            refused.append(reply.replica)
        return reply

    async def readyz(self) -> HttpReply:
        replicas = await self.replicas()
        ready = [r for r in replicas if r.ready]
        body = {"status": "ready" if ready else "loading", "replicas": {"ready": len(ready), "total": len(replicas)},
                "sessions": sum(r.sessions for r in replicas), "each": [r.describe() for r in replicas]}  # fmt: skip
        if not ready:
            return _json(503, {"error": "no replica is ready", **body}, RETRY_AFTER_S)
        engine = await self.send(HttpCall("GET", "/readyz"), timeout_s=BOOTSTRAP_S)
        if engine.status == 200:
            body["engine"] = json.loads(engine.body)["engine"]
        return _json(200, body)

    async def list_sessions(self, call: HttpCall) -> HttpReply:
        replies = await self.each(call)
        for reply in replies:
            if reply.status != 200:
                return reply  # the replicas' own refusal (401) is the answer
        sessions = [{**s, "replica": r.replica} for r in replies for s in json.loads(r.body)["sessions"]]
        return _json(200, {"sessions": sessions})

    async def metrics(self, call: HttpCall) -> HttpReply:
        replies = await self.each(call)
        for reply in replies:
            if reply.status != 200:
                return reply
        text = metrics.merge({r.replica: r.body.decode() for r in replies}, await self.replicas())
        return HttpReply(200, [("Content-Type", metrics.CONTENT_TYPE)], text, "")

    async def view_any(self, call: HttpCall) -> HttpReply:
        listing = await self.list_sessions(HttpCall("GET", "/api/sessions", headers=call.headers))
        if listing.status != 200:
            return listing
        open_sessions = [s for s in json.loads(listing.body)["sessions"] if s["state"] != "closed"]
        if not open_sessions:
            return _json(404, {"error": "no session is live"})
        chosen = max(open_sessions, key=lambda s: watch_rank(s["state"], s["created"]))
        return await self.send(
            HttpCall(call.method, f"/whep/{chosen['id']}", call.query, call.headers, call.body),
            route=chosen["replica"],
            pinned=True,
        )
