"""SessionRouter: which replica a signalling call goes to (a Ray Serve request router).

Runs inside every process that holds a handle to the engine replicas (the gateway's). It reads
the call's `route` keyword:

* a route key (the request names a session): the replica with that key, and only it. When no
  live replica has the key (its replica died, or is draining), any replica: it does not hold the
  session either and answers 404, as the single server does for an unknown session;
* none (a new session, a page, the ICE servers): the replicas ranked by free room, the most first
  (`max_sessions` less sessions; ties to the replica with fewer sessions, so more free batch
  slots), skipping those in `exclude` (they answered 503).

Free room comes from each replica's `record_routing_stats`, read every `stats_period_s`. Placing a
burst of sessions on stats that old would put them all on one replica, so the router also counts
the session-opening calls it sent since a replica's stats were taken.

The gateway enumerates replicas (metrics, session lists, readiness) through `live_replicas`,
this process's router's own view of what Serve routes to: no second registry of replicas.
A replica Serve stops leaves that view at once but drains for as long as its sessions last
(`EngineReplica.__del__`): the router keeps the address of the replicas that left it
(`draining_replicas`, the newest `REMEMBERED`), where the gateway sends their sessions' requests
directly. A replica that died there refuses the connection, and its sessions answer 404.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

IN_FLIGHT_S = 0.5
"""A session-opening call routed this long before a replica's stats were taken may be missing
from them (still on its way): it is counted as well. Counting one twice only spreads a burst."""

REMEMBERED = 64
"""Replicas that left the routing view whose address is kept (draining ones, and dead ones until
a request finds them gone)."""

_ROUTERS: dict[str, SessionRouter] = {}
"""This process's router per deployment (`app#deployment`), for `live_replicas`."""


@dataclass(frozen=True)
class ReplicaView:
    """A replica as the router sees it."""

    key: str
    sessions: int
    """Its sessions, with the calls opening one, when its stats were taken."""
    placing: int
    """Session-opening calls routed to it since (they may be missing from `sessions`)."""
    max_sessions: int
    ready: bool
    """Its engine is warm (Serve routes to a replica only once it is; False until its first stats)."""
    started: float
    url: str = ""
    """Its app's address on its node."""
    pid: int = 0
    stats_age_s: float = 0.0

    @property
    def free(self) -> int:
        """Sessions it can still take, by what the router knows."""
        return max(0, self.max_sessions - self.sessions - self.placing)

    def describe(self) -> dict[str, Any]:
        return {"replica": self.key, "ready": self.ready, "sessions": self.sessions, "free": self.free,
                "pid": self.pid, "stats_age_s": round(self.stats_age_s, 3)}


def live_replicas(app_name: str, deployment: str) -> list[ReplicaView] | None:
    """The replicas this process routes to; None before its first call made its router."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    return None if router is None else [router.view(r) for r in router.curr_replicas.values()]


def draining_replicas(app_name: str, deployment: str) -> dict[str, ReplicaView]:
    """Replicas that left the routing view (draining, or dead), by route key, as last seen."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    return {} if router is None else dict(router.departed)


def forget_replica(app_name: str, deployment: str, key: str) -> None:
    """A departed replica that no longer answers (it ended)."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    if router is not None:
        router.departed.pop(key, None)


class SessionRouter(RequestRouter):
    """Session calls to their replica; new sessions to the most free room (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened: defaultdict[ReplicaID, deque[float]] = defaultdict(lambda: deque(maxlen=256))
        self.departed: OrderedDict[str, ReplicaView] = OrderedDict()
        # Serve may ship this class by value (with a copy of this module's globals): register in
        # the module the gateway imported
        registry = importlib.import_module(__name__)._ROUTERS
        registry[f"{self._deployment_id.app_name}#{self._deployment_id.name}"] = self

    def view(self, replica: RunningReplica) -> ReplicaView:
        stats = replica.routing_stats or {}
        taken = float(stats.get("at", 0.0)) - IN_FLIGHT_S
        recent = sum(1 for t in self._opened.get(replica.replica_id, ()) if t > taken)
        at = float(stats.get("at", 0.0))
        return ReplicaView(replica.replica_id.unique_id, int(stats.get("sessions", 0)), recent,
                           int(stats.get("max_sessions", 0)), bool(stats.get("ready", False)),
                           float(stats.get("started", 0.0)), str(stats.get("url", "")), int(stats.get("pid", 0)),
                           time.time() - at if at else 0.0)  # fmt: skip

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new set of replicas to route to; those that left it are remembered (module docstring)."""
        staying = {r.replica_id for r in replicas}
        for replica_id, replica in self.curr_replicas.items():
            view = self.view(replica)
            if replica_id not in staying and view.url:
                self.departed[view.key] = view
                while len(self.departed) > REMEMBERED:
                    self.departed.popitem(last=False)
        for replica in replicas:
            self.departed.pop(replica.replica_id.unique_id, None)
        super().update_replicas(replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        route = kwargs.get("route")
        if route is not None:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == route]
            return [pinned or candidate_replicas]
        exclude = set(kwargs.get("exclude", ()))
        views = [(self.view(r), r) for r in candidate_replicas if r.replica_id.unique_id not in exclude]
        if not views:
            return [candidate_replicas]
        # a replica whose first stats have not come yet is taken to be as large as the others, and empty
        largest = max((v.max_sessions for v, _ in views), default=0) or 1
        views = [(v if v.max_sessions else dataclasses.replace(v, max_sessions=largest), r) for v, r in views]
        views.sort(key=lambda vr: (-vr[0].free, vr[0].sessions + vr[0].placing))
        ranks: list[list[RunningReplica]] = []
        last: tuple[int, int] | None = None
        for view, replica in views:
            if (view.free, view.sessions + view.placing) != last:
                ranks.append([])
                last = (view.free, view.sessions + view.placing)
            ranks[-1].append(replica)
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        call = pending_request.args[0] if pending_request.args else None
        if getattr(call, "opens_session", False):
            self._opened[replica_id].append(time.time())
