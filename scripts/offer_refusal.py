"""How long an offer with too many m-lines takes to be refused, and the event loop's longest stall
meanwhile (issue 23: a 120-m-line offer used to hold the loop 5 s, a 400-m-line one ~60 s).

    PYTHONPATH=. python scripts/offer_refusal.py

Starts the app in this process (`--model tiny --size 64`, `max_body_bytes` raised to 1 MiB so the
offers reach the check), posts each offer 20 times to POST /whip over loopback, and prints the
median and worst answer time and the longest gap between turns of the event loop.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
from aiohttp import web
from aiortc import RTCPeerConnection

from livediff.config import EngineSettings, ServerSettings
from livediff.models import load_model
from livediff.server import create_app
from livediff.server.common import SERVICE
from livediff.transport.client import CameraTrack
from livediff.transport.loopback import loopback_candidates


async def bundled_offer(video_lines: int) -> str:
    """An aiortc offer with `video_lines` video m-lines in one BUNDLE group."""
    pc = RTCPeerConnection()
    for _ in range(video_lines):
        pc.addTransceiver(CameraTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def main() -> None:
    app = create_app(EngineSettings(model="tiny", height=64, width=64), ServerSettings(max_body_bytes=1 << 20),
                     parts=load_model("tiny"))  # fmt: skip
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    while not app[SERVICE].ready:
        await asyncio.sleep(0.1)
    gaps = [0.0]
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        async with aiohttp.ClientSession() as http:
            for lines in (120, 400):
                sdp = await bundled_offer(lines)
                gaps[:] = [0.0]
                stop.clear()
                ticker = asyncio.ensure_future(tick())
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    async with http.post(url + "/whip", data=sdp, headers={"Content-Type": "application/sdp"}) as r:
                        await r.read()
                        assert r.status == 400, r.status
                    times.append((time.perf_counter() - start) * 1000)
                stop.set()
                await ticker
                median, worst, stall = statistics.median(times), max(times), max(gaps) * 1000
                print(f"{lines} m-lines ({len(sdp)} bytes): 400 in median {median:.1f} ms, worst {worst:.1f} ms "
                      f"(20 posts); longest loop stall {stall:.0f} ms")  # fmt: skip
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    with loopback_candidates():
        asyncio.run(main())
