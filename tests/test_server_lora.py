"""The `loras` live param over /offer, REST, the data channel and WHIP query strings: applied to
the session's stream on the next frame, wrong values named by field, refused by a server without LoRAs."""

from __future__ import annotations

import json

import pytest

from livediff.config import LoRAParams
from livediff.transport.client import SignallingError
from tests.server_fixtures import CameraTrack, offer_client, running_server, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(180)]

LORAS = (("ink", "tiny"), ("film", "random:8"))


async def test_a_server_without_loras_refuses_them_by_name(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        assert server.service.describe()["loras"] == []
        with pytest.raises(SignallingError) as refused:
            await offer_client(http, server.url, CameraTrack(), params={"loras": [{"name": "ink"}]})
        assert refused.value.status == 422 and refused.value.body["field"] == "loras[0].name"
        assert "--lora NAME=SOURCE" in refused.value.body["error"]
        assert not server.service.scheduler.sessions


async def test_loras_apply_live_and_bad_values_name_the_field(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, loras=LORAS) as server:
        assert server.service.describe()["loras"] == ["ink", "film"]
        client = await offer_client(http, server.url, CameraTrack(), params={"loras": [{"name": "ink", "scale": 0.5}]})
        await client.wait_connected()
        assert client.received is not None
        await client.received.wait_for(2)
        session = server.service.scheduler.sessions[client.session_id]
        assert session.stream.params.loras == (LoRAParams("ink", 0.5),)
        url = f"{server.url}/api/sessions/{client.session_id}"

        async with http.patch(url, json={"loras": [{"name": "film", "scale": -1.5}, {"name": "ink"}]}) as response:
            body = await response.json()
        assert response.status == 200 and body["params"]["loras"] == [{"name": "film", "scale": -1.5},
                                                                      {"name": "ink", "scale": 1.0}]  # fmt: skip
        assert session.stream.params.loras == (LoRAParams("film", -1.5), LoRAParams("ink"))
        count = len(client.received.times)
        await client.received.wait_for(count + 2)

        for bad, field in (([{"name": "nope"}], "loras[0].name"), ([{"name": "ink"}, {"name": "film", "scale": 3}],
                           "loras[1].scale"), ({"name": "ink"}, "loras")):  # fmt: skip
            async with http.patch(url, json={"loras": bad}) as response:
                body = await response.json()
            assert response.status == 422 and body["field"] == field, body
        client.channel.send(json.dumps({"request_id": 7, "loras": [{"name": "nope", "scale": 1}]}))
        error = await client.wait_message(lambda m: m.get("request_id") == 7)
        assert error["type"] == "error" and error["field"] == "loras[0].name" and "ink, film" in error["error"]
        client.channel.send(json.dumps({"request_id": 8, "loras": [{"name": "ink", "scale": 0.25}]}))
        ack = await client.wait_message(lambda m: m.get("request_id") == 8)
        assert ack["type"] == "ack" and ack["params"]["loras"] == [{"name": "ink", "scale": 0.25}]
        assert session.stream.params.loras == (LoRAParams("ink", 0.25),)
        count = len(client.received.times)
        await client.received.wait_for(count + 2)  # frames keep coming after each change
        await client.close()


async def test_a_whip_publisher_names_its_loras_in_the_query(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, loras=LORAS) as server:
        client = await whip_publish(http, server.url, query="?loras=film:-0.5,ink")
        session = server.service.scheduler.sessions[client.session_id]
        assert session.params.loras == (LoRAParams("film", -0.5), LoRAParams("ink"))
        await client.close()
        async with http.post(
            server.url + "/whip?loras=ink:3", data="v=0", headers={"Content-Type": "application/sdp"}
        ) as response:
            body = await response.json()
        assert response.status == 422 and body["field"] == "loras[0].scale", body
