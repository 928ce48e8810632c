"""A Python WebRTC client of livediff: a synthetic camera that paints probe ids, and `/offer` signalling.

What the demo page does, in aiortc: send a camera over a sendrecv video transceiver, open the
`control` data channel, POST /offer, and read the transformed frames that come back on the same
connection. The server tests and `livediff bench --g2g` both use this one implementation.

Times are `time.monotonic()` throughout, so a camera's `sent_at[id]` and the receiver's arrival
times can be subtracted: glass-to-glass as this client sees it.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av.video.reformatter import VideoReformatter

from livediff.synthetic import SyntheticCamera
from livediff.transport import probe

FPS = 15
CLOCK_RATE = 90000
"""RTP video clock: the camera's pts count in 1/90000 s."""

FrameHook = Callable[[av.VideoFrame, float], None]
"""Called with each received frame and the monotonic time `recv()` returned it."""


class SignallingError(RuntimeError):
    """The server refused an offer; `status` and `body` are its answer."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"POST /offer answered {status}: {body}")
        self.status = status
        self.body = body


class CameraTrack(MediaStreamTrack):
    """Moving synthetic frames at `fps`, optionally with the probe id (the frame index) painted in.

    Frames are yuv420p, as a camera gives them (I420), so the sender's encoder converts nothing;
    the probe id is painted on the luma plane, which is what every reader reads. `sent_at[i]` is
    when `recv()` handed frame `i` to the sender. A 512x512 synthetic frame takes about 10 ms to
    render, which would stall the event loop at 30 fps: pass `scene`, frames rendered beforehand
    (off the loop), and the track plays them in a loop instead (converted to yuv420p once, here).
    """

    kind = "video"

    def __init__(
        self,
        width: int = 96,
        height: int = 80,
        fps: float = FPS,
        paint_probe: bool = False,
        seed: int = 0,
        solid: tuple[int, int, int] | None = None,
        scene: Sequence[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.camera = SyntheticCamera(height, width, seed=seed)
        self.height = height
        self.fps = fps
        self.paint_probe = paint_probe
        self.index = 0
        self.sent_at: dict[int, float] = {}
        self._start: float | None = None
        self._to_yuv = VideoReformatter()
        self._scene = [self._yuv(image) for image in scene or ()]
        self._solid = None if solid is None else self._yuv(np.full((height, width, 3), solid, dtype=np.uint8))

    def _yuv(self, rgb: np.ndarray) -> np.ndarray:
        """An (H, W, 3) RGB image as a yuv420p array: (H * 3 / 2, W), the Y plane on top."""
        frame = self._to_yuv.reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), format="yuv420p")
        return frame.to_ndarray()

    def _image(self, index: int) -> np.ndarray:
        if self._solid is not None:
            still = self._solid
        elif self._scene:
            still = self._scene[index % len(self._scene)]
        else:
            return self._yuv(self.camera.frame(index))
        return still.copy() if self.paint_probe else still  # converted once, shown again: paint a copy

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self.index / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        image = self._image(self.index)
        if self.paint_probe:
            probe.paint(image[: self.height], self.index)
        frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts = int(self.index * CLOCK_RATE / self.fps)
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        self.sent_at[self.index] = time.monotonic()
        self.index += 1
        return frame


@dataclass
class Received:
    """Frames read from a remote track: arrival times and pts of all, RGB copies of the first `keep`."""

    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    pts: list[int | None] = field(default_factory=list)  # None: a frame that came without one
    task: asyncio.Task[None] | None = None
    keep: int = 400
    on_frame: FrameHook | None = None

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.times)} of {count} frames arrived")
            await asyncio.sleep(0.05)


def collect(track: MediaStreamTrack, received: Received | None = None) -> Received:
    """Read `track` until it ends, into `received` (a new one by default); `received.task` reads."""
    received = received or Received()

    async def run() -> None:
        while True:
            try:
                frame = cast(av.VideoFrame, await track.recv())  # a remote video track's decoded frames
            except MediaStreamError:
                return
            now = time.monotonic()
            received.times.append(now)
            received.pts.append(frame.pts)
            if received.on_frame is not None:
                received.on_frame(frame, now)
            if len(received.frames) < received.keep:
                received.frames.append(frame.to_ndarray(format="rgb24"))

    received.task = asyncio.ensure_future(run())
    return received


def prefer(transceiver: RTCRtpTransceiver, codec: str) -> None:
    """Offer `codec` (VP8, H264) only on this transceiver."""
    caps = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() == f"video/{codec.lower()}"])


def new_peer(marker_completion: bool = False) -> RTCPeerConnection:
    """A client peer with no ICE servers; with `marker_completion`, its video receivers complete
    frames on the RTP marker bit (one frame interval earlier than stock aiortc) and recover from
    lost packets (`livediff.transport.loss_recovery`)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if marker_completion:
        from livediff.transport.loss_recovery import enable_for

        enable_for(pc)
    return pc


@dataclass
class Client:
    """One client peer (demo page, OBS-like publisher or WHEP viewer)."""

    pc: RTCPeerConnection
    received: Received | None = None
    camera: CameraTrack | None = None
    channel: RTCDataChannel | None = None
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
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching message among {self.messages[-5:]}")
            await asyncio.sleep(0.05)

    async def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected":
            if time.monotonic() > deadline:
                raise TimeoutError(f"connection state {self.pc.connectionState}")
            await asyncio.sleep(0.05)

    def receive_video(self, received: Received | None = None) -> None:
        """Collect the first remote video track into `received` (a new one by default) when it comes."""

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self.received = collect(track, received)


async def offer_client(
    http: aiohttp.ClientSession,
    url: str,
    camera: CameraTrack | None = None,
    params: dict[str, Any] | None = None,
    codec: str = "VP8",
    headers: dict[str, str] | None = None,
    received: Received | None = None,
    marker_completion: bool = False,
) -> Client:
    """The demo page: sendrecv video + a `control` data channel, via POST /offer.

    Control answers and stats messages are appended to `Client.messages`.
    """
    camera = camera or CameraTrack()
    client = Client(pc=new_peer(marker_completion), camera=camera)
    transceiver = client.pc.addTransceiver(camera, direction="sendrecv")
    prefer(transceiver, codec)
    channel = client.channel = client.pc.createDataChannel("control")

    @channel.on("message")
    def on_message(message: str) -> None:
        client.messages.append(json.loads(message))

    client.receive_video(received)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    body: dict[str, Any] = {"sdp": client.pc.localDescription.sdp, "type": "offer"}
    if params is not None:
        body["params"] = params
    async with http.post(url + "/offer", json=body, headers=headers) as response:
        answer = await response.json()
        if response.status != 200:
            await client.close()
            raise SignallingError(response.status, answer)
    client.session_id = answer["session_id"]
    await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return client


async def abandoned_offer(http: aiohttp.ClientSession, url: str, path: str) -> int:
    """POST an offer and never apply its answer: a client that went away, or one holding connecting
    slots on purpose (what admission must survive). `path`: `/offer` (the demo page's JSON), `/whip`,
    or `/whep/{id}` (a recvonly offer). -> the HTTP status."""
    pc = new_peer()
    if path.startswith("/whep"):
        pc.addTransceiver("video", direction="recvonly")
    else:
        pc.addTransceiver(CameraTrack(), direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    if path == "/offer":
        async with http.post(url + path, json={"sdp": sdp, "type": "offer"}) as response:
            return response.status
    async with http.post(url + path, data=sdp, headers={"Content-Type": "application/sdp"}) as response:
        return response.status
