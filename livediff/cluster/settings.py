"""`livediff serve --cluster`: how many replicas, what each reserves, how they scale and drain."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from livediff.errors import ConfigError

LOCAL = "local"
"""`--cluster` without an address: start a one-machine Ray here."""


@dataclass(frozen=True)
class ClusterSettings:
    """The Serve application's shape. Engine and server settings stay in their own dataclasses and
    are passed to every replica as they are."""

    address: str = LOCAL
    """`local` (a Ray started here), `auto` (the cluster this machine belongs to, or $RAY_ADDRESS),
    or a Ray address (`HOST:6379`, `ray://HOST:10001`)."""
    min_replicas: int = 1
    """Replicas kept when no session runs."""
    max_replicas: int = 0
    """Most replicas; 0: one per GPU of the cluster, and 1 on a cluster without GPUs (set it to the
    number of CPU workers there)."""
    target_sessions: float = 0.0
    """Sessions per replica above which the autoscaler adds a replica; 0: three quarters of
    `--max-sessions` (at least 1), so a new replica loads its model before the others are full."""
    replica_gpus: float = -1.0
    """GPUs each replica reserves; -1: 1 when the engine runs on CUDA, else 0."""
    replica_cpus: float = 1.0
    """CPU cores each replica reserves (on a CPU cluster: the engine's torch threads too)."""
    drain_timeout_s: float = 3600.0
    """A replica the autoscaler stops keeps its sessions streaming up to this long, then ends them."""
    stats_period_s: float = 1.0
    """How often each replica tells the entry points its sessions and free room."""
    call_timeout_s: float = 60.0
    """A signalling request that gets no answer from a replica this long is answered 503."""
    app_name: str = "livediff"
    """The Serve application's name (one cluster can run several)."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= 4096:
            raise ConfigError(f"min_replicas must be in 0..4096, got {self.min_replicas}")
        if not 0 <= self.max_replicas <= 4096:
            raise ConfigError(f"max_replicas must be in 0..4096, got {self.max_replicas}")
        if self.max_replicas and self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if not 0 <= self.target_sessions <= 1024:
            raise ConfigError(f"target_sessions must be in [0, 1024], got {self.target_sessions}")
        if self.replica_gpus != -1.0 and not 0 <= self.replica_gpus <= 64:
            raise ConfigError(f"replica_gpus must be -1 (auto) or in [0, 64], got {self.replica_gpus}")
        if not 0 < self.replica_cpus <= 1024:
            raise ConfigError(f"replica_cpus must be in (0, 1024], got {self.replica_cpus}")
        if not 1 <= self.drain_timeout_s <= 7 * 86400:
            raise ConfigError(f"drain_timeout_s must be in [1, 604800], got {self.drain_timeout_s}")
        if not 0.1 <= self.stats_period_s <= 60:
            raise ConfigError(f"stats_period_s must be in [0.1, 60], got {self.stats_period_s}")
        if not 1 <= self.call_timeout_s <= 600:
            raise ConfigError(f"call_timeout_s must be in [1, 600], got {self.call_timeout_s}")

    def target(self, max_sessions: int) -> float:
        """Sessions per replica the autoscaler aims at."""
        return self.target_sessions or max(1.0, math.floor(0.75 * max_sessions))

    def replace(self, **changes: Any) -> ClusterSettings:
        return dataclasses.replace(self, **changes)
