"""The `controlnet` live param over REST, the data channel, /offer and WHIP query strings: validated and
named when wrong, refused by a server without ControlNets, loaded off the frame path and announced,
applied live; the session's control image."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

import cv2
import numpy as np
import pytest

from livediff.config import ControlParams, StreamParams
from livediff.server.controlnets import _announce, follow_loads
from livediff.server.params import ParamError, parse_query, parse_update
from livediff.session import Session
from livediff.transport.client import SignallingError
from tests.server_fixtures import CameraTrack, offer_client, running_server, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(180)]

CONTROLNETS = (("edges", "tiny"), ("structure", "tiny"))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"controlnet": [{"name": "edges", "scale": 2.5}]}, "controlnet[0].scale"),
        ({"controlnet": [{"name": "edges", "scale": -1}]}, "controlnet[0].scale"),
        ({"controlnet": [{"name": "edges", "scale": "strong"}]}, "controlnet[0].scale"),
        ({"controlnet": [{"name": "edges"}, {"name": "edges", "preprocessor": "pose"}]}, "controlnet[1].preprocessor"),
        ({"controlnet": [{"name": "edges", "start": 0.8, "end": 0.4}]}, "controlnet[0].end"),
        ({"controlnet": [{"name": "edges", "weight": 1}]}, "controlnet[0].weight"),
        ({"controlnet": [{"preprocessor": "canny"}]}, "controlnet[0].name"),
        ({"controlnet": [{"name": 3}]}, "controlnet[0].name"),
        ({"controlnet": ["edges"]}, "controlnet[0]"),
        ({"controlnet": {"name": "edges"}}, "controlnet"),
        ({"controlnet": [{"name": "edges"}] * 5}, "controlnet"),
    ],
)
def test_bad_controlnet_values_name_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ParamError) as error:
        parse_update(StreamParams(), bad)
    assert error.value.field == field


def test_controlnet_params_from_json_and_query_strings() -> None:
    params, _ = parse_update(StreamParams(), {"controlnet": [{"name": "edges", "scale": 0.5, "end": 0.5}]})
    assert params.controlnet == (ControlParams("edges", "canny", 0.5, 0.0, 0.5),)
    assert parse_update(params, {"controlnet": None})[0].controlnet == ()
    assert parse_update(params, {"controlnet": []})[0].controlnet == ()
    query = parse_query({"controlnet": "edges:canny:0.8,structure:depth"})
    assert query == {"controlnet": [{"name": "edges", "preprocessor": "canny", "scale": 0.8},
                                    {"name": "structure", "preprocessor": "depth"}]}  # fmt: skip
    with pytest.raises(ParamError) as error:
        parse_query({"controlnet": "edges:canny:loud"})
    assert error.value.field == "controlnet" and "NAME[:PREPROCESSOR[:SCALE" in error.value.message


async def test_a_server_without_controlnets_refuses_them_by_name(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        assert server.service.describe()["controlnets"] == []
        with pytest.raises(SignallingError) as refused:
            await offer_client(http, server.url, CameraTrack(), params={"controlnet": [{"name": "edges"}]})
        assert refused.value.status == 422 and refused.value.body["field"] == "controlnet[0].name"
        assert "--controlnet NAME=SOURCE" in refused.value.body["error"]
        assert not server.service.scheduler.sessions


async def test_controlnets_load_are_announced_and_apply_live(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, controlnets=CONTROLNETS, depth_model="tiny") as server:
        info = server.service.describe()
        assert info["controlnets"] == ["edges", "structure"]
        assert info["preprocessors"] == ["canny", "depth", "previous"]
        client = await offer_client(http, server.url, CameraTrack(),
                                    params={"controlnet": [{"name": "edges", "scale": 0.8}]})  # fmt: skip
        await client.wait_connected()
        ready = await client.wait_message(lambda m: m.get("type") == "controlnet", timeout=60)
        assert ready == {"type": "controlnet", "name": "edges", "state": "ready"}
        assert client.received is not None
        await client.received.wait_for(3)
        url = f"{server.url}/api/sessions/{client.session_id}"
        async with http.get(url) as response:
            described = await response.json()
        assert described["controlnet_state"] == {"edges": "ready"}
        assert described["params"]["controlnet"] == [
            {"name": "edges", "preprocessor": "canny", "scale": 0.8, "start": 0.0, "end": 1.0}
        ]
        async with http.get(url + "/control.jpg") as response:
            assert response.status == 200 and response.content_type == "image/jpeg"
            preview = cv2.imdecode(np.frombuffer(await response.read(), np.uint8), cv2.IMREAD_COLOR)
        assert preview.shape == (64, 64, 3)  # the engine's size (under the preview's 160)

        # a live switch to another ControlNet with the depth image: it loads, and says so
        client.channel.send(json.dumps({"request_id": 5, "controlnet": [
            {"name": "structure", "preprocessor": "depth", "scale": 0.5}]}))  # fmt: skip
        ack = await client.wait_message(lambda m: m.get("request_id") == 5)
        assert ack["type"] == "ack" and set(ack["controlnet_state"]) == {"structure", "depth model"}
        for name in ("structure", "depth model"):
            if ack["controlnet_state"][name] == "loading":
                message = await client.wait_message(lambda m, n=name: m.get("name") == n, timeout=60)  # type: ignore[misc]
                assert message["state"] == "ready"
        count = len(client.received.times)
        await client.received.wait_for(count + 3)
        session = server.service.scheduler.sessions[client.session_id]
        assert session.stream.params.controlnet == (ControlParams("structure", "depth", 0.5),)

        # bad values are answered naming the field, over REST and the data channel; the session keeps its params
        for bad, field in (([{"name": "nope"}], "controlnet[0].name"), ([{"name": "edges", "scale": 3}],
                           "controlnet[0].scale"), ([{"name": "edges", "preprocessor": "pose"}],
                           "controlnet[0].preprocessor")):  # fmt: skip
            async with http.patch(url, json={"controlnet": bad}) as response:
                body = await response.json()
            assert response.status == 422 and body["field"] == field, body
        client.channel.send(json.dumps({"request_id": 6, "controlnet": [{"name": "nope"}]}))
        error = await client.wait_message(lambda m: m.get("request_id") == 6)
        assert error["type"] == "error" and error["field"] == "controlnet[0].name"
        assert "edges, structure" in error["error"]
        assert session.stream.params.controlnet == (ControlParams("structure", "depth", 0.5),)

        # off again: no control image is made any more
        async with http.patch(url, json={"controlnet": []}) as response:
            assert response.status == 200 and (await response.json())["controlnet_state"] == {}
        count = len(client.received.times)
        await client.received.wait_for(count + 3)
        async with http.get(url + "/control.jpg") as response:
            assert response.status == 204 and not await response.read()
        await client.close()


async def test_a_whip_publisher_names_its_controlnet_in_the_query(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, controlnets=CONTROLNETS) as server:
        client = await whip_publish(http, server.url, query="?controlnet=edges:previous:1.2")
        session = server.service.scheduler.sessions[client.session_id]
        assert session.params.controlnet == (ControlParams("edges", "previous", 1.2),)
        assert session.controlnet_state["edges"] in ("loading", "ready")
        await client.close()


async def test_a_session_that_ends_while_waiting_leaves_the_load_to_the_others() -> None:
    """Ending a session cancels its tasks; a load it waited on (shared by every session naming that
    ControlNet, maybe still queued) goes on."""
    load: Future[object] = Future()  # a load queued behind another: not running yet
    session = Session(params=StreamParams(controlnet=(ControlParams("edges"),)))
    session.controlnet_state = {"edges": "loading"}
    session.spawn(_announce(session, "edges", load), "controlnet-edges")
    await asyncio.sleep(0.05)
    await session.close()
    assert not load.cancelled() and load.set_running_or_notify_cancel()


async def test_a_load_that_finishes_while_the_worker_answers_reads_ready() -> None:
    """The engine says a load is under way; it ends before the event loop reads the answer. The
    session's state reads the load as it is then (`ready`), never as `failed`."""
    load: Future[object] = Future()
    failed: Future[object] = Future()

    class Engine:
        def control_loads(self, params: StreamParams) -> dict[tuple[str, str], Future[object]]:
            return {("controlnet", "edges"): load, ("preprocessor", "depth"): failed}

    class FinishingWorker:  # the loader thread finishes both loads while the event loop waits on the worker
        engine = Engine()

        async def run_on_worker(self, fn, *args):  # type: ignore[no-untyped-def]
            answer = fn(*args)
            load.set_result(object())
            failed.set_exception(OSError("no such file"))
            return answer

    session = Session(params=StreamParams(controlnet=(ControlParams("edges", "depth"),)))
    await follow_loads(FinishingWorker(), session)  # type: ignore[arg-type]
    assert session.controlnet_state == {"edges": "ready", "depth model": "failed"}
    assert not session._tasks  # nothing left to announce: both are done
