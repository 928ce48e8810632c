"""The `temporal` live param over REST and the data channel: validated, named when wrong, refused by a
server without the feature bank, applied by one with it."""

from __future__ import annotations

import asyncio
import json

import pytest

from livediff.config import StreamParams
from livediff.server.params import ParamError, parse_query, parse_update
from livediff.transport.client import SignallingError
from tests.server_fixtures import CameraTrack, offer_client, running_server

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"temporal": {"bank": 5}}, "temporal.bank"),
        ({"temporal": {"bank": -1}}, "temporal.bank"),
        ({"temporal": {"bank": 1.5}}, "temporal.bank"),
        ({"temporal": {"bank": True}}, "temporal.bank"),
        ({"temporal": {"weight": 0}}, "temporal.weight"),
        ({"temporal": {"weight": "heavy"}}, "temporal.weight"),
        ({"temporal": {"motion_strength": [0.8, 0.3]}}, "temporal.motion_strength"),
        ({"temporal": {"motion_strength": [0.3]}}, "temporal.motion_strength"),
        ({"temporal": {"motion_strength": "0.3-0.6"}}, "temporal.motion_strength"),
        ({"temporal": {"frames": 2}}, "temporal"),
        ({"temporal": 2}, "temporal"),
    ],
)
def test_bad_temporal_values_name_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ParamError) as error:
        parse_update(StreamParams(), bad)
    assert error.value.field == field
    assert error.value.message.startswith(field), error.value.message  # as the user wrote it, not temporal_bank


def test_temporal_params_from_json_and_query_strings() -> None:
    params, _ = parse_update(StreamParams(), {"temporal": {"bank": 2, "weight": 1.5, "motion_strength": [0.3, 0.6]}})
    assert (params.temporal_bank, params.temporal_weight, params.motion_strength) == (2, 1.5, (0.3, 0.6))
    assert parse_update(params, {"temporal": {"motion_strength": None}})[0].motion_strength is None
    query = parse_query({"temporal_bank": "1", "temporal_weight": "2", "motion_strength": "0.4,0.7"})
    assert query == {"temporal": {"bank": 1, "weight": 2.0, "motion_strength": [0.4, 0.7]}}
    assert parse_update(StreamParams(), query)[0].motion_strength == (0.4, 0.7)


async def test_a_server_without_the_feature_bank_refuses_it_by_name(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        sdp = {"Content-Type": "application/sdp"}
        async with http.post(server.url + "/whip?temporal_bank=9", data="v=0", headers=sdp) as response:
            body = await response.json()  # named as the URL wrote it
        assert response.status == 422 and body["field"] == "temporal_bank", body
        assert body["error"].startswith("temporal_bank must be an integer in 0..4"), body
        with pytest.raises(SignallingError) as refused:  # a real offer: the engine refuses, not the SDP check
            await offer_client(http, server.url, CameraTrack(), params={"temporal": {"bank": 1}})
        assert refused.value.status == 422 and refused.value.body["field"] == "temporal.bank"
        assert not server.service.scheduler.sessions
        motion = {"temporal": {"motion_strength": [0.3, 0.6]}}
        client = await offer_client(http, server.url, CameraTrack(), params=motion)
        await client.wait_connected()
        url = f"{server.url}/api/sessions/{client.session_id}"
        async with http.patch(url, json={"temporal": {"bank": 2}}) as response:
            body = await response.json()
        assert response.status == 422 and body["field"] == "temporal.bank" and "--feature-bank" in body["error"]
        async with http.get(url) as response:
            described = await response.json()
        assert described["params"]["temporal"] == {"bank": 0, "weight": 1.0, "motion_strength": [0.3, 0.6]}
        while client.channel.readyState != "open":  # connected (ICE, DTLS) comes before SCTP has opened it
            await asyncio.sleep(0.05)
        client.channel.send(json.dumps({"temporal": {"bank": 1}, "request_id": 3}))
        error = await client.wait_message(lambda m: m.get("request_id") == 3)
        assert error["type"] == "error" and error["field"] == "temporal.bank"
        # sent together, the three would merge into one update (server.control): the one the engine
        # cannot serve is refused alone, before it merges, and the others apply
        for request_id, change in ((4, {"prompt": "a fox"}), (5, {"temporal": {"bank": 1}}), (6, {"strength": 0.3})):
            client.channel.send(json.dumps({**change, "request_id": request_id}))
        answers = [await client.wait_message(lambda m, i=i: m.get("request_id") == i) for i in (4, 5, 6)]  # type: ignore[misc]
        assert [a["type"] for a in answers] == ["ack", "error", "ack"], answers
        assert answers[1]["field"] == "temporal.bank"
        assert answers[2]["params"]["prompt"] == "a fox" and answers[2]["params"]["strength"] == 0.3
        await client.close()


async def test_a_server_with_the_feature_bank_applies_it_live(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, feature_bank=True) as server:
        client = await offer_client(http, server.url, CameraTrack(), params={"temporal": {"bank": 1}})
        await client.wait_connected()
        assert client.received is not None
        await client.received.wait_for(3)
        client.channel.send(json.dumps({"temporal": {"bank": 2, "weight": 1.5}, "request_id": 4}))
        ack = await client.wait_message(lambda m: m.get("request_id") == 4)
        assert ack["type"] == "ack" and ack["params"]["temporal"]["bank"] == 2
        count = len(client.received.times)
        await client.received.wait_for(count + 3)
        session = server.service.scheduler.sessions[client.session_id]
        assert session.stream.bank is not None and session.stream.bank.frames == 2 and session.stream.bank.nbytes > 0
        await client.close()
