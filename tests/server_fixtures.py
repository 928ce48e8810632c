"""Helpers for the server tests: a real aiohttp server on 127.0.0.1 and real aiortc client peers.

The demo-page client and the probe-painting camera live in `livediff.transport.client` (the bench
uses them too); the WHIP publisher and WHEP viewer here are test-only. Every peer (server and
client) gathers loopback candidates only (`loopback_ice`), so no packet leaves the machine and no
STUN server is asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiortc import RTCSessionDescription

from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.server import create_app
from livediff.server.common import SERVICE
from livediff.server.service import Service
from livediff.transport.client import FPS, CameraTrack, Client, Received, new_peer, offer_client, prefer

__all__ = [  # the client pieces are re-exported: the tests import everything from here
    "FPS",
    "CameraTrack",
    "Client",
    "offer_client",
    "Running",
    "running_server",
    "frames_back",
    "strip_candidates",
    "whip_publish",
    "whep_view",
    "mean_abs_diff",
    "metric_value",
    "MDNS_HOST",
    "replay_gathered",
]

MDNS_HOST = "1f0e4b6c-7d2a-4f1e-9c3b-6a5d4e3f2a1b.local"


@dataclass
class Running:
    url: str
    app: web.Application

    @property
    def service(self) -> Service:
        return self.app[SERVICE]


@asynccontextmanager
async def running_server(
    parts: Any,
    size: int = 64,
    max_batch: int = 4,
    params: StreamParams | None = None,
    feature_bank: bool = False,
    controlnets: tuple[tuple[str, str], ...] = (),
    depth_model: str = "",
    model: str = "tiny",
    jobs: Any = None,
    loras: tuple[tuple[str, str], ...] = (),
    ip_adapter: str = "",
    **server: Any,
) -> AsyncIterator[Running]:
    from livediff.server import tls

    engine = EngineSettings(
        model=model,
        height=size,
        width=size,
        max_batch=max_batch,
        feature_bank=feature_bank,
        controlnets=controlnets,
        depth_model=depth_model,
        loras=loras,
        ip_adapter=ip_adapter,
    )
    settings, _ = tls.prepare(ServerSettings(**{"max_body_bytes": 32 * 1024, **server}))  # as `serve` does
    app = create_app(engine, settings, parts=parts, default_params=params, jobs=jobs)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server(ssl=tls.context_for(settings))
    try:
        service = app[SERVICE]
        deadline = time.monotonic() + 60
        while not service.ready:
            assert service.load_error is None, service.load_error
            assert time.monotonic() < deadline, "server never became ready"
            await asyncio.sleep(0.05)
        yield Running(str(test_server.make_url("")).rstrip("/"), app)
    finally:
        await test_server.close()


async def until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Awaits `check()` becoming truthy (polled every `interval` s), its value; fails naming `what`
    after `timeout` s. For conditions only: a timeout here is a generous bound, never a measurement."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
    return value


async def frames_back(client: Client, count: int = 3) -> Received:
    """Once `client` is connected and `count` frames came back: what it received."""
    await client.wait_connected()
    assert client.received is not None
    await client.received.wait_for(count)
    return client.received


def strip_candidates(sdp: str) -> str:
    """OBS >= 30.2 sends no candidates in its offer and does not trickle."""
    return "".join(
        line + "\r\n"
        for line in sdp.splitlines()
        if line and not line.startswith(("a=candidate:", "a=end-of-candidates"))
    )


def replay_gathered(sdp: str, mode: str) -> str:
    """An offer as browsers send it once gathering ended: `none` (no candidate at all) or `mdns`
    (only `.local` host candidates, what Firefox sends by default), each media section closed by
    `a=end-of-candidates` (RFC 8840 section 4.1)."""
    sections: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        if line in ("", "a=end-of-candidates") or (line.startswith("a=candidate:") and mode != "mdns"):
            continue
        if line.startswith("a=candidate:"):
            fields = line.split()
            fields[4] = MDNS_HOST
            line = " ".join(fields)
        sections[-1].append(line)
    lines = sections[0] + [line for media in sections[1:] for line in [*media, "a=end-of-candidates"]]
    return "\r\n".join(lines) + "\r\n"


async def whip_publish(
    http: aiohttp.ClientSession,
    url: str,
    camera: CameraTrack | None = None,
    sendrecv: bool = False,
    query: str = "",
    audio: bool = True,
) -> Client:
    """An OBS-like publisher: H.264 (+ Opus) sendonly, no candidates in the offer, no trickle."""
    from aiortc.mediastreams import AudioStreamTrack

    camera = camera or CameraTrack()
    client = Client(pc=new_peer(), camera=camera)
    transceiver = client.pc.addTransceiver(camera, direction="sendrecv" if sendrecv else "sendonly")
    prefer(transceiver, "H264")
    if audio:
        client.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    client.receive_video()
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(
        url + "/whip" + query,
        data=strip_candidates(client.pc.localDescription.sdp),
        headers={"Content-Type": "application/sdp"},
    ) as response:
        text = await response.text()
        assert response.status == 201, text
        client.location = response.headers["Location"]
        client.etag = response.headers["ETag"]
        assert response.content_type == "application/sdp"
    client.session_id = client.location.rsplit("/", 1)[-1]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client


async def whep_view(
    http: aiohttp.ClientSession,
    url: str,
    session_id: str | None = None,
    codec: str = "VP8",
    headers: dict[str, str] | None = None,
    marker_completion: bool = False,
) -> Client:
    client = Client(pc=new_peer(marker_completion))
    transceiver = client.pc.addTransceiver("video", direction="recvonly")
    prefer(transceiver, codec)
    client.receive_video()
    await client.pc.setLocalDescription(await client.pc.createOffer())
    path = "/whep" + (f"/{session_id}" if session_id else "")
    async with http.post(
        url + path, data=client.pc.localDescription.sdp, headers={**(headers or {}), "Content-Type": "application/sdp"}
    ) as response:
        text = await response.text()
        assert response.status == 201, text
        client.location = response.headers["Location"]
        client.etag = response.headers["ETag"]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


async def metric_value(
    http: aiohttp.ClientSession, url: str, name: str, headers: dict[str, str] | None = None
) -> float:
    """The value of one sample line of /metrics (`name` includes the labels as printed)."""
    async with http.get(url + "/metrics", headers=headers) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
