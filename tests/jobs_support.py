"""Helpers for the job tests: a real webhook receiver on loopback that verifies every delivery with the
`standardwebhooks` package, multipart submissions, waiting for a job's state."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Receiver:
    """Deliveries that verified, in arrival order: (webhook-id, payload); `fail_first` answers 500 that often."""

    url: str
    secret: str
    verified: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rejected: int = 0
    fail_first: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def states(self, job_id: str) -> list[str]:
        return [p["data"]["state"] for _, p in self.verified if p["data"]["id"] == job_id]

    async def wait_for(self, job_id: str, state: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while state not in self.states(job_id):
            self.changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"no {state} webhook for {job_id}: saw {self.states(job_id)}"
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass


@asynccontextmanager
async def webhook_receiver(secret: str, fail_first: int = 0) -> AsyncIterator[Receiver]:
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    verifier = Webhook(secret)
    receiver = Receiver("", secret, fail_first=fail_first)

    async def hook(request: web.Request) -> web.Response:
        body = await request.text()
        try:
            payload = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError:
            receiver.rejected += 1
            return web.Response(status=400)
        if receiver.fail_first > 0:
            receiver.fail_first -= 1
            return web.Response(status=500)
        receiver.verified.append((request.headers["webhook-id"], payload))
        receiver.changed.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    receiver.url = str(server.make_url("/hook"))
    try:
        yield receiver
    finally:
        await server.close()


def form(clip: Path | bytes | None, params: dict[str, Any] | str | None = None, callback_url: str | None = None,
         name: str = "clip.mp4") -> aiohttp.FormData:  # fmt: skip
    data = aiohttp.FormData(default_to_multipart=True)
    if clip is not None:
        data.add_field("file", clip.read_bytes() if isinstance(clip, Path) else clip, filename=name,
                       content_type="video/mp4")  # fmt: skip
    if params is not None:
        data.add_field("params", params if isinstance(params, str) else json.dumps(params))
    if callback_url is not None:
        data.add_field("callback_url", callback_url)
    return data


async def wait_state(http: aiohttp.ClientSession, url: str, job_id: str, states: tuple[str, ...],
                     timeout: float = 180, headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Poll GET /api/jobs/{id} until its state is one of `states` (a generous deadline, no timing claim)."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(f"{url}/api/jobs/{job_id}", headers=headers) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, f"job {job_id} stayed {body['state']}: {body}"
        await asyncio.sleep(0.1)
