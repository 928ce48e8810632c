"""Crash and restart: a real `livediff serve` killed with SIGKILL in the middle of a job, started again on the
same store (a real PostgreSQL, and SQLite), finishes the job with one result, and the webhook receiver
(verifying every signature) saw every state of it, each delivery under its own stable id."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.clips import make_clip, video_facts
from tests.jobs_support import form, wait_state, webhook_receiver
from tests.postgres_support import postgres_cluster, postgres_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@contextmanager
def serve(state_dir: Path, port: int, db: str) -> Iterator[subprocess.Popen[str]]:
    args = [sys.executable, "-m", "livediff.cli", "serve", "--model", "tiny", "--size", "64", "--backend", "torch",
            "--port", str(port), "--state-dir", str(state_dir), "--webhook-secret", SECRET,
            "--webhook-allow-private", "--jobs-lease", "2", "--jobs-batch", "1"]  # fmt: skip
    if db:
        args += ["--jobs-db", db]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the ready line: the model is loaded
            if "livediff: ready" in line:
                break
        else:
            raise AssertionError(f"livediff serve ended before it was ready (exit {proc.wait()})")
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # a full pipe would stop the server
        drain.start()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _sigkill_mid_job_then_restart(tmp_path: Path, db: str) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=240, size=(64, 64), audio=False)
    state = tmp_path / "state"
    port = _port()
    url = f"http://127.0.0.1:{port}"
    async with webhook_receiver(SECRET) as receiver, aiohttp.ClientSession() as http:
        with serve(state, port, db) as first:
            async with http.post(f"{url}/api/jobs", data=form(clip, {"seed": 9}, receiver.url)) as response:
                assert response.status == 202
                job_id = (await response.json())["id"]
            while True:  # running, some frames done (stored by the heartbeat): kill it now
                body = await wait_state(http, url, job_id, ("processing",))
                if body["frames_done"] > 0:
                    break
                await asyncio.sleep(0.2)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert body["frames_done"] < 240
        with serve(state, port, db):
            done = await wait_state(http, url, job_id, ("complete", "failed"), timeout=400)
            assert done["state"] == "complete", done
            assert done["attempt"] == 2 and done["frames_done"] == 240
            await receiver.wait_for(job_id, "complete")
            async with http.get(f"{url}/api/jobs/{job_id}/result") as response:
                (tmp_path / "out.mp4").write_bytes(await response.read())
    folder = state / "jobs" / job_id
    assert sorted(p.name for p in folder.iterdir()) == ["input", "result.mp4"]  # one result, no part file
    assert video_facts(tmp_path / "out.mp4")["pts"] == video_facts(clip)["pts"]
    states = receiver.states(job_id)
    assert states[0] == "queued" and states[-1] == "complete"
    assert {"processing", "encoding"} <= set(states) and states.count("processing") >= 2  # before and after
    assert receiver.rejected == 0 and all(p["data"]["id"] == job_id for _, p in receiver.verified)
    # every delivery has its event's id; a repeat (at least once) would carry the same id and payload
    by_id: dict[str, object] = {}
    for webhook_id, payload in receiver.verified:
        assert by_id.setdefault(webhook_id, payload) == payload


async def test_sigkill_mid_job_on_postgres(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    await _sigkill_mid_job_then_restart(tmp_path, postgres_url)


async def test_sigkill_mid_job_on_sqlite(tmp_path: Path) -> None:
    await _sigkill_mid_job_then_restart(tmp_path, "")
