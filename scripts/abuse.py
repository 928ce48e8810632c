"""Attack a `livediff serve` process on purpose and print what it costs (issue 17's measurements).

    python scripts/abuse.py control   # 2000 prompt changes in 20 s; PATCH after a 500-message burst; RSS
                                      # after each of 3 rounds of 10,000 prompts of 1.9 kB
    python scripts/abuse.py lockout   # abandoned offers vs a well-behaved client that retries every second

Each part starts its own server (`--model tiny --size 256 --backend torch --ice-loopback`, the
rest as `livediff serve` defaults) with two 30 fps demo-page sessions from aiortc clients in this
process, over loopback. Waits are capped, so a server that falls behind shows as a capped number.
Run it from a checkout: the server is `python -m livediff.cli` of the `livediff` on `sys.path`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCSessionDescription

from livediff.synthetic import SyntheticCamera
from livediff.transport.client import CameraTrack, Client, abandoned_offer, new_peer, offer_client
from livediff.transport.loopback import free_port, loopback_candidates

SIZE = 256


@asynccontextmanager
async def server(*flags: str) -> AsyncIterator[tuple[str, int]]:
    """`livediff serve` on 127.0.0.1 (tiny, 256, torch); yields its URL and process id once ready."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "livediff.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        "tiny",
        "--size",
        str(SIZE),
        "--backend",
        "torch",
        "--ice-loopback",
        *flags,
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 300
                while True:
                    if process.poll() is not None:
                        log.seek(0)
                        raise SystemExit(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
                    try:
                        async with http.get(url + "/readyz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("server not ready in 300 s")
                    await asyncio.sleep(0.2)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def camera_sessions(http: aiohttp.ClientSession, url: str, count: int = 2) -> list[Client]:
    """`count` demo-page sessions sending 256x256 at 30 fps (pre-rendered frames), connected."""
    scene = await asyncio.to_thread(SyntheticCamera(SIZE, SIZE).frames, 60)
    clients = [await offer_client(http, url, CameraTrack(SIZE, SIZE, 30, scene=scene)) for _ in range(count)]
    for client in clients:
        await client.wait_connected()
        assert client.channel is not None
        while client.channel.readyState != "open":
            await asyncio.sleep(0.05)
    await asyncio.sleep(2)  # frames flowing, the engine stepping
    return clients


def answers(client: Client) -> Counter[str]:
    return Counter(m.get("type", "?") for m in client.messages if m.get("type") != "stats")


def answer_to(client: Client, request_id: int) -> dict[str, Any] | None:
    return next((m for m in client.messages if m.get("request_id") == request_id), None)


async def send_paced(client: Client, messages: Sequence[dict[str, Any]], seconds: float) -> float:
    """Send `messages` evenly over `seconds` on the control channel; returns when the last one left."""
    assert client.channel is not None
    start = time.monotonic()
    for i, message in enumerate(messages):
        wait = start + i * seconds / len(messages) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        client.channel.send(json.dumps(message))
    return time.monotonic()


async def wait_answer(client: Client, request_id: int, cap_s: float) -> float | None:
    """Seconds until the answer to `request_id` came (None after `cap_s`)."""
    start = time.monotonic()
    while time.monotonic() - start < cap_s:
        if answer_to(client, request_id) is not None:
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    return None


async def applied_prompt(http: aiohttp.ClientSession, url: str, session_id: str) -> str:
    async with http.get(f"{url}/api/sessions/{session_id}") as response:
        return str((await response.json())["params"]["prompt"])


async def control(cap_s: float) -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        # 1. 2000 prompt changes in 20 s
        async with server() as (url, _):
            clients = await camera_sessions(http, url)
            client = clients[0]
            prompts = [{"prompt": f"prompt number {i}: a watercolor city", "request_id": i} for i in range(2000)]
            sent_last = await send_paced(client, prompts, 20.0)
            at_20s = answers(client)
            lag = await wait_answer(client, 1999, cap_s)
            applied = await applied_prompt(http, url, client.session_id)
            report["prompts_2000_in_20s"] = {
                "answers_when_sent": dict(at_20s),
                "answers_after": dict(answers(client)),
                "newest_prompt_lag_s": None if lag is None else round(lag, 2),
                "cap_s": cap_s,
                "applied_prompt_at_end": applied.split(":")[0],
                "seconds_after_last_send": round(time.monotonic() - sent_last, 1),
            }
            for c in clients:
                await c.close()
        # 2. a 5 s burst of 500 messages, then PATCH
        async with server() as (url, _):
            clients = await camera_sessions(http, url)
            client = clients[0]
            burst = [{"prompt": f"burst {i}", "strength": 0.5 + (i % 5) / 10, "request_id": i} for i in range(500)]
            await send_paced(client, burst, 5.0)
            start = time.monotonic()
            try:
                async with http.patch(
                    f"{url}/api/sessions/{client.session_id}",
                    json={"strength": 0.95},
                    timeout=aiohttp.ClientTimeout(total=cap_s),
                ) as response:
                    status = response.status
                    body = await response.json()
                waited: float | None = time.monotonic() - start
            except asyncio.TimeoutError:
                status, body, waited = 0, {}, None
            report["patch_after_500_burst"] = {
                "status": status,
                "wait_s": None if waited is None else round(waited, 2),
                "cap_s": cap_s,
                "strength": body.get("params", {}).get("strength"),
                "answers_to_burst_by_then": dict(answers(client)),
            }
            for c in clients:
                await c.close()
        # 3. rounds of 10,000 prompts of 1.9 kB as fast as the channel takes them: server RSS after each
        async with server() as (url, pid):
            clients = await camera_sessions(http, url)
            client = clients[0]
            assert client.channel is not None
            await asyncio.sleep(3)
            rss = [rss_mb(pid)]
            filler = "a watercolor painting of a harbour at dawn, " * 44
            for round_ in range(3):
                for i in range(10_000):
                    request_id = round_ * 10_000 + i
                    prompt = f"{request_id} {filler}"[:1900]
                    client.channel.send(json.dumps({"prompt": prompt, "request_id": request_id}))
                    if i % 200 == 199:
                        await asyncio.sleep(0.01)  # let the client's SCTP drain
                while client.channel.bufferedAmount > 0:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(5)
                rss.append(rss_mb(pid))
            report["rss_3x10000_prompts"] = {
                "rss_mb": [round(x, 1) for x in rss],
                "growth_per_round_mb": [round(b - a, 1) for a, b in zip(rss, rss[1:])],
                "answers_5s_after_sending": dict(answers(client)),
            }
            for c in clients:
                await c.close()
    return report


async def retry_until_admitted(http: aiohttp.ClientSession, url: str) -> tuple[float, list[str]]:
    """A real client (the demo page's offer) that retries every second until it connects; seconds to
    connect and the Retry-After values it was given."""
    start = time.monotonic()
    retry_after: list[str] = []
    while True:
        pc = new_peer()
        pc.addTransceiver(CameraTrack(fps=30), direction="sendrecv")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(url + "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as response:
            body = await response.json()
            if response.status == 503:
                retry_after.append(response.headers.get("Retry-After", "-"))
                await pc.close()
                await asyncio.sleep(1)
                continue
            assert response.status == 200, body
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
        while pc.connectionState != "connected":
            await asyncio.sleep(0.05)
        waited = time.monotonic() - start
        await pc.close()
        return waited, retry_after


async def viewer_until_admitted(http: aiohttp.ClientSession, url: str, session_id: str) -> tuple[float, list[str]]:
    start = time.monotonic()
    retry_after: list[str] = []
    while True:
        pc = new_peer()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with http.post(
            f"{url}/whep/{session_id}", data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as response:
            text = await response.text()
            if response.status == 503:
                retry_after.append(response.headers.get("Retry-After", "-"))
                await pc.close()
                await asyncio.sleep(1)
                continue
            assert response.status == 201, text
        await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        while pc.connectionState != "connected":
            await asyncio.sleep(0.05)
        waited = time.monotonic() - start
        await pc.close()
        return waited, retry_after


async def lockout() -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for abandoned in (4, 16):
            async with server() as (url, _):
                statuses = [await abandoned_offer(http, url, "/offer") for _ in range(abandoned)]
                waited, retry_after = await retry_until_admitted(http, url)
                report[f"sessions_after_{abandoned}_abandoned_offers"] = {
                    "abandoned_statuses": dict(Counter(statuses)),
                    "client_wait_s": round(waited, 1),
                    "retry_after_seen": sorted(set(retry_after)),
                    "refusals": len(retry_after),
                }
        async with server() as (url, _):
            publisher = (await camera_sessions(http, url, 1))[0]
            statuses = [await abandoned_offer(http, url, f"/whep/{publisher.session_id}") for _ in range(16)]
            waited, retry_after = await viewer_until_admitted(http, url, publisher.session_id)
            report["viewers_after_16_abandoned_whep_offers"] = {
                "abandoned_statuses": dict(Counter(statuses)),
                "viewer_wait_s": round(waited, 1),
                "retry_after_seen": sorted(set(retry_after)),
                "refusals": len(retry_after),
            }
            await publisher.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["control", "lockout"])
    parser.add_argument("--cap", type=float, default=60.0, help="longest wait measured, seconds")
    args = parser.parse_args()
    np.random.seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with loopback_candidates():
        report = asyncio.run(control(args.cap) if args.part == "control" else lockout())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
