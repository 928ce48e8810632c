"""Jobs in the cluster end to end: a local Ray cluster (a head and two worker nodes, one replica each), Ray Serve,
the tiny model, a real PostgreSQL store shared by the replicas, a real webhook receiver verifying every signature.

Clips go in at the entry point (streamed through the gateway to a replica, larger than the server's signalling
body limit), the replicas' workers claim them from the shared store (`--max-jobs 1` each: the second replica
takes what the first has no room for), results and statuses come back through the entry point from any replica,
a cancel reaches the replica running the job, an upload over `--jobs-max-bytes` is refused while it streams,
a live session's recording is listed, served and deleted at the entry point, and a replica killed (SIGKILL)
mid-job leaves the job to the other, which makes its one result.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.clips import make_clip, video_facts
from tests.jobs_support import form, wait_state, webhook_receiver
from tests.postgres_support import postgres_cluster, postgres_url  # noqa: F401 - fixtures
from tests.server_fixtures import CameraTrack, frames_back, offer_client
from tests.tools import import_or_skip

ray = import_or_skip("ray", "pip install 'livediff[cluster]'")
serve = import_or_skip("ray.serve", "pip install 'livediff[cluster]'")

from livediff.cluster.run import deploy  # noqa: E402
from livediff.cluster.settings import ClusterSettings  # noqa: E402
from livediff.config import EngineSettings, ServerSettings, StreamParams  # noqa: E402
from livediff.jobs.settings import JobSettings  # noqa: E402
from livediff.jobs.store import JobStore  # noqa: E402
from livediff.transport.loopback import free_port  # noqa: E402

# a Ray cluster (~15 s), two replicas loading the model (~10-20 s each) and five clips on a shared 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480), pytest.mark.usefixtures("loopback_ice")]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MAX_BYTES = 400_000
BODY_LIMIT = 12 * 1024
"""The signalling body limit: every clip here is larger, so only the streamed upload path can carry it."""


@pytest.fixture()
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[str]:  # noqa: F811 - the fixture
    from ray.cluster_utils import Cluster

    local = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):  # one CPU each: one replica per worker node
            local.add_node(num_cpus=1)
        ray.init(address=local.address, log_to_driver=False)
        port = free_port()
        engine = EngineSettings(model="tiny", height=64, width=64, backend="torch", device="cpu")
        server = ServerSettings(host="127.0.0.1", port=port, cpu_threads=1, max_body_bytes=BODY_LIMIT,
                                state_dir=tmp_path / "state", ice_loopback=True)  # fmt: skip
        jobs = JobSettings(db=postgres_url, storage=tmp_path / "files", webhook_secret=SECRET, max_jobs=1, batch=1,
                           webhook_allow_private=True, poll_s=0.2, lease_s=2.0, max_bytes=MAX_BYTES)  # fmt: skip
        cluster = ClusterSettings(min_replicas=2, max_replicas=2, stats_period_s=0.5)
        deploy(engine, server, StreamParams(), cluster, "HeadOnly", jobs)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        local.shutdown()


async def ready_pids(http: aiohttp.ClientSession, url: str) -> set[int]:
    async with http.get(url + "/readyz") as response:
        body = await response.json()
    return {r["pid"] for r in body.get("each", []) if r["ready"]}


async def submit(http: aiohttp.ClientSession, url: str, clip: Path, callback: str) -> str:
    async with http.post(f"{url}/api/jobs", data=form(clip, {"seed": 3}, callback)) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


async def test_jobs_through_the_entry_point_run_on_replicas_with_room(
    cluster: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    postgres_url: str,  # noqa: F811 - the fixture
) -> None:
    url = cluster
    for _ in range(120):
        if len(await ready_pids(http, url)) == 2:
            break
        await asyncio.sleep(0.5)
    pids = await ready_pids(http, url)
    assert len(pids) == 2, pids
    clips = [make_clip(tmp_path / f"in{i}.mp4", frames=72, size=(64, 64), rate=24) for i in range(3)]  # ~16 kB
    assert all(c.stat().st_size > BODY_LIMIT for c in clips)
    async with webhook_receiver(SECRET) as receiver:
        ids = [await submit(http, url, clip, receiver.url) for clip in clips]
        done = [await wait_state(http, url, job_id, ("complete", "failed"), timeout=300) for job_id in ids]
        assert [job["state"] for job in done] == ["complete"] * 3, done

        # one job at a time per replica: the three ran on both replicas' workers, taken from the shared store
        store = JobStore(postgres_url)
        try:
            workers = {job_id: store.get(job_id).worker for job_id in ids}  # type: ignore[union-attr]
        finally:
            store.close()
        ran_on = {int(str(worker).split(":")[1]) for worker in workers.values()}
        assert ran_on == pids, (workers, pids)

        # results through the entry point, whichever replica ran them: whole and by range
        for job_id, clip in zip(ids, clips):
            async with http.get(f"{url}/api/jobs/{job_id}/result") as response:
                assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
                whole = await response.read()
            async with http.get(f"{url}/api/jobs/{job_id}/result", headers={"Range": "bytes=10-109"}) as response:
                assert response.status == 206 and await response.read() == whole[10:110]
            (tmp_path / "out.mp4").write_bytes(whole)
            assert video_facts(tmp_path / "out.mp4")["pts"] == video_facts(clip)["pts"]

        # every state of every job reached the receiver signed with the one secret, whichever replica sent it
        for job_id in ids:
            await receiver.wait_for(job_id, "complete")
            assert receiver.states(job_id) == ["queued", "processing", "encoding", "complete"]
        assert receiver.rejected == 0

        # the list, a finished job's cancel (409), an unknown job (404): any replica answers from the store
        async with http.get(f"{url}/api/jobs?state=complete") as response:
            listed = {job["id"] for job in (await response.json())["jobs"]}
        assert set(ids) <= listed
        async with http.delete(f"{url}/api/jobs/{ids[0]}") as response:
            assert response.status == 409, await response.text()
        async with http.get(f"{url}/api/jobs/job_0123") as response:
            assert response.status == 404
        async with http.get(f"{url}/api/recordings") as response:  # recordings: the same storage, any replica
            assert response.status == 200 and (await response.json())["recordings"] == []
        async with http.delete(f"{url}/api/recordings/rec_0123") as response:
            assert response.status == 404

        # a cancel at the entry point stops the job on the replica running it
        long_clip = make_clip(tmp_path / "long.mp4", frames=600, size=(64, 64), rate=24, audio=False)
        long_id = await submit(http, url, long_clip, receiver.url)
        await wait_state(http, url, long_id, ("processing",), timeout=120)
        async with http.delete(f"{url}/api/jobs/{long_id}") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["state"] == "cancelled"
        await receiver.wait_for(long_id, "cancelled")
        async with http.get(f"{url}/api/jobs/{long_id}/result") as response:
            assert response.status == 410

        # an upload over --jobs-max-bytes: 413 naming the file, refused while it streams
        async with http.post(f"{url}/api/jobs", data=form(b"\0" * (2 * MAX_BYTES))) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 413 and body.get("field") == "file", body

        # a live session's recording, made on its replica, served and deleted through the entry point
        client = await offer_client(http, url, CameraTrack(64, 64))
        await frames_back(client, 3)
        session_url = f"{url}/api/sessions/{client.session_id}"
        async with http.patch(session_url, json={"record": True}) as response:
            rec_id = (await response.json())["recording"]
            assert response.status == 200 and rec_id, rec_id
        assert client.received is not None
        await client.received.wait_for(len(client.received.times) + 5)
        async with http.patch(session_url, json={"record": False}) as response:
            assert response.status == 200, await response.text()
        async with http.get(f"{url}/api/recordings") as response:
            listed = (await response.json())["recordings"]
        assert [(r["id"], r["state"]) for r in listed] == [(rec_id, "complete")], listed
        async with http.get(f"{url}/api/recordings/{rec_id}/result") as response:
            assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
            (tmp_path / "recorded.mp4").write_bytes(await response.read())
        assert len(video_facts(tmp_path / "recorded.mp4")["pts"]) == listed[0]["streams"]["output"]["frames"] > 0
        async with http.delete(f"{url}/api/recordings/{rec_id}") as response:
            assert response.status == 200, await response.text()
        async with http.get(f"{url}/api/recordings/{rec_id}") as response:
            assert response.status == 404
        await client.close()

        # the replica running a job is killed: after --jobs-lease the other one takes the job up again, one result
        crash_clip = make_clip(tmp_path / "crash.mp4", frames=240, size=(64, 64), rate=24, audio=False)
        crash_id = await submit(http, url, crash_clip, receiver.url)
        await wait_state(http, url, crash_id, ("processing",), timeout=120)
        killed = worker_pid(postgres_url, crash_id)
        os.kill(killed, signal.SIGKILL)
        job = await finished(http, url, crash_id)
        assert job["state"] == "complete" and job["attempt"] == 2, job
        assert worker_pid(postgres_url, crash_id) in pids - {killed}
        status, whole = await result(http, url, crash_id)
        assert status == 200
        (tmp_path / "out.mp4").write_bytes(whole)
        assert video_facts(tmp_path / "out.mp4")["pts"] == video_facts(crash_clip)["pts"]
        await receiver.wait_for(crash_id, "complete")
        states = receiver.states(crash_id)
        assert states[0] == "queued" and states[-1] == "complete" and states.count("complete") == 1, states
        assert "queued" in states[1:] and states.count("processing") >= 2, states  # taken back, claimed again


def worker_pid(postgres_url: str, job_id: str) -> int:  # noqa: F811 - not the fixture
    store = JobStore(postgres_url)
    try:
        job = store.get(job_id)
    finally:
        store.close()
    assert job is not None and job.worker is not None, job
    return int(job.worker.split(":")[1])


async def finished(http: aiohttp.ClientSession, url: str, job_id: str, timeout: float = 240) -> dict[str, Any]:
    """The job once complete or failed; a 503 while Serve notices a dead replica is asked again (Retry-After)."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{url}/api/jobs/{job_id}") as response:
            body: dict[str, Any] = await response.json()
            assert response.status in (200, 503), body
        if response.status == 200 and body["state"] in ("complete", "failed"):
            return body
        assert time.monotonic() < deadline, f"job {job_id}: {body}"
        await asyncio.sleep(0.2)


async def result(http: aiohttp.ClientSession, url: str, job_id: str, timeout: float = 120) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{url}/api/jobs/{job_id}/result") as response:
            data = await response.read()
            if response.status != 503 or time.monotonic() > deadline:
                return response.status, data
        await asyncio.sleep(0.5)
