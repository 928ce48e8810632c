"""A tiny-video server end to end: a real aiortc client publishes and gets frames back; live controls."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from livediff.models.video import load_video_model
from tests.server_fixtures import frames_back, metric_value, offer_client, running_server, whep_view, whip_publish

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("loopback_ice")]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the server sets its own (cores - 1)


@pytest.fixture(scope="module")
def video_parts():  # type: ignore[no-untyped-def]
    return load_video_model("tiny-video")


async def test_a_client_publishes_to_a_tiny_video_server_and_gets_frames_back(video_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(video_parts, size=64, model="tiny-video") as server:
        async with http.get(server.url + "/readyz") as response:
            ready = (await response.json())["engine"]
        assert ready["model"] == "tiny-video" and ready["backend"] == "torch", ready
        # a video model lists what it has, not ControlNet preprocessors
        assert ready["preprocessors"] == [] and ready["controlnets"] == [], ready
        assert ready["video"]["chunk_frames"] == {"first": 5, "next": 4}, ready
        assert ready["video"]["autoencoder"] == "tae" and ready["video"]["autoencoder_weights"] == "random"
        assert ready["video"]["cache"] == {"sink": 1, "window": 4} and ready["video"]["shift"] == 5.0, ready
        assert "reset" in ready["video"]["controls"], ready
        client = await offer_client(http, server.url, params={"prompt": "a red fox", "steps": 2})
        try:
            received = await frames_back(client, 9)  # two chunks or more came back (5 + 4 frames)
            assert len(received.times) >= 9
            url = f"{server.url}/api/sessions/{client.session_id}"
            async with http.get(url) as response:
                state = await response.json()
            assert state["stats"]["processed"] >= 9
            # live controls: prompt on the next chunk, and a cache reset
            async with http.patch(url, json={"prompt": "ink", "strength": 0.8, "seed": 3, "steps": 1}) as response:
                assert response.status == 200, await response.text()
            async with http.patch(url, json={"reset": True}) as response:
                assert response.status == 200, await response.text()
            stream = server.service.scheduler.sessions[client.session_id].stream
            assert stream.params.prompt == "ink"
            before = len(received.times)
            await received.wait_for(before + 5, timeout=60)  # frames keep coming after the reset (a new first chunk)
            # what a video model cannot do: 422 naming the field, the session goes on
            for bad, field in (({"controlnet": [{"name": "canny"}]}, "controlnet"), ({"steps": 5}, "steps"),
                               ({"temporal": {"bank": 2}}, "temporal.bank"), ({"reset": 1}, "reset")):  # fmt: skip
                async with http.patch(url, json=bad) as response:
                    body = await response.json()
                    assert response.status == 422 and body["field"] == field, (bad, body)
            await received.wait_for(len(received.times) + 4, timeout=60)
            # the data channel carries the same controls: a reset, and a field a video model has not
            client.channel.send(json.dumps({"reset": True, "prompt": "a city at night", "request_id": 1}))
            ack = await client.wait_message(lambda m: m.get("request_id") == 1, timeout=60)
            assert ack["type"] == "ack" and ack["params"]["prompt"] == "a city at night", ack
            client.channel.send(json.dumps({"guidance": 4.0, "request_id": 2}))
            error = await client.wait_message(lambda m: m.get("request_id") == 2, timeout=60)
            assert error["type"] == "error" and error["field"] == "guidance", error
            await received.wait_for(len(received.times) + 5, timeout=60)
            for stage in ("encode", "transformer", "decode", "chunk_wait"):
                name = f'livediff_stage_seconds_count{{stage="{stage}"}}'
                assert await metric_value(http, server.url, name) > 0, stage
        finally:
            await client.close()


async def test_reset_on_an_image_server_is_422_naming_reset(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = await offer_client(http, server.url)
        try:
            await frames_back(client, 2)
            async with http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"reset": True}) as response:
                body = await response.json()
            assert response.status == 422 and body["field"] == "reset", body
        finally:
            await client.close()


async def test_a_whip_publisher_and_a_whep_viewer_work_with_a_video_model(video_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(video_parts, size=64, model="tiny-video") as server:
        publisher = await whip_publish(http, server.url, query="?prompt=a%20red%20fox&steps=2")
        viewer = None
        try:
            await publisher.wait_connected()
            viewer = await whep_view(http, server.url, publisher.session_id)
            await viewer.wait_connected()
            assert viewer.received is not None
            await viewer.received.wait_for(9, timeout=60)  # two chunks or more, through the viewer
            assert viewer.received.frames[-1].shape == (64, 64, 3)
            assert server.service.scheduler.sessions[publisher.session_id].stats.processed >= 9
        finally:
            if viewer is not None:
                await viewer.close()
            await publisher.close()
