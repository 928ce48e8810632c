"""The `image_prompt` live param and `PUT /api/sessions/{id}/image-prompt` through the real app and
real peers: a frame captured once, an upload taking over on the next frames, scale changes with no
new encoding, and every bad input answered 4xx naming the field while the session goes on."""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest
from PIL import Image

from livediff.config import ImagePromptParams
from livediff.server.image_prompt import MAX_IMAGE_BYTES
from livediff.transport.client import SignallingError
from tests.server_fixtures import CameraTrack, offer_client, running_server, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(240)]


def _encoded(size: tuple[int, int], kind: str, color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parts(tiny_parts: Any) -> Any:
    """The model on its own copy: the adapter's processors go on its UNet."""
    return copy.deepcopy(tiny_parts)


async def test_image_prompts_apply_live_and_bad_input_names_the_field(parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(parts, size=64, ip_adapter="tiny") as server:
        assert server.service.describe()["ip_adapter"] == "tiny"
        client = await offer_client(http, server.url, CameraTrack(),
                                    params={"image_prompt": {"image": "frame", "scale": 0.8}})  # fmt: skip
        await client.wait_connected()
        assert client.received is not None
        await client.received.wait_for(2)
        session = server.service.scheduler.sessions[client.session_id]
        stream = session.stream
        assert stream.params.image_prompt == ImagePromptParams("frame", 0.8, 0)
        assert stream.image_tokens is not None  # the first frame was captured
        captured = stream.image_tokens
        url = f"{server.url}/api/sessions/{client.session_id}"

        async with http.patch(url, json={"image_prompt": {"scale": 0.3}}) as response:
            body = await response.json()
        assert response.status == 200 and body["params"]["image_prompt"] == {"image": "frame", "scale": 0.3}
        assert stream.image_tokens is captured  # a scale change encodes nothing

        for kind, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
            data = _encoded((40, 30), kind)
            async with http.put(f"{url}/image-prompt?scale=1.5", data=data, headers={"Content-Type": mime}) as response:
                body = await response.json()
            assert response.status == 200, body
            assert body["params"]["image_prompt"] == {"image": "upload", "scale": 1.5}
            assert tuple(stream.uploaded_image.shape) == (30, 40, 3) and stream.image_tokens is not captured
        count = len(client.received.times)
        await client.received.wait_for(count + 2)  # frames keep coming with the upload

        bomb = io.BytesIO()
        Image.new("L", (5000, 5000)).save(bomb, format="PNG")  # small file, 25 megapixels decoded
        assert len(bomb.getvalue()) < MAX_IMAGE_BYTES
        bad_puts = [
            (b"not an image at all", "image/png", "", 415),
            (_encoded((8, 8), "GIF"), "image/png", "", 415),  # a GIF under a PNG label: not taken
            (_encoded((8, 8), "PNG")[:40], "image/png", "", 415),  # truncated
            (_encoded((8, 8), "PNG"), "text/plain", "", 415),
            (bomb.getvalue(), "image/png", "", 413),
            (b"\0" * (MAX_IMAGE_BYTES + 1), "image/jpeg", "", 413),
            (_encoded((8, 8), "PNG"), "image/png", "?scale=3", 422),
            (_encoded((8, 8), "PNG"), "image/png", "?scale=big", 422),
        ]
        before = stream.params
        for data, mime, query, status in bad_puts:
            async with http.put(f"{url}/image-prompt{query}", data=data, headers={"Content-Type": mime}) as response:
                body = await response.json()
            field = "image_prompt.scale" if status == 422 else "image_prompt.image"
            assert response.status == status and body["field"] == field, (mime, query, body)
        assert stream.params == before

        for bad, field in (({"scale": 5}, "image_prompt.scale"), ({"image": "camera"}, "image_prompt.image"),
                           ({"image": "frame", "weight": 1}, "image_prompt.weight"), ("frame", "image_prompt"),
                           ({"scale": True}, "image_prompt.scale")):  # fmt: skip
            async with http.patch(url, json={"image_prompt": bad}) as response:
                body = await response.json()
            assert response.status == 422 and body["field"] == field, body
        assert stream.params == before
        client.channel.send(json.dumps({"request_id": 7, "image_prompt": {"scale": -1}}))
        error = await client.wait_message(lambda m: m.get("request_id") == 7)
        assert error["type"] == "error" and error["field"] == "image_prompt.scale"
        client.channel.send(json.dumps({"request_id": 8, "image_prompt": {"image": "frame", "scale": 0.5}}))
        ack = await client.wait_message(lambda m: m.get("request_id") == 8)
        assert ack["type"] == "ack" and ack["params"]["image_prompt"] == {"image": "frame", "scale": 0.5}
        assert stream.params.image_prompt == ImagePromptParams("frame", 0.5, before.image_prompt.version + 1)
        client.channel.send(json.dumps({"request_id": 9, "image_prompt": None}))
        ack = await client.wait_message(lambda m: m.get("request_id") == 9)
        assert ack["params"]["image_prompt"] is None and stream.image_tokens is None
        count = len(client.received.times)
        await client.received.wait_for(count + 2)  # the session went on through all of it
        await client.close()


async def test_a_whip_publisher_names_its_image_prompt_in_the_query(parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(parts, size=64, ip_adapter="tiny") as server:
        client = await whip_publish(http, server.url, query="?image_prompt=frame:0.6")
        session = server.service.scheduler.sessions[client.session_id]
        assert session.params.image_prompt == ImagePromptParams("frame", 0.6)
        await client.close()
        for query, field in (("frame:9", "image_prompt.scale"), ("frame:x", "image_prompt.scale"),
                             ("camera", "image_prompt.image")):  # fmt: skip
            async with http.post(f"{server.url}/whip?image_prompt={query}", data="v=0",
                                 headers={"Content-Type": "application/sdp"}) as response:  # fmt: skip
                body = await response.json()
            assert response.status == 422 and body["field"] == field, body
        with pytest.raises(SignallingError) as refused:  # an upload before the session exists: none to take
            await offer_client(http, server.url, CameraTrack(), params={"image_prompt": {"image": "upload"}})
        assert refused.value.status == 422 and refused.value.body["field"] == "image_prompt.image"


async def test_a_server_without_an_ip_adapter_refuses_image_prompts_by_name(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        assert server.service.describe()["ip_adapter"] is None
        with pytest.raises(SignallingError) as refused:
            await offer_client(http, server.url, CameraTrack(), params={"image_prompt": {"image": "frame"}})
        assert refused.value.status == 422 and refused.value.body["field"] == "image_prompt"
        assert "--ip-adapter SOURCE" in refused.value.body["error"]
        client = await offer_client(http, server.url, CameraTrack())
        await client.wait_connected()
        url = f"{server.url}/api/sessions/{client.session_id}/image-prompt"
        async with http.put(url, data=_encoded((8, 8), "PNG"), headers={"Content-Type": "image/png"}) as response:
            body = await response.json()
        assert response.status == 422 and body["field"] == "image_prompt", body
        await client.close()
