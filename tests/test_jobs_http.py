"""Jobs over HTTP on a real server (tiny model, SQLite store): submit, progress, result with ranges,
idempotency keys (also concurrent), cancel, signed webhooks to a real receiver, and every bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from livediff.jobs.settings import JobSettings
from tests.clips import make_clip, video_facts
from tests.jobs_support import form, wait_state, webhook_receiver
from tests.server_fixtures import running_server

pytestmark = pytest.mark.timeout(300)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def settings(tmp_path: Path, **changes: object) -> JobSettings:
    base = JobSettings(webhook_secret=SECRET, webhook_allow_private=True, poll_s=0.2, lease_s=4.0)
    return base.replace(**changes)


async def test_a_clip_job_runs_to_a_result_with_signed_webhooks(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    clip = make_clip(tmp_path / "in.mp4", frames=10, rate=25)
    async with (
        webhook_receiver(SECRET) as receiver,
        running_server(tiny_parts, jobs=settings(tmp_path), state_dir=tmp_path / "state") as server,
    ):
        async with http.post(f"{server.url}/api/jobs", data=form(clip, {"seed": 5}, receiver.url)) as response:
            assert response.status == 202, await response.text()
            created = await response.json()
            assert response.headers["Location"] == created["status_url"] == f"/api/jobs/{created['id']}"
        job = await wait_state(http, server.url, created["id"], ("complete", "failed"))
        assert job["state"] == "complete", job
        assert job["progress"] == 100 and job["frames_done"] == 10 and job["error"] is None
        assert job["result_url"] == f"/api/jobs/{created['id']}/result"
        async with http.get(server.url + job["result_url"]) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "video/mp4"
            whole = await response.read()
        async with http.get(server.url + job["result_url"], headers={"Range": "bytes=0-99"}) as response:
            assert response.status == 206 and await response.read() == whole[:100]
        (tmp_path / "out.mp4").write_bytes(whole)
        facts, source = video_facts(tmp_path / "out.mp4"), video_facts(clip)
        assert facts["pts"] == source["pts"] and facts["audio"] == source["audio"] and facts["size"] == (64, 64)
        await receiver.wait_for(created["id"], "complete")
        assert receiver.rejected == 0
        assert receiver.states(created["id"]) == ["queued", "processing", "encoding", "complete"]
        ids = [webhook_id for webhook_id, _ in receiver.verified]
        assert len(set(ids)) == len(ids) and all(i.startswith("msg_") for i in ids)
        while True:  # the server records each attempt once the receiver has answered it
            async with http.get(f"{server.url}/api/jobs/{created['id']}") as response:
                hooks = (await response.json())["webhooks"]
            if len(hooks) == 4 and all(h["delivered_at"] for h in hooks):
                break
            await asyncio.sleep(0.05)
        assert [h["type"] for h in hooks] == ["job.queued", "job.processing", "job.encoding", "job.complete"]
        assert [h["id"] for h in hooks] == ids
        assert all(h["attempts"][0]["status"] == 204 for h in hooks)
        wanted = [
            'livediff_jobs{state="complete"} 1.0',
            'livediff_webhook_attempts_total{result="delivered"} 4.0',
            'livediff_job_seconds_count{state="complete"} 1.0',
        ]
        for _ in range(600):  # counted as the worker and the sender finish (a moment after the receiver saw it)
            async with http.get(f"{server.url}/metrics") as response:
                metrics = await response.text()
            if all(line in metrics for line in wanted):
                break
            await asyncio.sleep(0.05)
        assert [line for line in wanted if line not in metrics] == []


async def test_webhook_retries_keep_their_id_and_each_attempt_is_recorded(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    clip = make_clip(tmp_path / "in.mp4", frames=3, audio=False)
    async with (
        webhook_receiver(SECRET, fail_first=2) as receiver,
        running_server(tiny_parts, jobs=settings(tmp_path), state_dir=tmp_path / "state") as server,
    ):
        async with http.post(f"{server.url}/api/jobs", data=form(clip, {}, receiver.url)) as response:
            job_id = (await response.json())["id"]
        for state in ("queued", "processing", "encoding", "complete"):  # retried ones come after the rest
            await receiver.wait_for(job_id, state)
        while True:  # the server records each attempt once the receiver has answered it
            async with http.get(f"{server.url}/api/jobs/{job_id}") as response:
                hooks = (await response.json())["webhooks"]
            if len(hooks) == 4 and all(h["delivered_at"] for h in hooks):
                break
            await asyncio.sleep(0.05)
        # two attempts were refused with 500; each such event was sent again under its webhook-id, then taken
        statuses = [[a["status"] for a in hook["attempts"]] for hook in hooks]
        assert sum(s.count(500) for s in statuses) == 2 and all(s[-1] == 204 for s in statuses), statuses
        assert [a["attempt"] for a in hooks[0]["attempts"]] == list(range(1, len(statuses[0]) + 1))
        assert sorted(i for i, _ in receiver.verified) == sorted(hook["id"] for hook in hooks)


async def test_idempotency_keys(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    clip = make_clip(tmp_path / "in.mp4", frames=3, audio=False)
    jobs = settings(tmp_path, idempotency_ttl_s=1.0)
    async with running_server(tiny_parts, jobs=jobs, state_dir=tmp_path / "state") as server:
        url = f"{server.url}/api/jobs"

        async def post(key: str, params: dict[str, object]) -> tuple[int, dict[str, object]]:
            async with http.post(url, data=form(clip, params), headers={"Idempotency-Key": key}) as response:
                return response.status, await response.json()

        # the same key and body sent at once: one job, both answered with it
        (s1, a), (s2, b) = await asyncio.gather(post("k-1", {"seed": 1}), post("k-1", {"seed": 1}))
        assert s1 == s2 == 202 and a["id"] == b["id"]
        status, c = await post("k-1", {"seed": 1})
        assert status == 202 and c["id"] == a["id"]
        status, body = await post("k-1", {"seed": 2})
        assert status == 422 and body["field"] == "Idempotency-Key"
        async with http.get(url) as response:
            assert len((await response.json())["jobs"]) == 1
        await asyncio.sleep(1.2)  # past the key's lifetime: the same key makes a new job
        status, d = await post("k-1", {"seed": 1})
        assert status == 202 and d["id"] != a["id"]


async def test_list_cancel_and_unknown_jobs(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    long_clip = make_clip(tmp_path / "long.mp4", frames=600, audio=False)
    short = make_clip(tmp_path / "short.mp4", frames=2, audio=False)
    async with running_server(tiny_parts, jobs=settings(tmp_path), state_dir=tmp_path / "state") as server:
        url = f"{server.url}/api/jobs"
        async with http.post(url, data=form(long_clip)) as response:
            running_id = (await response.json())["id"]
        async with http.post(url, data=form(short)) as response:
            queued_id = (await response.json())["id"]
        await wait_state(http, server.url, running_id, ("processing",))
        async with http.get(url, params={"state": "queued"}) as response:
            assert [j["id"] for j in (await response.json())["jobs"]] == [queued_id]
        async with http.get(url, params={"limit": "1"}) as response:
            page = await response.json()
        assert [j["id"] for j in page["jobs"]] == [queued_id] and page["next_cursor"]
        async with http.get(url, params={"limit": "1", "cursor": page["next_cursor"]}) as response:
            assert [j["id"] for j in (await response.json())["jobs"]] == [running_id]
        async with http.delete(f"{url}/{running_id}") as response:
            assert response.status == 200 and (await response.json())["state"] == "cancelled"
        async with http.get(f"{url}/{running_id}/result") as response:
            assert response.status == 410
        done = await wait_state(http, server.url, queued_id, ("complete",))  # the worker went on to the next
        assert done["frames_done"] == 2
        async with http.delete(f"{url}/{queued_id}") as response:
            body = await response.json()
            assert response.status == 409 and "complete" in body["error"]
        for method in (http.get, http.delete):
            async with method(f"{url}/job_0000") as response:
                assert response.status == 404 and "job_0000" in (await response.json())["error"]
        async with http.get(url, params={"state": "sleeping"}) as response:
            assert response.status == 422 and (await response.json())["field"] == "state"
        assert not list((tmp_path / "state" / "jobs" / running_id).glob("*.part"))


async def test_bad_submissions_are_4xx_naming_the_field(tiny_parts, tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    clip = make_clip(tmp_path / "in.mp4", frames=3, audio=False)
    jobs = settings(tmp_path, webhook_allow_private=False, max_bytes=200_000, max_seconds=0.05)
    cases = [
        (form(b""), 422, "file", "the file is empty"),
        (form(b"just some text\n" * 100), 422, "file", "not a video file PyAV can open"),
        (form(None, {}), 422, "file", "no file field"),
        (form(clip, {"strength": 3}), 422, "strength", "strength must be in (0, 1]"),
        (form(clip, "{nope"), 422, "params", "params is not JSON"),
        (form(clip, {"temporal": {"bank": 2}}), 422, "temporal.bank", "temporal.bank needs an engine"),
        (form(clip, {}, "ftp://example.com/hook"), 422, "callback_url", "http:// or https://"),
        (form(clip, {}, "http://127.0.0.1:9/hook"), 422, "callback_url", "loopback address 127.0.0.1"),
        (form(clip, {}, "http://169.254.169.254/latest"), 422, "callback_url", "link-local"),
        (form(clip, {}, "http://10.1.2.3/hook"), 422, "callback_url", "private address"),
        (form(clip), 422, "file", "over the limit of 0.05 s"),
    ]
    async with running_server(tiny_parts, jobs=jobs, state_dir=tmp_path / "state", token="t0k") as server:
        url, auth = f"{server.url}/api/jobs", {"Authorization": "Bearer t0k"}
        async with http.post(url, data=form(clip)) as response:
            assert response.status == 401
        for data, status, field, said in cases:
            async with http.post(url, data=data, headers=auth) as response:
                body = await response.json()
                assert (response.status, body.get("field")) == (status, field), body
                assert said in body["error"], body
        async with http.post(url, json={"file": "x"}, headers=auth) as response:
            assert response.status == 415

        async def endless() -> object:  # a file part with no end: only a refusal while streaming answers it
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
            chunk = b"\0" * 65536
            while True:
                yield chunk

        try:
            async with http.post(
                url, data=endless(), headers={**auth, "Content-Type": "multipart/form-data; boundary=xyz"}
            ) as r:
                assert r.status == 413 and (await r.json())["field"] == "file"
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            pass  # the server answered and closed while the client was still sending: refused mid-stream too
        async with http.get(url, headers=auth) as response:
            assert (await response.json())["jobs"] == []  # nothing stored for any of them
        assert not [p for p in (tmp_path / "state" / "jobs").rglob("*") if p.is_file()]


async def test_a_video_model_server_refuses_jobs_at_submission(tmp_path: Path, http) -> None:  # type: ignore[no-untyped-def]
    """Jobs run image models (a video model's steps take live sessions' chunks only): 422 at once,
    before the upload is stored, not a 202 and a failed job."""
    from livediff.models.video import load_video_model

    clip = make_clip(tmp_path / "in.mp4", frames=3, audio=False)
    parts = load_video_model("tiny-video")
    jobs = settings(tmp_path)
    async with running_server(parts, size=64, model="tiny-video", jobs=jobs, state_dir=tmp_path / "state") as server:
        async with http.post(f"{server.url}/api/jobs", data=form(clip)) as response:
            body = await response.json()
            assert response.status == 422 and "video model 'tiny-video'" in body["error"], body
        async with http.get(f"{server.url}/api/jobs") as response:
            assert (await response.json())["jobs"] == []
