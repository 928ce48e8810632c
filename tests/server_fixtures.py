"""Helpers for the server tests: a real aiohttp server on 127.0.0.1 and real aiortc client peers.

Every peer (server and client) gathers loopback candidates only (`loopback_ice`), so no packet
leaves the machine and no STUN server is asked.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from livediff.config import EngineSettings, ServerSettings, StreamParams
from livediff.server import create_app
from livediff.server.common import SERVICE
from livediff.server.service import Service
from livediff.synthetic import SyntheticCamera
from livediff.transport import probe

FPS = 15


@dataclass
class Running:
    url: str
    app: web.Application

    @property
    def service(self) -> Service:
        return self.app[SERVICE]


@asynccontextmanager
async def running_server(parts: Any, size: int = 64, max_batch: int = 4, params: StreamParams | None = None,
                         **server: Any) -> AsyncIterator[Running]:
    engine = EngineSettings(model="tiny", height=size, width=size, max_batch=max_batch)
    settings = ServerSettings(**{"max_body_bytes": 32 * 1024, **server})
    app = create_app(engine, settings, parts=parts, default_params=params)
    test_server = TestServer(app, host="127.0.0.1", port=0)
    await test_server.start_server()
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


class CameraTrack(MediaStreamTrack):
    """Moving synthetic frames at `fps`, optionally with the probe id (the frame index) painted in."""

    kind = "video"

    def __init__(self, width: int = 96, height: int = 80, fps: float = FPS, paint_probe: bool = False,
                 seed: int = 0, solid: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.camera = SyntheticCamera(height, width, seed=seed)
        self.fps = fps
        self.paint_probe = paint_probe
        self.solid = solid
        self.index = 0
        self.sent_at: dict[int, float] = {}
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self.index / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        image = self.camera.frame(self.index)
        if self.solid is not None:
            image[:] = self.solid
        if self.paint_probe:
            probe.paint(image, self.index)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(self.index * 90000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent_at[self.index] = time.monotonic()
        self.index += 1
        return frame


@dataclass
class Received:
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    pts: list[int] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    keep: int = 400

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < count:
            assert time.monotonic() < deadline, f"only {len(self.times)} of {count} frames arrived"
            await asyncio.sleep(0.05)


def collect(track: MediaStreamTrack) -> Received:
    received = Received()

    async def run() -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            received.times.append(time.monotonic())
            received.pts.append(frame.pts)
            if len(received.frames) < received.keep:
                received.frames.append(frame.to_ndarray(format="rgb24"))

    received.task = asyncio.ensure_future(run())
    return received


def prefer(transceiver: Any, codec: str) -> None:
    caps = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() == f"video/{codec.lower()}"])


@dataclass
class Client:
    """One client peer (demo page, OBS-like publisher or WHEP viewer)."""

    pc: RTCPeerConnection
    received: Received | None = None
    camera: CameraTrack | None = None
    channel: Any = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    session_id: str = ""
    location: str = ""
    etag: str = ""

    async def close(self) -> None:
        if self.camera is not None:
            self.camera.stop()
        await self.pc.close()
        if self.received is not None and self.received.task is not None:
            self.received.task.cancel()
            await asyncio.gather(self.received.task, return_exceptions=True)

    async def wait_message(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if predicate(message):
                    return message
            assert time.monotonic() < deadline, f"no matching message among {self.messages[-5:]}"
            await asyncio.sleep(0.05)

    async def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected":
            assert time.monotonic() < deadline, f"connection state {self.pc.connectionState}"
            await asyncio.sleep(0.05)


def _new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def _on_track(client: Client) -> None:
    @client.pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            client.received = collect(track)


async def offer_client(http: aiohttp.ClientSession, url: str, camera: CameraTrack | None = None,
                       params: dict[str, Any] | None = None, codec: str = "VP8",
                       headers: dict[str, str] | None = None) -> Client:
    """The demo page: sendrecv video + a `control` data channel, via POST /offer."""
    camera = camera or CameraTrack()
    client = Client(pc=_new_pc(), camera=camera)
    transceiver = client.pc.addTransceiver(camera, direction="sendrecv")
    prefer(transceiver, codec)
    client.channel = client.pc.createDataChannel("control")

    @client.channel.on("message")
    def on_message(message: str) -> None:
        client.messages.append(json.loads(message))

    _on_track(client)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    body = {"sdp": client.pc.localDescription.sdp, "type": "offer"}
    if params is not None:
        body["params"] = params
    async with http.post(url + "/offer", json=body, headers=headers) as response:
        answer = await response.json()
        assert response.status == 200, answer
    client.session_id = answer["session_id"]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return client


def strip_candidates(sdp: str) -> str:
    """OBS >= 30.2 sends no candidates in its offer and does not trickle."""
    return "".join(line + "\r\n" for line in sdp.splitlines() if line and not line.startswith(("a=candidate:",
                                                                                          "a=end-of-candidates")))


async def whip_publish(http: aiohttp.ClientSession, url: str, camera: CameraTrack | None = None,
                       sendrecv: bool = False, query: str = "", audio: bool = True) -> Client:
    """An OBS-like publisher: H.264 (+ Opus) sendonly, no candidates in the offer, no trickle."""
    from aiortc.mediastreams import AudioStreamTrack

    camera = camera or CameraTrack()
    client = Client(pc=_new_pc(), camera=camera)
    transceiver = client.pc.addTransceiver(camera, direction="sendrecv" if sendrecv else "sendonly")
    prefer(transceiver, "H264")
    if audio:
        client.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    _on_track(client)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    async with http.post(url + "/whip" + query, data=strip_candidates(client.pc.localDescription.sdp),
                         headers={"Content-Type": "application/sdp"}) as response:
        text = await response.text()
        assert response.status == 201, text
        client.location = response.headers["Location"]
        client.etag = response.headers["ETag"]
        assert response.content_type == "application/sdp"
    client.session_id = client.location.rsplit("/", 1)[-1]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client


async def whep_view(http: aiohttp.ClientSession, url: str, session_id: str | None = None,
                    codec: str = "VP8") -> Client:
    client = Client(pc=_new_pc())
    transceiver = client.pc.addTransceiver("video", direction="recvonly")
    prefer(transceiver, codec)
    _on_track(client)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    path = "/whep" + (f"/{session_id}" if session_id else "")
    async with http.post(url + path, data=client.pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp"}) as response:
        text = await response.text()
        assert response.status == 201, text
        client.location = response.headers["Location"]
        client.etag = response.headers["ETag"]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return client


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


async def metric_value(http: aiohttp.ClientSession, url: str, name: str,
                       headers: dict[str, str] | None = None) -> float:
    """The value of one sample line of /metrics (`name` includes the labels as printed)."""
    async with http.get(url + "/metrics", headers=headers) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")
