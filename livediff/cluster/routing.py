"""SessionRouter: which replica a signalling call goes to (a Ray Serve request router).

Runs inside every process that holds a handle to the engine replicas (the gateway's). It reads
the call's `route` keyword:

* a route key (the request names a session): the replica with that key, and only it. When no
  live replica has the key (its replica died, or is draining), any replica: it does not hold the
  session either and answers 404, as the single server does for an unknown session;
* none (a page, the ICE servers): any replica.

A new session is sent to the replica `choose_replica` picks (the most free room), named in `route`: the
gateway picks it from this router's view rather than letting the router rank replicas, because
Serve's router moves to a lower rank whenever the best replica's queue-length probe is slow (on
a busy machine: 3 of 4 sessions went to one replica), where a named replica is waited for.
Free room comes from each replica's `record_routing_stats` (its sessions, by id), read every
`stats_period_s`. Placing a burst of sessions on stats that old would put them all on one replica,
so the router also counts each session-opening call it sent until a snapshot shows its session, or
one taken after its answer does not (`note_opened`, `note_answered`, `OpeningCalls`). Each session
is counted once: a replica counting its calls under way beside its sessions, or the router counting
a call the snapshot already shows, made two replicas look alike when they were not, and CI saw four
sequential sessions split 3/1.

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
from collections import OrderedDict, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

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
    """Its sessions when its stats were taken."""
    placing: int
    """Session-opening calls routed to it that `sessions` may miss (see `OpeningCalls`)."""
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
        return {
            "replica": self.key,
            "ready": self.ready,
            "sessions": self.sessions,
            "free": self.free,
            "pid": self.pid,
            "stats_age_s": round(self.stats_age_s, 3),
        }


def live_replicas(app_name: str, deployment: str) -> list[ReplicaView] | None:
    """The replicas this process routes to; None before its first call made its router."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    return None if router is None else [router.view(r) for r in router.curr_replicas.values()]


def choose_replica(replicas: list[ReplicaView], exclude: tuple[str, ...] = ()) -> ReplicaView | None:
    """The replica a new session goes to: the most free room (`max_sessions` less sessions and
    sessions being placed), ties to the fewest sessions (more free batch slots). Replicas whose
    first stats have not come are taken to be as large as the others, and empty. None when
    every replica is in `exclude` (they answered 503) or there is none; a full replica may be
    returned (it answers 503 itself, with its Retry-After)."""
    largest = max((r.max_sessions for r in replicas), default=0) or 1
    known = [
        r if r.max_sessions else dataclasses.replace(r, max_sessions=largest) for r in replicas if r.key not in exclude
    ]
    return min(known, key=lambda r: (-r.free, r.sessions + r.placing, r.key), default=None)


@dataclass
class OpeningCall:
    """A session-opening call sent to a replica (times from `time.time()`, as the replicas' stats)."""

    sent: float
    answered: float | None = None
    """When its answer came back; None while it is on its way."""
    session: str = ""
    """The session its answer names ("" while on its way, or when the answer named none)."""


class OpeningCalls:
    """The session-opening calls sent to one replica that its stats may not show yet.

    A call counts from when it is sent until a stats snapshot lists its session, or a snapshot taken
    after its answer came back does not (the session ended, or the call failed on its way): such a
    snapshot is the truth, however long the answer took (seconds, on a loaded machine). While a call
    is on its way its session id is unknown, so a snapshot showing its session counts it a second time
    for that long: that only spreads a burst of calls made together. A call answered without a session
    (a refusal) stops counting at once.
    """

    LIMIT = 256
    """Calls kept at most (the oldest are forgotten: a replica that never sends stats again)."""

    def __init__(self) -> None:
        self._calls: list[OpeningCall] = []

    def sent(self, now: float) -> OpeningCall:
        call = OpeningCall(now)
        self._calls = [*self._calls[-(self.LIMIT - 1) :], call]
        return call

    def answered(self, call: OpeningCall, now: float, opened: bool, session: str = "") -> None:
        """`call`'s answer came back at `now`; `opened`: it may have made a session (`session`, when
        the answer names it)."""
        if opened:
            call.answered, call.session = now, session
        elif call in self._calls:
            self._calls.remove(call)

    def missing_from(self, stats_at: float, sessions: Collection[str] = ()) -> int:
        """Calls that stats taken at `stats_at` listing `sessions` do not show; forgets the others."""
        self._calls = [
            c for c in self._calls if c.answered is None or (c.answered >= stats_at and c.session not in sessions)
        ]
        return len(self._calls)


def note_opened(app_name: str, deployment: str, key: str) -> OpeningCall | None:
    """A session-opening call is being sent to replica `key` (counted as `OpeningCalls` says); hand
    what this returns to `note_answered` when its answer comes."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    return None if router is None else router.opened(key)


def note_answered(
    app_name: str, deployment: str, key: str, call: OpeningCall | None, opened: bool, session: str = ""
) -> None:
    """The answer to `call` (from `note_opened`) came back; `opened`: it may have made a session
    (`session`, when the answer names it)."""
    router = _ROUTERS.get(f"{app_name}#{deployment}")
    if router is not None and call is not None:
        router.answered(key, call, opened, session)


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
    """Each call to the replica its `route` names; to any when none does (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened: defaultdict[str, OpeningCalls] = defaultdict(OpeningCalls)
        self.departed: OrderedDict[str, ReplicaView] = OrderedDict()
        self._stats: dict[str, dict[str, Any]] = {}
        """The newest routing stats seen of each replica (`_newest_stats`)."""
        # Serve may ship this class by value (with a copy of this module's globals): register in
        # the module the gateway imported
        registry = importlib.import_module(__name__)._ROUTERS
        registry[f"{self._deployment_id.app_name}#{self._deployment_id.name}"] = self

    def view(self, replica: RunningReplica) -> ReplicaView:
        key = replica.replica_id.unique_id
        stats = self._newest_stats(key, replica.routing_stats or {})
        at = float(stats.get("at", 0.0))
        sessions = frozenset(stats.get("sessions", ()))
        placing = self._opened[key].missing_from(at, sessions) if key in self._opened else 0
        return ReplicaView(key, len(sessions), placing, int(stats.get("max_sessions", 0)),
                           bool(stats.get("ready", False)), float(stats.get("started", 0.0)),
                           str(stats.get("url", "")), int(stats.get("pid", 0)),
                           time.time() - at if at else 0.0)  # fmt: skip

    def _newest_stats(self, key: str, stats: dict[str, Any]) -> dict[str, Any]:
        """`stats`, or the newer ones seen before: Serve's updates may arrive out of order (a router
        listens on its own long-poll client until the process's shared one takes over), and an older
        snapshot, once the calls it misses were forgotten, would make the replica look emptier."""
        kept = self._stats.get(key)
        if kept is not None and float(kept.get("at", 0.0)) > float(stats.get("at", 0.0)):
            return kept
        self._stats[key] = stats
        return stats

    def opened(self, key: str) -> OpeningCall:
        """A session-opening call is being sent to replica `key` (counted until its stats show it)."""
        return self._opened[key].sent(time.time())

    def answered(self, key: str, call: OpeningCall, opened: bool, session: str = "") -> None:
        """`call`'s answer came back from replica `key`; `opened`: it may have made a session (`session`)."""
        self._opened[key].answered(call, time.time(), opened, session)

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
        live = {r.replica_id.unique_id for r in replicas}
        self._stats = {key: stats for key, stats in self._stats.items() if key in live}
        super().update_replicas(replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        pinned = [r for r in candidate_replicas if r.replica_id.unique_id == route]
        return [pinned or candidate_replicas]
