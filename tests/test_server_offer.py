"""POST /offer round trip: a demo-page client sends moving frames and gets transformed frames back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from livediff.transport.frames import frame_to_tensor
from tests.server_fixtures import FPS, CameraTrack, mean_abs_diff, metric_value, offer_client, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(90)]


async def test_offer_round_trip(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        camera = CameraTrack(width=96, height=80)
        client = await offer_client(http, server.url, camera)
        await client.wait_connected()
        await asyncio.sleep(3.0)
        assert client.received is not None
        received = client.received
        stats = server.service.scheduler.sessions[client.session_id].describe()["stats"]
        assert len(received.times) >= 5, f"{len(received.times)} frames in 3 s; server {stats}"
        assert all(frame.shape == (64, 64, 3) for frame in received.frames)
        # not a passthrough: the output differs from the input cropped to the engine size
        import av

        source = av.VideoFrame.from_ndarray(camera.camera.frame(camera.index - 1), format="rgb24")
        cropped = frame_to_tensor(source, 64, 64).numpy()
        assert mean_abs_diff(received.frames[-1], cropped) > 8.0
        # outputs move with the camera (not one frozen frame)
        assert mean_abs_diff(received.frames[-1], received.frames[len(received.frames) // 2]) > 0.5
        # pts follow the camera: steps are whole camera frame intervals (90 kHz RTP clock)
        steps = np.diff(np.asarray(received.pts[-8:]))
        interval = 90000 // FPS
        assert np.all(steps > 0) and np.all(np.abs(steps - np.round(steps / interval) * interval) <= 4), steps
        assert await metric_value(http, server.url, 'livediff_frames_total{outcome="processed"}') >= 5
        # the HUD's server timings: a stats message per sent frame, with no frame id outside probe mode
        stats_messages = [m for m in client.messages if m["type"] == "stats"]
        assert stats_messages and all(m["frame_id"] is None for m in stats_messages)
        assert {"encode", "unet", "decode"} <= set(stats_messages[-1]["stages_ms"])
        session = server.service.scheduler.sessions[client.session_id]
        assert session.state == "live"
        await client.close()
        for _ in range(100):
            if client.session_id not in server.service.scheduler.sessions:
                break
            await asyncio.sleep(0.05)
        assert client.session_id not in server.service.scheduler.sessions, "closed peer's session not reaped"


def test_frame_to_tensor_crops_centre() -> None:
    import av

    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # the middle square is white, the sides black
    tensor = frame_to_tensor(av.VideoFrame.from_ndarray(image, format="rgb24"), 64, 64)
    assert tensor.shape == (64, 64, 3) and tensor.dtype == torch.uint8
    assert tensor.float().mean() > 240
