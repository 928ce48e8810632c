"""Live control over the data channel and the REST API; two sessions batched into one step."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from livediff.config import StreamParams
from livediff.server.params import ParamError, parse_query, parse_update
from tests.server_fixtures import (
    CameraTrack,
    mean_abs_diff,
    metric_value,
    offer_client,
    running_server,
)

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]


async def test_prompt_change_over_data_channel(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        camera = CameraTrack(solid=(128, 128, 128))  # a still input: only the prompt changes the output
        client = await offer_client(http, server.url, camera, params={"prompt": "a", "strength": 0.9})
        await client.wait_connected()
        received = client.received
        assert received is not None
        await received.wait_for(5)
        before = received.frames[-1]
        while client.channel.readyState != "open":
            await asyncio.sleep(0.05)
        client.channel.send(json.dumps({"prompt": "zebra stripes everywhere", "request_id": 7}))
        ack = await client.wait_message(lambda m: m.get("request_id") == 7)
        assert ack["type"] == "ack" and ack["params"]["prompt"] == "zebra stripes everywhere"
        count = len(received.times)
        await received.wait_for(count + 5)
        after = received.frames[-1]
        assert mean_abs_diff(before, after) > 3.0, "the prompt change did not reach the output"
        client.channel.send(json.dumps({"strength": 7, "request_id": 8}))
        error = await client.wait_message(lambda m: m.get("request_id") == 8)
        assert error["type"] == "error" and error["field"] == "strength"
        client.channel.send("not json")
        await client.wait_message(lambda m: m["type"] == "error" and "JSON" in m["error"])
        # clock sync: the server answers a ping with its monotonic time (this process's clock here)
        asked = time.monotonic() * 1000.0
        client.channel.send(json.dumps({"type": "ping", "client_ms": asked}))
        pong = await client.wait_message(lambda m: m["type"] == "pong")
        assert pong["client_ms"] == asked and asked <= pong["server_ms"] <= time.monotonic() * 1000.0
        await client.close()


async def test_two_sessions_batched_with_their_own_prompts(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        still = (128, 128, 128)
        first = await offer_client(http, server.url, CameraTrack(solid=still), params={"prompt": "a", "strength": 1.0})
        second = await offer_client(http, server.url, CameraTrack(solid=still),
                                    params={"prompt": "zebra stripes everywhere", "strength": 1.0})
        await asyncio.gather(first.wait_connected(), second.wait_connected())
        await asyncio.gather(first.received.wait_for(8), second.received.wait_for(8))  # type: ignore[union-attr]
        # A fast model serves each frame as it comes (nothing waits to fill a batch); frames of both
        # sessions meet in one step when they arrive while the worker is busy. Keep the worker busy
        # for half a second, as a slow model step would: both inboxes fill and the next step takes both.
        await server.service.scheduler.run_on_worker(time.sleep, 0.5)
        await asyncio.gather(first.received.wait_for(len(first.received.times) + 2),  # type: ignore[union-attr]
                             second.received.wait_for(len(second.received.times) + 2))  # type: ignore[union-attr]
        batch_count = await metric_value(http, server.url, "livediff_batch_size_count")
        singles = await metric_value(http, server.url, 'livediff_batch_size_bucket{le="1.0"}')
        assert singles < batch_count, f"no step of {batch_count:g} had 2 frames"
        batch_sum = await metric_value(http, server.url, "livediff_batch_size_sum")
        assert batch_sum > batch_count
        # same input, same seed, different prompts: different outputs
        assert mean_abs_diff(first.received.frames[-1], second.received.frames[-1]) > 3.0  # type: ignore[union-attr]
        # REST: list, get, patch, errors
        async with http.get(server.url + "/api/sessions") as response:
            listed = await response.json()
        ids = {s["id"] for s in listed["sessions"]}
        assert ids == {first.session_id, second.session_id}
        assert all(s["state"] == "live" and s["stats"]["processed"] > 0 for s in listed["sessions"])
        url = f"{server.url}/api/sessions/{first.session_id}"
        async with http.patch(url, json={"prompt": "x " * 200, "blend": {"prompt": "b", "weight": 0.5}}) as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["warnings"] and "truncated" in body["warnings"][0]
            assert body["params"]["blend"] == {"prompt": "b", "weight": 0.5}
        for bad, field in (({"strength": 0}, "strength"), ({"steps": 9}, "steps"), ({"seed": "x"}, "seed"),
                           ({"nope": 1}, "nope"), ({"t_index_list": [1, 500]}, "t_index_list"),
                           ({"blend": {"weight": 2}}, "blend.weight"), ({"guidance": 50}, "guidance")):
            async with http.patch(url, json=bad) as response:
                body = await response.json()
                assert response.status == 422 and body["field"] == field, (bad, body)
        async with http.get(url) as response:
            assert (await response.json())["params"]["strength"] == 1.0
        async with http.patch(url, json={"prompt": "a", "blend": {"weight": 0}}) as response:
            assert response.status == 200  # "a" is in the conditioning cache already: a hit
        cache_hits = await metric_value(http, server.url, 'livediff_conditioning_cache_total{result="hit"}')
        assert cache_hits >= 1
        for client in (first, second):
            await client.close()
        assert np.isfinite(batch_sum)


def test_passthrough_is_a_boolean_param_in_json_and_query_strings() -> None:
    params, session = parse_update(StreamParams(), {"passthrough": True, "probe": True})
    assert params.passthrough and session == {"probe": True}
    assert not parse_update(params, {"passthrough": False})[0].passthrough
    with pytest.raises(ParamError) as error:
        parse_update(StreamParams(), {"passthrough": "yes"})
    assert error.value.field == "passthrough"
    assert parse_query({"passthrough": "1"}) == {"passthrough": True}
    assert parse_update(StreamParams(), parse_query({"passthrough": "off"}))[0].passthrough is False
