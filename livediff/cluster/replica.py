"""EngineReplica: one Serve replica running the single server's app, and the peers of its sessions.

The replica starts `livediff.server.create_app` as `livediff serve` does (model resolved for this
node's device, engine warmed up before the replica counts as started, so Serve routes nothing to
it until then) on this node's address: the gateway's calls reach it through Ray and are replayed
against the app over HTTP on the node, so every route, check and error is the single server's own.
While Serve drains the replica (it routes nothing more to it), the gateway sends the requests of
its sessions to that address directly (`routing.SessionRouter` remembers it). The app's peers
gather ICE candidates on this node's addresses (all of them, or `LIVEDIFF_ICE_ADDRESSES` where set
on the node), so clients send media here directly. With `jobs` (`--jobs-db`), the app also has the
job routes and a worker claiming jobs from the store every replica shares (`livediff.cluster.jobs`).

What Serve asks of a replica: `record_routing_stats` (free room, for the gateway's placement),
`record_autoscaling_stats` (sessions, for `autoscale.sessions_policy`), `check_health`, and
`__del__` when Serve stops it: it waits for its sessions to end (at most `drain_timeout_s`) so that
scaling down never cuts a live stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp
from aiohttp import web

from livediff.cluster.calls import HttpCall, HttpReply, replay
from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.jobs.settings import JobSettings

log = logging.getLogger(__name__)

ICE_ADDRESSES_ENV = "LIVEDIFF_ICE_ADDRESSES"
"""Comma-separated addresses a node's replicas gather ICE candidates on (default: every interface)."""
NAT_1TO1_ENV = "LIVEDIFF_NAT_1TO1"
"""A node's `--nat-1to1` (its public address), set on the node: it differs from node to node."""


class EngineReplica:
    """Serve deployment class (bound in `livediff.cluster.app`): engine + scheduler + transport."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self,
        engine: EngineSettings,
        server: ServerSettings,
        params: StreamParams,
        drain_timeout_s: float,
        jobs: JobSettings | None = None,
    ) -> None:
        import ray
        from ray import serve

        from livediff.backends import resolve_backend
        from livediff.engine.device import resolve_device
        from livediff.models import resolve_auto
        from livediff.server import create_app
        from livediff.server.common import LOAD_TASK, SERVICE
        from livediff.server.listen import bind, bound_port
        from livediff.transport.loopback import host_candidates

        self.key = serve.get_replica_context().replica_id.unique_id
        self.drain_timeout_s = drain_timeout_s
        self.started = time.time()
        self._ice = contextlib.ExitStack()
        addresses = [a.strip() for a in os.environ.get(ICE_ADDRESSES_ENV, "").split(",") if a.strip()]
        if not addresses and server.ice_loopback:
            addresses = ["127.0.0.1"]
        if addresses:
            self._ice.enter_context(host_candidates(addresses))
        nat = [a.strip() for a in os.environ.get(NAT_1TO1_ENV, "").split(",") if a.strip()]
        if nat:  # each node has its own public address; a flag would give every node one
            server = server.replace(nat_1to1=tuple(nat))
        device = resolve_device(engine.device)
        engine = engine.replace(
            model=resolve_auto(engine.model, device),
            backend=resolve_backend(engine.backend, device, engine.engines_dir),
        )
        # plain http inside the cluster: TLS, if any, ends at the entry point
        server = server.replace(port=0, session_id_prefix=f"{self.key}-", tls_cert=None,
                                tls_key=None, tls_self_signed=False)  # fmt: skip
        app = create_app(engine, server, default_params=params, jobs=jobs)  # jobs: on the shared store
        self.service = app[SERVICE]
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()  # starts the model load
        host = ray.util.get_node_ip_address()
        sockets = bind(host, 0)
        await web.SockSite(self.runner, sockets[0]).start()
        self.url = f"http://{host}:{bound_port(sockets)}"
        """Where the app answers: this replica's own calls, and the gateway's while it drains."""
        self.http = aiohttp.ClientSession(auto_decompress=False)
        await app[LOAD_TASK]  # a load error fails the replica's start, which Serve reports and retries
        log.info("replica %s ready at %s (ICE %s)", self.key, self.url, addresses or "every interface")

    async def __call__(self, call: HttpCall, route: str | None = None) -> HttpReply:
        """Replay `call` against this replica's app. `route` is read by the router."""
        return await replay(self.http, self.url, call, self.key)

    def sessions(self) -> int:
        """Publishing sessions this replica holds."""
        return len(self.service.scheduler.sessions)

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router places new sessions by (read every `stats_period_s`): its sessions by id
        (the router counts the calls it sent that they do not show yet; `livediff.cluster.routing`)."""
        return {
            "at": time.time(),
            "sessions": list(self.service.scheduler.sessions),
            "max_sessions": self.service.settings.max_sessions,
            "ready": self.service.ready,
            "started": self.started,
            "url": self.url,
            "pid": os.getpid(),
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"sessions": float(self.sessions())}

    def check_health(self) -> None:
        if self.service.load_error is not None:
            raise RuntimeError(self.service.load_error)

    async def __del__(self) -> None:
        """Serve stops this replica: let its sessions end by themselves (at most `drain_timeout_s`), then
        close what is left like `livediff serve` on SIGTERM."""
        deadline = time.monotonic() + self.drain_timeout_s
        if self.sessions():
            log.info("replica %s stopping: draining %d sessions", self.key, self.sessions())
        while self.sessions() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await self.http.close()
        await self.runner.cleanup()
        self._ice.close()
