"""`livediff bench --g2g --cluster N`: the cluster's entry point against a single server, one run.

Both targets run the same engine settings on this machine, one after the other, with loopback ICE:

* `livediff serve` in a process of its own (`livediff.g2g`'s server), then
* a local Ray with Ray Serve: the gateway and `N` engine replicas (`livediff serve --cluster`'s
  application, `N` fixed), reached through Serve's HTTP proxy.

For each: session set-up, `setups` sessions one after the other (`answer_ms`: POST /offer to its
answer; `first_frame_ms`: POST /offer to the first transformed frame decoded by the client), then
the glass-to-glass cases of `livediff bench --g2g` (`g2g.py`) on a fresh session each. For the
cluster, last, `burst` sessions offered at once and how many each replica got.
The entry point carries signalling only, so glass-to-glass should not move and set-up should grow
by the gateway's hops (HTTP proxy -> gateway -> replica, each a Ray call).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from livediff import g2g
from livediff.bench import percentiles
from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.engine.device import resolve_device
from livediff.models import resolve_auto
from livediff.synthetic import SyntheticCamera
from livediff.transport.client import CameraTrack, offer_client
from livediff.transport.loopback import free_port, loopback_candidates


async def setup_times(
    http: aiohttp.ClientSession, url: str, count: int, params: dict[str, Any], width: int, height: int
) -> dict[str, Any]:
    """`count` sessions one after the other: ms from POST /offer to the answer and to the first frame back."""
    answers, firsts = [], []
    for _ in range(count):
        started = time.monotonic()
        client = await offer_client(http, url, CameraTrack(width, height), params=params)
        answers.append((time.monotonic() - started) * 1000.0)
        try:
            assert client.received is not None
            await client.received.wait_for(1, timeout=g2g.FIRST_FRAME_S)
            firsts.append((client.received.times[0] - started) * 1000.0)
        finally:
            await client.close()
    return {"sessions": count, "answer_ms": percentiles(answers), "first_frame_ms": percentiles(firsts)}


async def burst_placement(http: aiohttp.ClientSession, url: str, count: int, width: int, height: int) -> dict[str, int]:
    """`count` sessions offered at once through the entry point -> sessions per replica."""
    clients = await asyncio.gather(
        *(offer_client(http, url, CameraTrack(width, height), params={"passthrough": True}) for _ in range(count))
    )
    try:
        async with http.get(url + "/api/sessions") as response:
            sessions = (await response.json())["sessions"]
        ids = {c.session_id for c in clients}
        return dict(Counter(s["replica"] for s in sessions if s["id"] in ids))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


@asynccontextmanager
async def _cluster(
    http: aiohttp.ClientSession, engine: EngineSettings, server: ServerSettings, params: StreamParams, replicas: int
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A local Ray with the cluster application, `replicas` fixed, one core each (as the single
    server's engine gets: cores - 1 threads, 1 here)."""
    import ray
    from ray import serve

    from livediff.cluster.run import deploy
    from livediff.cluster.settings import ClusterSettings

    port = free_port()
    ray.init(
        num_cpus=max(replicas, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        cluster = ClusterSettings(min_replicas=replicas, max_replicas=replicas, replica_cpus=1)
        await asyncio.to_thread(
            deploy, engine, server.replace(host="127.0.0.1", port=port, ice_loopback=True), params, cluster, "HeadOnly"
        )
        url = f"http://127.0.0.1:{port}"
        async with http.get(url + "/readyz") as response:
            yield url, (await response.json())["engine"]
    finally:
        serve.shutdown()
        ray.shutdown()


async def run_cluster_bench(
    engine: EngineSettings,
    plan: g2g.G2GPlan,
    server: ServerSettings | None = None,
    replicas: int = 2,
    setups: int = 5,
    burst: int = 8,
) -> dict[str, Any]:
    """Single server, then the cluster; see the module docstring. -> a JSON-able report."""
    engine = engine.replace(model=resolve_auto(engine.model, resolve_device(engine.device)))
    server = (server or ServerSettings()).replace(video_codecs=(plan.codec,),
                                                  max_sessions=max(1, -(-burst // replicas)))  # fmt: skip
    scene = await asyncio.to_thread(
        SyntheticCamera(engine.height, engine.width).frames, max(1, round(g2g.SCENE_SECONDS * plan.fps))
    )
    model_params = {"prompt": plan.params.prompt, "steps": plan.params.steps, "strength": plan.params.strength}
    report: dict[str, Any] = {
        "size": f"{engine.width}x{engine.height}",
        "fps": plan.fps,
        "codec": plan.codec,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "targets": {},
    }
    with loopback_candidates():
        async with aiohttp.ClientSession() as http:
            targets = (
                ("single server", g2g._server(http, engine, server)),
                (f"cluster ({replicas} replicas)", _cluster(http, engine, server, plan.params, replicas)),
            )
            for name, target in targets:
                async with target as started:
                    url, described = started[0], started[1]
                    result: dict[str, Any] = {"engine": described}
                    result["setup"] = await setup_times(http, url, setups, model_params, engine.width, engine.height)
                    result["cases"] = []
                    for case in plan.cases:
                        run = await g2g._run_case(http, url, case, plan, engine.width, engine.height, scene)
                        result["cases"].append(g2g._case_report(case, run))
                    if name.startswith("cluster"):
                        result["burst"] = {
                            "sessions": burst,
                            "per_replica": await burst_placement(http, url, burst, engine.width, engine.height),
                        }
                    report["targets"][name] = result
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


def format_cluster_bench(report: dict[str, Any]) -> str:
    lines = [
        f"cluster vs single server: {report['size']} at {report['fps']:g} fps, {report['codec']}, load average "
        f"{report['load_average_before'][0]:.2f} -> {report['load_average_after'][0]:.2f}",
        "",
        f"{'target':<24}{'answer p50':>11}{'1st frame p50':>14}  glass-to-glass p50 / p95 per case (ms; the "
        "model's own p50)",
    ]
    for name, result in report["targets"].items():
        setup = result["setup"]
        cases = "  ".join(
            f"{c['case']} {c['g2g_ms']['p50']:.1f} / {c['g2g_ms']['p95']:.1f}"
            + (f" (model {c['model_ms']['p50']:.1f})" if c["model_ms"] else "")
            for c in result["cases"]
        )
        lines.append(f"{name:<24}{setup['answer_ms']['p50']:>11.1f}{setup['first_frame_ms']['p50']:>14.1f}  {cases}")
    for name, result in report["targets"].items():
        if "burst" in result:
            burst = result["burst"]
            lines.append(
                f"{name}: {burst['sessions']} sessions offered at once -> per replica "
                f"{sorted(burst['per_replica'].values(), reverse=True)}"
            )
    return "\n".join(lines)
