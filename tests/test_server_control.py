"""Live control over the data channel and the REST API; two sessions batched into one step."""

from __future__ import annotations

import asyncio
import json
import threading
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
    until,
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
        second = await offer_client(
            http, server.url, CameraTrack(solid=still), params={"prompt": "zebra stripes everywhere", "strength": 1.0}
        )
        await asyncio.gather(first.wait_connected(), second.wait_connected())
        await asyncio.gather(first.received.wait_for(8), second.received.wait_for(8))  # type: ignore[union-attr]
        # A fast model serves each frame as it comes (nothing waits to fill a batch); frames of both
        # sessions meet in one step when they arrive while the worker is busy. Keep the worker busy
        # for half a second, as a slow model step would: both inboxes fill and the next step takes both.
        await server.service.scheduler.run_on_worker(time.sleep, 0.5)
        await asyncio.gather(
            first.received.wait_for(len(first.received.times) + 2),  # type: ignore[union-attr]
            second.received.wait_for(len(second.received.times) + 2),
        )  # type: ignore[union-attr]
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
        for bad, field in (
            ({"strength": 0}, "strength"),
            ({"steps": 9}, "steps"),
            ({"seed": "x"}, "seed"),
            ({"nope": 1}, "nope"),
            ({"t_index_list": [1, 500]}, "t_index_list"),
            ({"blend": {"weight": 2}}, "blend.weight"),
            ({"guidance": 50}, "guidance"),
        ):
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


# -- a session's control messages under load (issue 17.1) and malformed messages (12.4) -------------


async def open_channel(client) -> None:  # type: ignore[no-untyped-def]
    while client.channel.readyState != "open":
        await asyncio.sleep(0.05)


def count_updates(server) -> list[float]:  # type: ignore[no-untyped-def]
    """Record when each engine update of the server's scheduler starts (the real update still runs)."""
    scheduler = server.service.scheduler
    real = scheduler.update
    starts: list[float] = []

    async def update(session, params):  # type: ignore[no-untyped-def]
        starts.append(time.monotonic())
        return await real(session, params)

    scheduler.update = update
    return starts


def waiting(session) -> int:  # type: ignore[no-untyped-def]
    control = getattr(session, "control", None)
    return control.waiting if control is not None else 0


def answers(client, kinds=("ack", "superseded", "error")) -> list[dict]:  # type: ignore[no-untyped-def]
    return [m for m in client.messages if m.get("type") in kinds]


async def test_a_burst_of_control_messages_is_merged_and_every_message_answered(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = await offer_client(http, server.url, CameraTrack(fps=30))
        await client.wait_connected()
        await open_channel(client)
        session = server.service.scheduler.sessions[client.session_id]
        updates = count_updates(server)
        most_tasks = most_waiting = 0
        count = 500
        for i in range(count):
            client.channel.send(json.dumps({"prompt": f"prompt {i}", "request_id": i}))
            if i % 50 == 49:
                await asyncio.sleep(0)  # the client's SCTP sends; the server reads while we go on
            most_tasks = max(most_tasks, len(session._tasks))
            most_waiting = max(most_waiting, waiting(session))
        client.channel.send(json.dumps({"strength": 0.8, "request_id": "strength"}))
        client.channel.send(json.dumps({"prompt": "the newest prompt", "request_id": "newest"}))
        deadline = time.monotonic() + 30
        while len(answers(client)) < count + 2 and time.monotonic() < deadline:
            most_tasks = max(most_tasks, len(session._tasks))
            most_waiting = max(most_waiting, waiting(session))
            await asyncio.sleep(0.01)
        got = answers(client)
        kinds = {kind: sum(m["type"] == kind for m in got) for kind in ("ack", "superseded", "error")}
        assert len(got) == count + 2, f"{len(got)} answers to {count + 2} messages: {kinds}"
        assert len({m["request_id"] for m in got}) == count + 2, "a message was answered twice"
        assert kinds["error"] == 0 and kinds["superseded"] > 0, kinds
        newest = next(m for m in got if m["request_id"] == "newest")
        assert newest["type"] == "ack" and newest["params"]["prompt"] == "the newest prompt"
        strength = next(m for m in got if m["request_id"] == "strength")
        assert strength["type"] == "ack", "a strength change was lost behind a later prompt change"
        assert session.params.prompt == "the newest prompt" and session.params.strength == 0.8
        for m in got:  # superseded messages name the message that overwrote them
            if m["type"] == "superseded":
                assert m["by"] not in (None, m["request_id"])
        # one engine update per batch of merged messages, not per message; nothing piles up per message
        assert len(updates) <= kinds["ack"], (len(updates), kinds)
        assert len(updates) < count / 2, f"{len(updates)} engine updates for {count} prompt messages"
        assert most_tasks <= 8, f"{most_tasks} session tasks at once: one per message?"
        assert most_waiting <= 16, f"{most_waiting} messages waiting at once"
        assert client.received is not None
        frames = len(client.received.times)
        await client.received.wait_for(frames + 5)  # frames keep flowing
        await client.close()


async def test_newest_values_apply_within_two_updates_and_patch_does_not_wait_behind_a_burst(  # type: ignore[no-untyped-def]
    tiny_parts, http
) -> None:
    async with running_server(tiny_parts, size=64) as server:
        client = await offer_client(http, server.url, CameraTrack(fps=30))
        await client.wait_connected()
        await open_channel(client)
        session = server.service.scheduler.sessions[client.session_id]
        updates = count_updates(server)
        # The worker is held (a slow engine step) until the test lets it go: the first message's
        # update waits for it, and every message that comes meanwhile is merged into the one
        # pending update. Events, not durations: a loaded machine only makes it all slower.
        holding, release = threading.Event(), threading.Event()

        def hold_worker() -> None:
            holding.set()
            release.wait(120)

        busy = asyncio.ensure_future(server.service.scheduler.run_on_worker(hold_worker))
        try:
            await until(holding.is_set, 30, "the worker to be held")
            client.channel.send(json.dumps({"strength": 0.3, "request_id": "first"}))
            for i in range(100):
                client.channel.send(json.dumps({"prompt": f"burst {i}", "request_id": i}))
            client.channel.send(json.dumps({"blend": {"prompt": "a blend"}, "request_id": "blend prompt"}))
            client.channel.send(json.dumps({"blend": {"weight": 0.25}, "request_id": "blend weight"}))
            await until(lambda: len(answers(client)) >= 99, 60, "99 superseded answers while the update waited")
            n_before = len(updates)
            patch = asyncio.ensure_future(
                http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"steps": 2})
            )
        finally:
            release.set()
        async with await patch as response:
            body = await response.json()
            assert response.status == 200, body
        applied_with_patch = len(updates) - n_before
        await busy
        assert body["params"]["steps"] == 2 and body["params"]["prompt"] == "burst 99", body["params"]
        assert body["params"]["blend"] == {"prompt": "a blend", "weight": 0.25}
        # the first message's update (waiting for the worker) and one more, holding everything else
        assert applied_with_patch <= 2, f"PATCH waited for {applied_with_patch} engine updates"
        await until(lambda: len(answers(client)) >= 103, 60, "an answer to every message")
        got = {m["request_id"]: m for m in answers(client)}
        assert got["first"]["type"] == "ack" and got["first"]["params"]["strength"] == 0.3
        assert all(got[key]["type"] == "ack" for key in (99, "blend prompt", "blend weight"))
        assert all(got[i]["type"] == "superseded" and got[i]["by"] == i + 1 for i in range(99))
        assert session.params.steps == 2 and session.params.strength == 0.3
        await client.close()


async def test_malformed_control_messages_get_an_error_and_change_nothing(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, max_body_bytes=4096) as server:
        client = await offer_client(http, server.url, CameraTrack(fps=30), params={"prompt": "kept"})
        await client.wait_connected()
        await open_channel(client)
        session = server.service.scheduler.sessions[client.session_id]
        before = session.params
        cases = [
            (bytes([0x80, 0x81, 0x82, 0xFF, 0x00, 0x10]), "binary"),
            (json.dumps({"prompt": "binary but valid JSON"}).encode(), "binary"),
            ("x" * 5000, "over the limit of 4096"),
            (json.dumps({"prompt": "é" * 2100}, ensure_ascii=False), "over the limit of 4096"),  # 4200+ bytes
            ("[1, 2, 3]", "JSON object, got list"),
            ('"a prompt"', "JSON object, got str"),
            ("42", "JSON object, got int"),
            ("null", "JSON object, got NoneType"),
            ("{not json", "not JSON"),
        ]
        for message, _ in cases:
            client.channel.send(message)
        deadline = time.monotonic() + 10
        while len(answers(client)) < len(cases) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        errors = answers(client)
        assert len(errors) == len(cases), errors
        for (message, expected), answer in zip(cases, errors):  # the channel is ordered
            assert answer["type"] == "error" and expected in answer["error"], (message[:20], answer)
        # a text message (payload protocol 51) whose bytes are not UTF-8: no browser sends one, a
        # hand-made client can (aiortc's own send, minus the encoding); it used to end the session
        await client.pc.sctp._send(client.channel.id, 51, bytes([0x7B, 0x22, 0xC3, 0x28, 0xFF]))
        error = await client.wait_message(lambda m: m.get("type") == "error" and "UTF-8" in m["error"])
        assert "not UTF-8" in error["error"]
        assert session.params == before and not session.probe and not session.closed
        count = len(client.received.times)  # type: ignore[union-attr]
        await client.received.wait_for(count + 5)  # type: ignore[union-attr]
        fits = json.dumps({"prompt": "é" * 1000, "request_id": "fits"}, ensure_ascii=False)  # 2000+ bytes
        client.channel.send(fits)
        ack = await client.wait_message(lambda m: m.get("request_id") == "fits")
        assert ack["type"] == "ack"
        await client.close()


BACKED_UP_BYTES = 16 * 1024
"""The documented limit (docs/api.md#stats-and-clock-messages; `livediff.server.control.BACKED_UP_BYTES`)."""


async def test_stats_are_dropped_and_counted_while_the_client_does_not_read(tiny_parts, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64) as server:
        client = await offer_client(http, server.url, CameraTrack(fps=30))
        await client.wait_connected()
        await open_channel(client)
        await client.wait_message(lambda m: m["type"] == "stats")
        session = server.service.scheduler.sessions[client.session_id]
        (server_channel,) = server.service.resources[client.session_id].pc.sctp._data_channels.values()

        async def deaf(data: bytes) -> None:
            """The client's SCTP takes nothing in (a frozen tab, a congested downlink): no SACK goes back."""

        client.pc.sctp._handle_data = deaf
        sent_before = session.stats.sent
        most_buffered = 0
        for _ in range(100):  # 10 s at 30 fps: ~300 stats messages of ~270 bytes
            await asyncio.sleep(0.1)
            most_buffered = max(most_buffered, server_channel.bufferedAmount)
        sent = session.stats.sent - sent_before
        assert sent > 100, f"only {sent} frames sent while the channel was deaf"  # video keeps flowing
        assert most_buffered <= BACKED_UP_BYTES + 1024, f"{most_buffered} bytes queued in the server's channel"
        async with http.get(f"{server.url}/api/sessions/{client.session_id}") as response:
            stats = (await response.json())["stats"]
        assert stats["stats_dropped"] > 0 and stats["stats_dropped"] <= sent, stats
        await client.close()
        from livediff.server import control

        assert control.BACKED_UP_BYTES == BACKED_UP_BYTES
