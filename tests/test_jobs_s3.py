"""Jobs and recordings with S3-compatible storage, against a real S3-protocol server process (moto's standalone
server): files put in the bucket (large ones as multipart uploads), brought back when the working copy is gone,
served with range requests, removed with their job."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from livediff.errors import ConfigError
from livediff.jobs.s3 import MULTIPART_BYTES, S3Storage, parse_url
from livediff.jobs.settings import JobSettings
from tests.clips import make_clip
from tests.jobs_support import form, wait_state
from tests.s3_support import client, s3_server
from tests.server_fixtures import frames_back, offer_client, running_server

pytestmark = pytest.mark.timeout(300)
BUCKET = "livediff-test"


def test_urls_name_a_bucket() -> None:
    assert parse_url("s3://b/some/prefix/") == ("b", "some/prefix")
    assert parse_url("s3://b") == ("b", "")
    for bad in ("s3://", "/data/jobs", "gs://b/p"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    with pytest.raises(ConfigError):
        JobSettings(storage_url="s3:///prefix")


def test_files_go_to_the_bucket_multipart_and_come_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(monkeypatch):
        s3 = client()
        s3.create_bucket(Bucket=BUCKET)
        storage = S3Storage(f"s3://{BUCKET}/pre", tmp_path / "cache")
        data = bytes(range(256)) * ((2 * MULTIPART_BYTES + 12345) // 256)
        upload = storage.upload("job_1", len(data))
        for start in range(0, len(data), 1 << 20):
            upload.write(data[start : start + (1 << 20)])
        upload.commit()  # the input goes up once complete
        head = s3.head_object(Bucket=BUCKET, Key="pre/job_1/input")
        assert head["ContentLength"] == len(data)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart upload of 3 parts
        (tmp_path / "cache" / "job_1" / "result.mp4").write_bytes(b"small result")
        storage.store("job_1", "result.mp4")
        shutil.rmtree(tmp_path / "cache" / "job_1")  # the working copy is gone (another replica, a new disk)
        assert storage.fetch("job_1", "input") is not None
        assert (tmp_path / "cache" / "job_1" / "input").read_bytes() == data
        path = storage.fetch("job_1", "result.mp4")
        assert path is not None and path.read_bytes() == b"small result"
        assert storage.fetch("job_1", "nothing") is None
        storage.remove("job_1")
        assert s3.list_objects_v2(Bucket=BUCKET, Prefix="pre/job_1/").get("KeyCount") == 0
        assert not (tmp_path / "cache" / "job_1").exists()


@pytest.mark.usefixtures("loopback_ice")
async def test_a_job_and_a_recording_live_in_the_bucket(tiny_parts, tmp_path: Path, http, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with s3_server(monkeypatch):
        s3 = client()
        s3.create_bucket(Bucket=BUCKET)
        jobs = JobSettings(webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", poll_s=0.2,
                           storage_url=f"s3://{BUCKET}/live")  # fmt: skip
        state = tmp_path / "state"
        async with running_server(tiny_parts, jobs=jobs, state_dir=state) as server:
            clip = make_clip(tmp_path / "in.mp4", frames=6, rate=25)
            async with http.post(f"{server.url}/api/jobs", data=form(clip, {"seed": 2})) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            job = await wait_state(http, server.url, job_id, ("complete", "failed"))
            assert job["state"] == "complete", job
            stored = s3.get_object(Bucket=BUCKET, Key=f"live/{job_id}/result.mp4")["Body"].read()
            assert s3.head_object(Bucket=BUCKET, Key=f"live/{job_id}/input")["ContentLength"] == clip.stat().st_size
            shutil.rmtree(state / "jobs" / job_id)  # served from the bucket now
            async with http.get(f"{server.url}/api/jobs/{job_id}/result", headers={"Range": "bytes=0-63"}) as response:
                assert response.status == 206 and await response.read() == stored[:64]

            client_peer = await offer_client(http, server.url, params={"record": True})
            await frames_back(client_peer, 5)
            session_url = f"{server.url}/api/sessions/{client_peer.session_id}"
            async with http.patch(session_url, json={"record": False}) as response:
                assert response.status == 200, await response.text()
            recordings = server.service.recordings
            assert recordings is not None
            listed = await asyncio.to_thread(recordings.list)
            assert len(listed) == 1 and listed[0]["state"] == "complete", listed
            rec_id = listed[0]["id"]
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"live/{rec_id}/")["Contents"]}
            assert keys == {f"live/{rec_id}/output.mp4", f"live/{rec_id}/recording.json"}
            shutil.rmtree(state / "jobs" / rec_id)
            async with http.get(f"{server.url}/api/recordings") as response:  # listed from the bucket
                assert [r["id"] for r in (await response.json())["recordings"]] == [rec_id]
            shutil.rmtree(state / "jobs" / rec_id)
            recorded = s3.get_object(Bucket=BUCKET, Key=f"live/{rec_id}/output.mp4")["Body"].read()
            async with http.get(f"{server.url}/api/recordings/{rec_id}/result") as response:
                assert response.status == 200 and await response.read() == recorded
            async with http.delete(f"{server.url}/api/recordings/{rec_id}") as response:
                assert response.status == 200 and (await response.json())["state"] == "deleted"
            assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"live/{rec_id}/").get("KeyCount") == 0
            async with http.get(f"{server.url}/api/recordings") as response:
                assert (await response.json())["recordings"] == []
            await client_peer.close()


def test_the_flag_takes_a_folder_or_an_s3_url() -> None:
    from livediff.cli import build_parser
    from livediff.jobs.flags import jobs_settings

    def parsed(value: str) -> JobSettings:
        return jobs_settings(build_parser().parse_args(["serve", "--jobs-storage", value]))

    assert parsed("s3://bucket/jobs").storage_url == "s3://bucket/jobs" and parsed("s3://bucket/jobs").storage is None
    assert parsed("/data/jobs").storage == Path("/data/jobs") and parsed("/data/jobs").storage_url == ""
    with pytest.raises(ConfigError, match="bucket"):
        parsed("s3://")
