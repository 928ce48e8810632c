"""The cluster end to end: a local Ray cluster (a head and two worker nodes), Ray Serve, the tiny model.

Each worker node's replicas gather ICE candidates on the node's own loopback address (127.0.0.2,
127.0.0.3; `LIVEDIFF_ICE_ADDRESSES` set on the node), and the clients here on 127.0.0.1: a
session's media can only flow to the node whose address its answer carries, so frames coming
back prove media goes straight to the replica that holds the session, never through the entry
point. One Ray cluster serves both tests (starting one costs ~15 s, a replica ~10-20 s here);
each deploys the application afresh (a second `serve.run` of it would replace every replica).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.tools import import_or_skip

ray = import_or_skip("ray", "pip install 'livediff[cluster]'")
serve = import_or_skip("ray.serve", "pip install 'livediff[cluster]'")

from livediff.cluster.replica import ICE_ADDRESSES_ENV  # noqa: E402
from livediff.cluster.run import deploy, end_sessions  # noqa: E402
from livediff.cluster.settings import ClusterSettings  # noqa: E402
from livediff.config import EngineSettings, ServerSettings, StreamParams  # noqa: E402
from livediff.transport.loopback import free_port  # noqa: E402
from tests.server_fixtures import Client, frames_back, offer_client, whep_view, whip_publish  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.usefixtures("loopback_ice")]

NODES = ("127.0.0.2", "127.0.0.3")
APP = ClusterSettings().app_name
MAX_SESSIONS = 3


class Deployed:
    """The cluster's entry point, and how to (re)deploy the application behind it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def deploy(self, **cluster: Any) -> None:
        engine = EngineSettings(model="tiny", height=64, width=64, backend="torch", device="cpu")
        server = ServerSettings(host="127.0.0.1", port=self.port, max_sessions=MAX_SESSIONS, cpu_threads=1,
                                max_body_bytes=32 * 1024)  # fmt: skip
        deploy(engine, server, StreamParams(), ClusterSettings(stats_period_s=0.5, **cluster), "HeadOnly")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Deployed]:
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    deployed = None
    try:
        for address in NODES:  # one CPU each: one replica per worker node
            local.add_node(num_cpus=1, env_vars={ICE_ADDRESSES_ENV: address})
        ray.init(address=local.address, log_to_driver=False)
        deployed = Deployed(free_port())
        deployed.deploy(min_replicas=2, max_replicas=2)
        yield deployed
    finally:
        if deployed is not None:
            asyncio.run(end_sessions(deployed.url, ""))  # else the replicas drain them first
        serve.shutdown()
        ray.shutdown()
        local.shutdown()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def sessions_by_replica(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    """Session id -> its entry in the entry point's GET /api/sessions (with `replica`)."""
    status, body = await get(http, url + "/api/sessions")
    assert status == 200, body
    return {s["id"]: s for s in body["sessions"]}


async def ready_replicas(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    status, body = await get(http, url + "/readyz")
    return [r for r in body.get("each", []) if r["ready"]] if status == 200 else []


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.5)


def answer_addresses(client: Client) -> set[str]:
    """The host addresses in the answer's ICE candidates: where the client sends its media."""
    sdp = client.pc.remoteDescription.sdp
    return {m.group(1) for m in re.finditer(r"a=candidate:\S+ \d+ udp \d+ (\S+) \d+ typ host", sdp)}


async def still_streaming(client: Client, frames: int = 5) -> bool:
    assert client.received is not None
    before = len(client.received.times)
    await client.received.wait_for(before + frames, timeout=20)
    return True


async def test_sessions_placed_kept_and_failed_over(cluster: Deployed, http: aiohttp.ClientSession) -> None:
    url = cluster.url
    # 4 sessions split 2/2, each one's media on its own replica's node
    clients = [await offer_client(http, url) for _ in range(4)]
    for client in clients:
        await frames_back(client, 3)
    listing = await sessions_by_replica(http, url)
    replica_of = {c.session_id: listing[c.session_id]["replica"] for c in clients}
    assert sorted(Counter(replica_of.values()).values()) == [2, 2], replica_of
    node_of: dict[str, set[str]] = {}
    for client in clients:
        addresses = answer_addresses(client)
        assert len(addresses) == 1 and addresses <= set(NODES), addresses
        node_of.setdefault(replica_of[client.session_id], set()).update(addresses)
    assert all(len(a) == 1 for a in node_of.values()) and len(set.union(*node_of.values())) == 2, node_of

    # PATCH, DELETE and a WHEP viewer of a session reach its replica, through the one entry point
    publisher = await whip_publish(http, url, sendrecv=True)
    await frames_back(publisher, 3)
    listing = await sessions_by_replica(http, url)
    whip_replica = listing[publisher.session_id]["replica"]
    assert publisher.session_id.startswith(whip_replica + "-")
    candidate = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
    async with http.patch(
        url + publisher.location,
        data=candidate,
        headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": publisher.etag},
    ) as r:
        assert r.status == 204, await r.text()  # any other replica would not know the resource: 404
    watched = clients[0].session_id
    async with http.patch(f"{url}/api/sessions/{watched}", json={"prompt": "a charcoal sketch"}) as response:
        assert response.status == 200, await response.text()
    viewer = await whep_view(http, url, watched)
    await frames_back(viewer, 3)
    listing = await sessions_by_replica(http, url)
    assert listing[watched]["replica"] == replica_of[watched]
    assert listing[watched]["viewers"] == 1 and listing[watched]["params"]["prompt"] == "a charcoal sketch"
    async with http.delete(url + viewer.location) as response:
        assert response.status == 200, await response.text()
    # a viewer naming no session watches the newest live one, wherever it runs (the WHIP publisher's)
    any_viewer = await whep_view(http, url)
    assert any_viewer.location.startswith(f"/whep/{publisher.session_id}/"), any_viewer.location
    await frames_back(any_viewer, 3)
    await any_viewer.close()
    async with http.delete(url + publisher.location) as response:
        assert response.status == 200, await response.text()
    assert publisher.session_id not in await sessions_by_replica(http, url)
    assert (await get(http, f"{url}/api/sessions/{publisher.session_id}"))[0] == 404
    await viewer.close()
    await publisher.close()

    # metrics of every replica from one scrape, with the sessions per replica
    async def scraped() -> list[str]:
        async with http.get(url + "/metrics") as response:
            lines = (await response.text()).splitlines()
        wanted = [
            f'{name}{{replica="{key}"}} 2.0'
            for key in set(replica_of.values())
            for name in ("livediff_sessions", "livediff_replica_sessions")
        ]
        return lines if all(line in lines for line in wanted) and "livediff_replicas 2.0" in lines else []

    await eventually(scraped, 10, "both replicas' sessions in one scrape")

    # a full cluster answers 503 with Retry-After, as a full server does
    extra = [await offer_client(http, url) for _ in range(2 * MAX_SESSIONS - 4)]
    async with http.post(url + "/offer", json={"sdp": extra[0].pc.localDescription.sdp, "type": "offer"}) as response:
        assert response.status == 503 and "error" in await response.json()
        assert int(response.headers["Retry-After"]) > 0
    for client in extra:
        async with http.delete(f"{url}/api/sessions/{client.session_id}") as response:
            assert response.status == 200
        await client.close()

    # kill one replica's process: its sessions answer 404, the other's keep streaming
    killed = replica_of[clients[0].session_id]
    pid = next(r["pid"] for r in await ready_replicas(http, url) if r["replica"] == killed)
    with open(f"/proc/{pid}/environ", "rb") as environ:  # no phoning home from the replicas either
        assert b"RAY_USAGE_STATS_ENABLED=0" in environ.read().split(b"\0")
    os.kill(pid, signal.SIGKILL)
    gone = [c for c in clients if replica_of[c.session_id] == killed]
    kept = [c for c in clients if replica_of[c.session_id] != killed]
    for client in gone:

        async def answers_404(client: Client = client) -> bool:
            return (await get(http, f"{url}/api/sessions/{client.session_id}"))[0] == 404

        await eventually(answers_404, 30, f"{client.session_id} answers 404 once its replica died")
    for client in kept:
        assert await still_streaming(client)
        assert (await get(http, f"{url}/api/sessions/{client.session_id}"))[0] == 200

    # Ray restarts it; it takes sessions once its engine is warm (and has the most free room)
    async def restarted() -> list[dict[str, Any]]:
        ready = await ready_replicas(http, url)
        return [r for r in ready if r["replica"] not in replica_of.values()] if len(ready) == 2 else []

    fresh = (await eventually(restarted, 90, "a new replica replaces the killed one"))[0]["replica"]
    late = await offer_client(http, url)
    await frames_back(late, 3)
    assert (await sessions_by_replica(http, url))[late.session_id]["replica"] == fresh
    for client in kept:
        assert await still_streaming(client)

    # the application is taken down while sessions are live: each replica drains, its streams go on
    serve.delete(APP, _blocking=False)
    await asyncio.sleep(3)  # Serve is stopping the replicas
    for client in [*kept, late]:
        assert await still_streaming(client)
    for client in [*clients, late]:
        await client.close()  # each session ends with its peer; then its replica ends

    async def deleted() -> bool:
        return APP not in serve.status().applications

    await eventually(deleted, 60, "the replicas end once their sessions have")


async def test_autoscaling_on_sessions(cluster: Deployed, http: aiohttp.ClientSession) -> None:
    url = cluster.url
    # target 2 sessions per replica, 1 to 2 replicas
    await asyncio.to_thread(cluster.deploy, min_replicas=1, max_replicas=2, target_sessions=2)

    async def replicas(count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            status, body = await get(http, url + "/readyz")
            return bool(status == 200 and body["replicas"]["total"] == count and body["replicas"]["ready"] == count)

        return check

    await eventually(await replicas(1), 30, "one replica to start with")
    first = [await offer_client(http, url) for _ in range(3)]  # 3 sessions > target 2: a second replica
    for client in first:
        await frames_back(client, 3)
    await eventually(await replicas(2), 90, "3 sessions: two replicas")
    extra = await offer_client(http, url)  # to the new replica: the most free room
    await frames_back(extra, 3)
    listing = await sessions_by_replica(http, url)
    old = {listing[c.session_id]["replica"] for c in first}
    assert len(old) == 1 and listing[extra.session_id]["replica"] not in old, listing

    # 2 sessions left, one per replica: the target alone says 1 replica, but both hold a session
    for client in first[:2]:
        async with http.delete(f"{url}/api/sessions/{client.session_id}") as response:
            assert response.status == 200
        await client.close()
    held_until = time.monotonic() + 15  # longer than the autoscaler's look-back and down-scale delay
    while time.monotonic() < held_until:
        assert await (await replicas(2))(), "a replica holding a live session was scaled down"
        await asyncio.sleep(1)

    # the extra replica's session ends: back to one replica; the other session never stopped
    async with http.delete(f"{url}/api/sessions/{extra.session_id}") as response:
        assert response.status == 200
    await extra.close()
    await eventually(await replicas(1), 60, "back to one replica")
    survivor = first[2]
    kept = (await ready_replicas(http, url))[0]["replica"]
    # Serve picks the replica it stops; had it picked the survivor's, that one drains (module docstring)
    drains = kept != listing[survivor.session_id]["replica"]
    print(f"scaled down: the survivor's replica {'drains' if drains else 'was kept'}")
    assert await still_streaming(survivor)
    async with http.patch(f"{url}/api/sessions/{survivor.session_id}", json={"strength": 0.4}) as response:
        assert response.status == 200, await response.text()
    async with http.delete(f"{url}/api/sessions/{survivor.session_id}") as response:
        assert response.status == 200
    await survivor.close()
