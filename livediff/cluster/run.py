"""`livediff serve --cluster [ADDRESS]`: deploy the Serve application, print the URL, serve until
SIGINT/SIGTERM, then end every session and take the application down.

Ray's usage reporting is off unless the operator turned it on: `import livediff` sets
`RAY_USAGE_STATS_ENABLED=0` where unset (`livediff.telemetry`), which a Ray started here (`local`)
and its workers inherit. A cluster started elsewhere decides at its own `ray start`: start it with
`RAY_USAGE_STATS_ENABLED=0` (the KubeRay manifest in deploy/ does).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from typing import Any

import aiohttp

from livediff.cluster.settings import LOCAL, ClusterSettings
from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.errors import ConfigError
from livediff.jobs.settings import JobSettings

READY_POLL_S = 0.5


def replica_shape(cluster: ClusterSettings, engine: EngineSettings, cluster_gpus: float) -> tuple[int, float]:
    """(max replicas, GPUs per replica) for a cluster with `cluster_gpus` GPUs in all.

    Raises ConfigError when the engine asks for CUDA and the cluster has no GPU.
    """
    wants_cuda = engine.device.startswith("cuda") or (engine.device == "auto" and cluster_gpus > 0)
    gpus = cluster.replica_gpus if cluster.replica_gpus >= 0 else (1.0 if wants_cuda else 0.0)
    if engine.device.startswith("cuda") and gpus and cluster_gpus < gpus:
        raise ConfigError(
            f"--device {engine.device}: the Ray cluster has {cluster_gpus:g} GPUs, a replica needs "
            f"{gpus:g} (--replica-gpus); use --device cpu for CPU replicas"
        )
    most = cluster.max_replicas or (int(cluster_gpus // gpus) if gpus else 1)
    return max(most, 1, cluster.min_replicas), gpus


def start_ray(cluster: ClusterSettings) -> None:
    import ray

    if cluster.address == LOCAL:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)


def deploy(
    engine: EngineSettings,
    server: ServerSettings,
    params: StreamParams,
    cluster: ClusterSettings,
    proxy_location: str = "EveryNode",
    jobs: JobSettings | None = None,
) -> int:
    """Start Serve's HTTP proxy on `server.host`/`server.port` and deploy the application (returns once
    every replica's engine is warm), with `jobs` on a shared PostgreSQL store when given. Ray must be
    initialised. -> the most replicas it may scale to."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from livediff.cluster.app import build

    most, gpus = replica_shape(cluster, engine, float(ray.cluster_resources().get("GPU", 0)))
    options: dict[str, Any] = {"host": server.host, "port": server.port}
    if server.tls_cert is not None:
        options.update(ssl_certfile=str(server.tls_cert), ssl_keyfile=str(server.tls_key))
    serve.start(proxy_location=proxy_location, http_options=HTTPOptions(**options))
    app = build(engine, server, params, cluster, most, gpus, jobs)
    serve.run(app, name=cluster.app_name, route_prefix="/")
    return most


async def end_sessions(url: str, token: str) -> int:
    """DELETE every session through the entry point (what SIGTERM does to a single server's peers)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own entry point
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=context)) as http:
        async with http.get(url + "/api/sessions") as response:
            if response.status != 200:
                return 0
            sessions = (await response.json())["sessions"]
        for session in sessions:
            async with http.delete(f"{url}/api/sessions/{session['id']}"):
                pass
    return len(sessions)


async def _describe(url: str) -> dict[str, Any]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        while True:
            async with http.get(url + "/readyz") as response:
                if response.status == 200:
                    return dict(await response.json())
            await asyncio.sleep(READY_POLL_S)


def serve_cluster(
    engine: EngineSettings,
    server: ServerSettings,
    params: StreamParams,
    cluster: ClusterSettings,
    started: float | None = None,
    jobs: JobSettings | None = None,
) -> int:
    """Run until SIGINT/SIGTERM; 0 after a clean stop. `jobs`: the replicas serve jobs on that shared store."""
    import ray
    from ray import serve

    from livediff.server import tls
    from livediff.server.serve import print_ready, url

    started = time.monotonic() if started is None else started
    server, certificate = tls.prepare(server)
    print(
        f"livediff: starting Ray Serve ({'a local Ray' if cluster.address == LOCAL else cluster.address}); "
        "the URL follows once a replica is ready",
        flush=True,
    )
    start_ray(cluster)
    address = url(server, server.port).rstrip("/")
    try:
        most = deploy(engine, server, params, cluster, "HeadOnly" if cluster.address == LOCAL else "EveryNode", jobs)
        if certificate is not None:
            print(tls.explain(certificate), flush=True)
        ready = asyncio.run(
            _describe(address.replace(server.host, "127.0.0.1") if server.host in ("0.0.0.0", "") else address)
        )
        print_ready(ready["engine"], address + "/", time.monotonic() - started)
        count = ready["replicas"]["ready"]
        print(
            f"livediff: {count} engine replica{'s' if count != 1 else ''} ready; Ray Serve keeps between "
            f"{cluster.min_replicas} and {most}, adding one above {cluster.target(server.max_sessions):g} sessions "
            "per replica",
            flush=True,
        )
        stop = _wait_for_signal()
        print(f"livediff: shutting down ({stop}): ending every session", flush=True)
        local = address.replace(server.host, "127.0.0.1") if server.host in ("0.0.0.0", "") else address
        asyncio.run(end_sessions(local, server.token))
    except KeyboardInterrupt:
        pass
    finally:
        if cluster.address == LOCAL:
            serve.shutdown()  # the application, the proxy and the controller; then Ray itself
        else:
            serve.delete(cluster.app_name)  # the cluster and Serve stay for whatever else runs there
        ray.shutdown()
    return 0


def _wait_for_signal() -> str:
    got: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        got.append(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not got:
        signal.pause() if sys.platform != "win32" else time.sleep(0.5)
    return got[0]
