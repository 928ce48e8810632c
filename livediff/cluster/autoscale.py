"""sessions_policy: Ray Serve's autoscaling on live sessions, never stopping a replica that holds one.

Each replica reports its sessions (`EngineReplica.record_autoscaling_stats`); Serve aggregates
them per replica over its look-back window with `max` (`app.AUTOSCALING`), so a session that just
ended still counts for the window, and calls this policy every control-loop tick:

    desired = ceil(total sessions / target sessions per replica), within [min, max replicas]

Scaling down is held to the replicas that are empty: from N replicas to at most N - (replicas
with no session in the window). Serve then picks which replica to stop (it prefers the newest,
away from the head node); a replica it stops drains (`EngineReplica.__del__`), so a stream is
never cut even when Serve's pick and ours differ. Serve's delays (`upscale_delay_s`,
`downscale_delay_s`) and the min/max bounds are applied around this function by Serve.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext

SESSIONS = "sessions"
"""The custom metric each replica reports."""


def desired_replicas(sessions: dict[Any, float], current: int, target: float) -> int:
    """The replica count for `sessions` (replica -> sessions in the window) with `current` running.

    Up to ceil(total / target); down only by as many replicas as hold no session. `target` > 0.
    """
    wanted = math.ceil(sum(sessions.values()) / target)
    if wanted >= current:
        return wanted
    empty = sum(1 for n in sessions.values() if n <= 0) + max(0, current - len(sessions))
    return max(wanted, current - empty)


def sessions_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Serve's custom-policy entry point (`AutoscalingPolicy(policy_function=...)`)."""
    target = float(getattr(ctx.config, "target_ongoing_requests", None) or 1.0)
    per_replica = (ctx.aggregated_metrics or {}).get(SESSIONS, {})
    sessions = {replica: per_replica.get(replica, 0.0) for replica in ctx.running_replicas}
    return desired_replicas(sessions, ctx.current_num_replicas, target), {}
