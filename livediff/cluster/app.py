"""The Serve application: `Gateway` (ingress) bound to the `EngineReplica` deployment.

`build` is what `livediff serve --cluster` deploys; `build_app` is the same for a Serve config
file or a KubeRay RayService (`import_path: livediff.cluster.app:build_app`, `args:` the flags by
their long names, e.g. `{"model": "stabilityai/sd-turbo", "max_sessions": 4, "replica_gpus": 1}`;
jobs with `"jobs_db": "postgresql://..."`).
Every Serve option livediff relies on is set here, in one place.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from livediff.cluster.gateway import ENGINE, Gateway
from livediff.cluster.replica import EngineReplica
from livediff.cluster.settings import ClusterSettings
from livediff.config import LIVE_SIZE, EngineSettings, ServerSettings, StreamParams
from livediff.errors import ConfigError
from livediff.jobs.settings import JobSettings

LOOK_BACK_S = 10.0
"""Autoscaling window: a replica counts as holding sessions if it held one in the last 10 s."""
METRICS_S = 1.0
"""Each replica reports its sessions to Serve's autoscaler this often."""
HEALTH_CHECK_S = 2.0
"""Serve checks each replica this often (a dead replica is noticed and replaced within ~2 s)."""


def autoscaling(cluster: ClusterSettings, max_sessions: int, max_replicas: int) -> AutoscalingConfig:
    """Serve's autoscaler on `autoscale.sessions_policy`. Replicas report their sessions every
    `METRICS_S` (Serve's default, 10 s, would delay a scale-up by as much; its replacement, an
    environment variable read when the replica process starts, cannot be set per application)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        return _autoscaling(cluster, max_sessions, max_replicas)


def _autoscaling(cluster: ClusterSettings, max_sessions: int, max_replicas: int) -> AutoscalingConfig:
    return AutoscalingConfig(
        min_replicas=cluster.min_replicas, max_replicas=max_replicas,
        target_ongoing_requests=cluster.target(max_sessions),
        metrics_interval_s=METRICS_S, look_back_period_s=LOOK_BACK_S,
        aggregation_function="max", upscale_delay_s=1.0, downscale_delay_s=LOOK_BACK_S,
        policy=AutoscalingPolicy(policy_function="livediff.cluster.autoscale:sessions_policy"),
    )  # fmt: skip


def build(
    engine: EngineSettings,
    server: ServerSettings,
    params: StreamParams,
    cluster: ClusterSettings,
    max_replicas: int,
    replica_gpus: float,
    jobs: JobSettings | None = None,
) -> serve.Application:
    """The application for `max_replicas` (resolved: >= 1) replicas reserving `replica_gpus` each; with
    `jobs` (a PostgreSQL store), every replica serves jobs on that store (`livediff.cluster.jobs`)."""
    router = RequestRouterConfig(
        request_router_class="livediff.cluster.routing:SessionRouter",  # type: ignore[arg-type]
        # Ray Serve 2.60's stubs type it as a dict; the config takes seconds (a float)
        request_routing_stats_period_s=cluster.stats_period_s,  # type: ignore[arg-type]
    )
    replicas = serve.deployment(
        name=ENGINE,
        autoscaling_config=autoscaling(cluster, server.max_sessions, max_replicas),
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": replica_gpus},
        # signalling calls, never sessions: a session is state in the replica, not a call
        max_ongoing_requests=64 + server.max_sessions * (1 + server.max_viewers),
        max_queued_requests=-1,
        health_check_period_s=HEALTH_CHECK_S, health_check_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=1.0, graceful_shutdown_timeout_s=cluster.drain_timeout_s + 30.0,
        request_router_config=router,
    )(EngineReplica)  # fmt: skip
    gateway = serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)(Gateway)
    server = server.replace(cpu_threads=server.cpu_threads or max(1, int(cluster.replica_cpus)))
    # replicas run in Ray's worker folders: a relative engine cache would be built anew in each
    engine = engine.replace(engines_dir=engine.engines_dir.resolve())
    if jobs is not None:
        server, jobs = shared_jobs(server, jobs)
    return gateway.bind(
        replicas.bind(engine, server, params, cluster.drain_timeout_s, jobs),
        cluster.app_name,
        server.max_body_bytes,
        cluster.call_timeout_s,
        jobs is not None,
    )


def shared_jobs(server: ServerSettings, jobs: JobSettings) -> tuple[ServerSettings, JobSettings]:
    """What every replica needs to share the jobs: the state and storage folders as absolute paths (replicas
    run in Ray's worker folders), and one webhook secret (given, or made here once and kept in the state
    folder) so that every replica signs with it. `ConfigError` when the store is not PostgreSQL."""
    from livediff.jobs.webhooks import load_secret
    from livediff.server.tls import default_state_dir

    if not jobs.db:
        raise ConfigError("jobs in a cluster need a store every replica shares: --jobs-db postgresql://...")
    state_dir = (server.state_dir or default_state_dir()).resolve()
    storage = jobs.storage.resolve() if jobs.storage is not None else None
    secret = load_secret(state_dir, jobs.webhook_secret)
    return server.replace(state_dir=state_dir), jobs.replace(storage=storage, webhook_secret=secret)


def build_app(args: dict[str, Any]) -> serve.Application:
    """For Serve config files and KubeRay: `args` holds `livediff serve` flags by their long names
    (`max_sessions`, `model`, `min_replicas`, ...); the rest take their defaults."""
    from livediff.cli import build_parser, cluster_settings, engine_settings, server_settings, stream_params
    from livediff.jobs.flags import jobs_settings

    args = dict(args)
    if str(args.get("device", "auto")).startswith("cuda") and str(args.get("size", "auto")) == "auto":
        args["size"] = LIVE_SIZE["cuda"]  # the builder (Serve's controller, on the head) may have no GPU
    argv = ["serve", "--cluster", "auto"]
    for name, value in args.items():
        flag = "--" + str(name).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    parsed: argparse.Namespace = build_parser().parse_args(argv)
    engine = engine_settings(parsed, backend=parsed.backend)
    cluster = cluster_settings(parsed)
    import ray

    # a cluster that adds GPU nodes on demand may show none yet: no check against what is there now
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    wants_cuda = engine.device.startswith("cuda") or cluster_gpus > 0
    gpus = cluster.replica_gpus if cluster.replica_gpus >= 0 else float(wants_cuda)
    most = cluster.max_replicas or max(1, cluster.min_replicas, int(cluster_gpus // gpus) if gpus else 1)
    jobs = jobs_settings(parsed) if parsed.jobs_db else None
    return build(engine, server_settings(parsed), stream_params(parsed), cluster, most, gpus, jobs)
