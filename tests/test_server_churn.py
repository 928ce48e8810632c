"""Lifecycle under churn and overload: nothing leaks, nothing queues."""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time

import pytest
from aiortc import RTCPeerConnection

from tests.server_fixtures import CameraTrack, metric_value, offer_client, running_server, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(240)]


def live_peers() -> int:
    """Peer connections alive in this process (other tests' servers, e.g. the page tests', included)."""
    gc.collect()
    return sum(type(o) is RTCPeerConnection for o in gc.get_objects())


async def settle(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def test_churn_leaves_no_tasks_peers_or_threads(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        sessions = server.service.scheduler.sessions

        async def cycle(i: int) -> None:
            if i % 2:
                client = await whip_publish(http, server.url, CameraTrack(fps=30), audio=i % 4 == 1)
                await client.wait_connected()
                async with http.delete(server.url + client.location) as response:
                    assert response.status == 200
            else:
                client = await offer_client(http, server.url, CameraTrack(fps=30))
                await client.wait_connected()
            await client.close()

        await cycle(0)
        await cycle(1)  # warm: executor threads and codec contexts exist now
        await settle(lambda: not sessions)
        await asyncio.sleep(0.5)
        tasks_before = len(asyncio.all_tasks())
        threads_before = threading.active_count()
        peers_before = live_peers()
        for i in range(30):
            await cycle(i)
        await settle(lambda: not sessions)
        await settle(lambda: len(asyncio.all_tasks()) <= tasks_before, timeout=15)
        assert not sessions
        assert not server.service.resources and not server.service.outputs
        assert len(asyncio.all_tasks()) <= tasks_before, [t.get_name() for t in asyncio.all_tasks()]
        await settle(lambda: threading.active_count() <= threads_before + 1, timeout=15)
        assert threading.active_count() <= threads_before + 1, [t.name for t in threading.enumerate()]
        assert live_peers() <= peers_before  # 30 cycles made 30 server and 30 client peers
        assert await metric_value(http, server.url, "livediff_sessions") == 0


async def test_overload_frame_age_stays_bounded(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=128) as server:
        client = await offer_client(http, server.url, CameraTrack(width=128, height=128, fps=60))
        await client.wait_connected()
        session = server.service.scheduler.sessions[client.session_id]
        ages: list[float] = []
        for _ in range(60):  # 6 s
            await asyncio.sleep(0.1)
            if session.stats.sent:
                ages.append(session.stats.last_age_ms)
        first, second = ages[: len(ages) // 2], ages[len(ages) // 2 :]
        assert len(ages) > 20
        assert statistics.median(second) < statistics.median(first) * 2 + 150, (first, second)
        assert max(second) < 1500, second
        assert session.inbox.replaced > 0, "the camera outran the model but nothing was dropped"
        assert await metric_value(http, server.url, 'livediff_frames_total{outcome="dropped_in"}') > 0
        await client.close()
