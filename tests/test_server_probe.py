"""Probe mode: frame ids painted by the client are read by the server and painted onto the outputs."""

from __future__ import annotations

import numpy as np
import pytest

from livediff.transport import probe
from tests.server_fixtures import CameraTrack, offer_client, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]


def test_probe_format_round_trip_and_rejects_blank() -> None:
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    for frame_id in (0, 1, 4242, probe.MAX_ID):
        probe.paint(image, frame_id)
        assert probe.read(image) == frame_id
    assert probe.read(np.zeros((64, 64), np.uint8)) is None
    assert probe.read(np.full((64, 64), 255, np.uint8)) is None
    probe.paint(image, 77)
    image[0 : 96 // 16, 0 : 128 // 16] ^= 255  # one flipped block fails the CRC
    assert probe.read(image) is None


async def test_probe_ids_come_back_with_stats(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=128) as server:
        camera = CameraTrack(width=160, height=128, paint_probe=True, fps=10)
        client = await offer_client(http, server.url, camera, params={"probe": True})
        await client.wait_connected()
        assert client.received is not None
        await client.received.wait_for(8, timeout=30)
        ids = [probe.read(frame) for frame in client.received.frames]
        read = [i for i in ids if i is not None]
        assert len(read) >= 0.8 * len(ids), ids
        assert read == sorted(read) and max(read) < camera.index
        stats = await client.wait_message(lambda m: m["type"] == "stats" and m["frame_id"] in read)
        assert stats["received_ms"] <= stats["scheduled_ms"] <= stats["finished_ms"] <= stats["sent_ms"]
        assert set(stats["stages_ms"]) >= {"encode", "unet", "decode"}
        await client.close()


@pytest.mark.parametrize("camera_size, as_is", [((128, 128), True), ((160, 128), False)])
async def test_passthrough_sends_frames_of_the_engine_size_as_they_came(tiny_parts, http, camera_size, as_is) -> None:  # type: ignore[no-untyped-def]
    """Engine-size frames skip the worker (no engine step, no conversion); others are converted there."""
    async with running_server(tiny_parts, size=128) as server:
        camera = CameraTrack(*camera_size, paint_probe=True, fps=10)
        client = await offer_client(http, server.url, camera, params={"probe": True, "passthrough": True})
        await client.wait_connected()
        assert client.received is not None
        await client.received.wait_for(8, timeout=30)
        assert {frame.shape for frame in client.received.frames} == {(128, 128, 3)}
        read = [i for i in (probe.read(frame) for frame in client.received.frames) if i is not None]
        assert len(read) >= 0.8 * len(client.received.frames), read
        stats = await client.wait_message(lambda m: m["type"] == "stats" and m["frame_id"] in read)
        assert stats["stages_ms"] == {}  # passthrough: no network ran either way
        assert (stats["batch_size"] == 0) is as_is, stats
        assert stats["received_ms"] <= stats["scheduled_ms"] <= stats["finished_ms"] <= stats["sent_ms"]
        await client.close()


async def test_probe_stats_name_the_frames_the_server_dropped_on_purpose(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    """A camera faster than the model: the inbox's drops reach the client by id, apart from the frames sent."""
    async with running_server(tiny_parts, size=256) as server:
        camera = CameraTrack(width=256, height=256, paint_probe=True, fps=60)
        client = await offer_client(http, server.url, camera, params={"probe": True})
        await client.wait_connected()
        await client.wait_message(lambda m: m["type"] == "stats" and len(client.messages) > 10, timeout=60)
        session = server.service.scheduler.sessions[client.session_id]
        stats = [m for m in client.messages if m["type"] == "stats"]
        replaced = session.inbox.replaced
        await client.close()
    dropped = [i for m in stats for i in m["dropped"]["inbox"]]
    sent_back = {m["frame_id"] for m in stats}
    assert dropped, f"the model kept up with a 60 fps camera ({replaced} replaced): nothing to check"
    assert len(set(dropped)) == len(dropped) and dropped == sorted(dropped)  # each once, oldest first
    assert all(0 <= i < camera.index for i in dropped)  # ids the camera painted
    assert not set(dropped) & sent_back  # a frame dropped at the inbox never reached the encoder
    # Every drop the server counted up to its last stats message is named (ids are read from clean
    # frames); a few more may have come after that message.
    assert 0.8 * replaced - 10 <= len(dropped) <= replaced, (len(dropped), replaced)
    assert all(m["dropped"]["outbox"] == [] or set(m["dropped"]["outbox"]) <= set(range(camera.index)) for m in stats)


def test_dropped_ids_of_a_stats_message_left_unsent_go_with_the_next_one() -> None:
    """A stats message dropped while the control channel is backed up (`server.control`) gives its
    dropped-frame ids back: the next message sent carries them, oldest first, so the latency page
    still tells drops on purpose from frames lost on the way."""
    from livediff.config import StreamParams
    from livediff.server.drops import DropLog
    from livediff.session import FrameIn, FrameOut, Session

    session = Session(params=StreamParams(), probe=True)
    drops = DropLog(session)

    def out(frame_id: int) -> FrameOut:
        return FrameOut(
            image=None,
            source=FrameIn(None, 0, None, 0.0, frame_id),
            scheduled=0.0,
            finished=0.0,
            stages_ms={},
            batch_size=1,
        )

    for frame_id in (1, 2, 3):  # each put replaces the one before unread: 1 and 2 are dropped
        session.outbox.put(out(frame_id))
    unsent = drops.take()
    assert unsent == {"inbox": [], "outbox": [1, 2]}
    session.outbox.put(out(4))  # 3 is dropped after the message was built
    drops.restore(unsent)
    assert drops.take() == {"inbox": [], "outbox": [1, 2, 3]}
    assert drops.take() == {"inbox": [], "outbox": []}
