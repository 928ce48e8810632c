"""Recording live sessions: a real aiortc publisher with `record` on, the recording fetched over HTTP and
decoded with PyAV (its frames, its size), the timeline of param changes (PATCH and data channel), the end by
`record: false` and by the session's end, and bad values refused naming the field."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from livediff.jobs.settings import JobSettings
from tests.jobs_support import webhook_receiver
from tests.server_fixtures import CameraTrack, frames_back, metric_value, offer_client, running_server, whip_publish

pytestmark = [pytest.mark.usefixtures("loopback_ice"), pytest.mark.timeout(180)]


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def settings() -> JobSettings:
    return JobSettings(webhook_secret=SECRET, poll_s=0.2)


async def wait_recorded(http: aiohttp.ClientSession, url: str, rec_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{url}/api/recordings/{rec_id}") as response:
            record = await response.json()
            assert response.status == 200, record
        if record["state"] != "recording":
            return record
        assert time.monotonic() < deadline, f"recording {rec_id} never ended: {record}"
        await asyncio.sleep(0.1)


async def fetch(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with http.get(url, headers=headers) as response:
        return response.status, await response.read()


def decode(data: bytes) -> list[tuple[int, int]]:
    with av.open(io.BytesIO(data)) as container:
        return [(frame.width, frame.height) for frame in container.decode(video=0)]


async def test_a_session_records_its_output_input_and_param_timeline(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, jobs=settings(), state_dir=tmp_path / "state") as server:
        camera = CameraTrack(width=96, height=80)
        client = await offer_client(http, server.url, camera, params={"seed": 3, "record": True, "record_input": True})
        await frames_back(client, 10)
        session_url = f"{server.url}/api/sessions/{client.session_id}"
        async with http.patch(session_url, json={"strength": 0.7}) as response:
            ack = await response.json()
            assert response.status == 200, ack
        rec_id = ack["recording"]
        assert rec_id and rec_id.startswith("rec_")
        while client.channel.readyState != "open":
            await asyncio.sleep(0.05)
        client.channel.send(json.dumps({"prompt": "neon city", "request_id": 1}))
        assert (await client.wait_message(lambda m: m.get("request_id") == 1))["type"] == "ack"
        client.channel.send(json.dumps({"record": 5, "request_id": 2}))
        error = await client.wait_message(lambda m: m.get("request_id") == 2)
        assert error["type"] == "error" and error["field"] == "record"
        await client.received.wait_for(len(client.received.times) + 5)  # type: ignore[union-attr]
        async with http.get(f"{server.url}/api/recordings/{rec_id}/result") as response:
            assert response.status == 409  # still recording

        async with http.patch(session_url, json={"record": False}) as response:
            ack = await response.json()
            assert response.status == 200 and ack["recording"] is None, ack
        record = await wait_recorded(http, server.url, rec_id)
        assert record["state"] == "complete" and record["session_id"] == client.session_id, record
        changes = [entry["changes"] for entry in record["timeline"]]
        assert changes[0]["params"]["seed"] == 3
        assert {"strength": 0.7} in changes and {"prompt": "neon city"} in changes, changes
        times = [entry["t"] for entry in record["timeline"]]
        assert times == sorted(times)

        status, output = await fetch(http, f"{server.url}/api/recordings/{rec_id}/result")
        assert status == 200
        sizes = decode(output)
        assert len(sizes) > 0 and set(sizes) == {(64, 64)}, sizes[:3]
        assert record["streams"]["output"]["frames"] == len(sizes)
        status, input_mp4 = await fetch(http, f"{server.url}/api/recordings/{rec_id}/result?stream=input")
        assert status == 200
        sizes = decode(input_mp4)
        assert len(sizes) > 0 and set(sizes) == {(96, 80)}, sizes[:3]
        status, part = await fetch(http, f"{server.url}/api/recordings/{rec_id}/result", {"Range": "bytes=0-99"})
        assert status == 206 and part == output[:100]

        async with http.get(f"{server.url}/api/recordings") as response:
            listed = (await response.json())["recordings"]
        assert [r["id"] for r in listed] == [rec_id]
        dropped = await metric_value(http, server.url, 'livediff_recording_frames_dropped_total{stream="output"}')
        assert dropped == record["streams"]["output"]["dropped"]
        await client.close()


async def test_a_recording_is_finished_when_its_session_ends(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, jobs=settings(), state_dir=tmp_path / "state") as server:
        client = await whip_publish(http, server.url, sendrecv=True, query="?record=1&strength=0.6")
        await frames_back(client, 8)
        recordings = server.service.recordings
        assert recordings is not None
        rec_id = recordings.active[client.session_id].id
        async with http.delete(f"{server.url}/api/sessions/{client.session_id}") as response:
            assert response.status == 200
        record = await wait_recorded(http, server.url, rec_id)
        assert record["state"] == "complete" and "input" not in record["streams"], record
        status, output = await fetch(http, f"{server.url}/api/recordings/{rec_id}/result")
        assert status == 200 and len(decode(output)) > 0
        async with http.get(f"{server.url}/api/recordings/{rec_id}/result?stream=input") as response:
            assert response.status == 404 and (await response.json())["field"] == "stream"
        await client.close()


async def test_bad_record_values_are_refused_naming_the_field(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    async with running_server(tiny_parts, size=64, jobs=settings(), state_dir=tmp_path / "state") as server:
        body = {"sdp": "v=0\r\n", "type": "offer", "params": {"record": 5}}
        async with http.post(f"{server.url}/offer", json=body) as response:
            answer = await response.json()
            assert response.status == 422 and answer["field"] == "record", answer
        client = await offer_client(http, server.url, CameraTrack())
        await frames_back(client, 3)
        async with http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"record": "yes"}) as response:
            answer = await response.json()
            assert response.status == 422 and answer["field"] == "record", answer
        async with http.get(f"{server.url}/api/recordings/rec_0123") as response:
            assert response.status == 404
        async with http.get(f"{server.url}/api/recordings/../../etc/passwd") as response:
            assert response.status == 404
        # started by PATCH, still running when the server shuts down: finished all the same
        async with http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"record": True}) as response:
            ack = await response.json()
            assert response.status == 200 and ack["recording"], ack
        rec_id = ack["recording"]
        await client.received.wait_for(len(client.received.times) + 5)  # type: ignore[union-attr]
        await client.close()
    folder = tmp_path / "state" / "jobs" / rec_id
    record = json.loads((folder / "recording.json").read_text())
    assert record["state"] == "complete" and record["streams"]["output"]["frames"] > 0, record
    assert len(decode((folder / "output.mp4").read_bytes())) == record["streams"]["output"]["frames"]
    async with running_server(tiny_parts, size=64) as server:  # no jobs: no storage to record into
        async with http.post(f"{server.url}/offer", json={**body, "params": {"record": True}}) as response:
            answer = await response.json()
            assert response.status == 422 and answer["field"] == "record", answer


async def test_recordings_send_signed_webhooks_and_are_deleted(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    async with webhook_receiver(SECRET) as receiver:
        jobs = settings().replace(recordings_callback_url=receiver.url, webhook_allow_private=True)
        async with running_server(tiny_parts, size=64, jobs=jobs, state_dir=tmp_path / "state") as server:
            client = await offer_client(http, server.url, CameraTrack(), params={"record": True})
            await frames_back(client, 5)
            recordings = server.service.recordings
            assert recordings is not None
            rec_id = recordings.active[client.session_id].id
            await receiver.wait_for(rec_id, "recording")
            async with http.delete(f"{server.url}/api/recordings/{rec_id}") as response:
                assert response.status == 409 and "record: false" in (await response.json())["error"]
            async with http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"record": False}) as r:
                assert r.status == 200, await r.text()
            record = await wait_recorded(http, server.url, rec_id)
            await receiver.wait_for(rec_id, "complete")
            assert (await fetch(http, f"{server.url}/api/recordings/{rec_id}/result"))[0] == 200
            while True:  # its record lists each event and attempt once the receiver's answer is stored
                async with http.get(f"{server.url}/api/recordings/{rec_id}") as response:
                    hooks = (await response.json())["webhooks"]
                if len(hooks) == 2 and all(h["delivered_at"] for h in hooks):
                    break
                await asyncio.sleep(0.05)
            assert [h["type"] for h in hooks] == ["recording.recording", "recording.complete"]
            assert all(h["attempts"][0]["status"] == 204 for h in hooks), hooks

            async with http.delete(f"{server.url}/api/recordings/{rec_id}") as response:
                assert response.status == 200 and await response.json() == {"id": rec_id, "state": "deleted"}
            assert not (tmp_path / "state" / "jobs" / rec_id).exists()
            for method in (http.get, http.delete):
                async with method(f"{server.url}/api/recordings/{rec_id}") as response:
                    assert response.status == 404
            await receiver.wait_for(rec_id, "deleted")
            assert receiver.states(rec_id) == ["recording", "complete", "deleted"] and receiver.rejected == 0
            kinds = [payload["type"] for _, payload in receiver.verified]
            assert kinds == ["recording.recording", "recording.complete", "recording.deleted"]
            complete = next(p["data"] for _, p in receiver.verified if p["type"] == "recording.complete")
            assert complete["streams"]["output"]["frames"] == record["streams"]["output"]["frames"] > 0
            await client.close()


async def test_retention_deletes_finished_jobs_and_recordings(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    from tests.clips import make_clip
    from tests.jobs_support import form, wait_state

    state = tmp_path / "state"
    async with running_server(tiny_parts, size=64, jobs=settings().replace(retention_s=6.0), state_dir=state) as server:
        async with http.post(f"{server.url}/api/jobs", data=form(make_clip(tmp_path / "in.mp4", frames=4))) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["id"]
        client = await offer_client(http, server.url, CameraTrack(), params={"record": True})
        await frames_back(client, 3)
        async with http.patch(f"{server.url}/api/sessions/{client.session_id}", json={"record": False}) as r:
            assert r.status == 200
        rec_id = next(iter(await asyncio.to_thread(server.service.recordings.list)))["id"]  # type: ignore[union-attr]
        job = await wait_state(http, server.url, job_id, ("complete", "failed"))
        assert job["state"] == "complete" and (state / "jobs" / job_id / "result.mp4").is_file()

        deadline = time.monotonic() + 60  # 6 s after each ended, a sweep (every 1 s) takes it away
        gone: dict[str, bool] = {}
        while len(gone) < 2:
            for kind, some_id in (("jobs", job_id), ("recordings", rec_id)):
                async with http.get(f"{server.url}/api/{kind}/{some_id}") as response:
                    if response.status == 404:
                        gone[kind] = True
            assert time.monotonic() < deadline, f"still there after 60 s: {gone}"
            await asyncio.sleep(0.2)
        assert not (state / "jobs" / job_id).exists() and not (state / "jobs" / rec_id).exists()
        async with http.get(f"{server.url}/api/jobs") as response:
            assert (await response.json())["jobs"] == []
        await client.close()


def test_frames_that_find_the_encoder_busy_are_dropped_and_counted(tmp_path: Path) -> None:
    from livediff.jobs.recording import QUEUE_FRAMES, Track

    drops: list[int] = []
    track = Track(tmp_path / "output.mp4", "output", lambda: drops.append(1))
    frame = av.VideoFrame.from_ndarray(np.full((1080, 1920, 3), 90, np.uint8), format="rgb24")
    offered = QUEUE_FRAMES * 6
    for _ in range(offered):  # far faster than libx264 opens and encodes 1080p: the queue fills
        track.offer(frame)
    track.finish()
    assert track.error is None
    assert track.dropped > 0 and len(drops) == track.dropped
    assert track.frames + track.dropped == offered
    assert len(decode((tmp_path / "output.mp4").read_bytes())) == track.frames
    assert not (tmp_path / "output.mp4.part").exists()


def test_retention_and_recording_webhook_flags() -> None:
    from livediff.cli import build_parser
    from livediff.errors import ConfigError
    from livediff.jobs.flags import jobs_settings

    def parsed(*argv: str) -> JobSettings:
        return jobs_settings(build_parser().parse_args(["serve", *argv]))

    assert parsed().retention_s == 0 and parsed().recordings_callback_url == ""
    week = parsed("--jobs-retention", "604800")
    assert week.retention_s == 604800 and week.sweep_s == 3600  # a tenth, at most an hour
    hook = "http://127.0.0.1:9000/recordings"
    assert parsed("--recordings-callback-url", hook, "--webhook-allow-private").recordings_callback_url == hook
    with pytest.raises(ConfigError, match="--recordings-callback-url: .*loopback address 127.0.0.1"):
        parsed("--recordings-callback-url", hook)
    with pytest.raises(ConfigError, match="--recordings-callback-url: the URL must be an http"):
        parsed("--recordings-callback-url", "ftp://example.com/x")


RECORD_THEN_WAIT = """
import sys, time
from pathlib import Path
import av, numpy as np
from livediff.jobs.recording import Recordings
from livediff.jobs.storage import LocalStorage

recordings = Recordings(LocalStorage(Path(sys.argv[1])))
recording = recordings.start("sess_1", {"prompt": "x"}, with_input=True)
for i in range(40):
    image = np.full((64, 64, 3), i * 5, np.uint8)
    for track in recording.tracks.values():
        track.offer(av.VideoFrame.from_ndarray(image, format="rgb24"))
while not all((t.part.is_file() and t.frames >= 30) for t in recording.tracks.values()):
    time.sleep(0.05)
print(recording.id, flush=True)
time.sleep(600)  # SIGKILLed here, mid-recording
"""


async def test_a_recording_whose_process_was_killed_fails_at_the_next_start(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import subprocess
    import sys

    state = tmp_path / "state"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", RECORD_THEN_WAIT, str(state / "jobs")], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=root)  # fmt: skip
    try:
        assert child.stdout is not None
        rec_id = child.stdout.readline().strip()
        assert rec_id.startswith("rec_"), rec_id
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    folder = state / "jobs" / rec_id
    assert json.loads((folder / "recording.json").read_text())["state"] == "recording"
    assert (folder / "output.mp4.part").is_file() and not (folder / "output.mp4").exists()

    async with webhook_receiver(SECRET) as receiver:
        jobs = settings().replace(recordings_callback_url=receiver.url, webhook_allow_private=True, retention_s=3.0)
        async with running_server(tiny_parts, size=64, jobs=jobs, state_dir=state) as server:
            await receiver.wait_for(rec_id, "failed")
            async with http.get(f"{server.url}/api/recordings/{rec_id}") as response:
                record = await response.json()
            assert record["state"] == "failed", record
            assert f"pid {child.pid}" in record["error"] and record["ended_at"] >= record["started_at"]
            assert not list(folder.glob("*.part"))
            failed = next(p["data"] for _, p in receiver.verified if p["type"] == "recording.failed")
            assert failed["id"] == rec_id and failed["error"] == record["error"]
            deadline = time.monotonic() + 60  # then swept by retention as any failed recording
            while True:
                async with http.get(f"{server.url}/api/recordings/{rec_id}") as response:
                    if response.status == 404:
                        break
                assert time.monotonic() < deadline, "the failed recording was never swept"
                await asyncio.sleep(0.2)
            await receiver.wait_for(rec_id, "deleted")
            assert receiver.states(rec_id) == ["failed", "deleted"] and receiver.rejected == 0
            assert not folder.exists()


def test_a_live_owner_is_not_taken_for_a_dead_one(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from livediff.jobs.recording import owner_gone, this_owner

    assert not owner_gone(this_owner())
    assert owner_gone({**this_owner(), "pid_start": "1"})  # our pid, another process's start: a reused pid
    assert not owner_gone({**this_owner(), "host": "another-host", "pid": 1})  # another host's: not judged here
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_gone({**this_owner(), "pid": int(ended.stdout)}) and int(ended.stdout) != os.getpid()
