"""Support for the browser page tests: a real livediff server on a thread, Chromium, an aiortc publisher.

The server is the app `livediff serve` runs (`create_app`), on 127.0.0.1 with the built-in tiny model
at a small size, in this process on its own event loop thread, so tests can read its sessions
directly and start servers with different settings cheaply (the model parts are loaded once).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from livediff.transport.loopback import free_port

REPO = Path(__file__).resolve().parent.parent
WEB_DIR = REPO / "web"
CHROMIUM = Path(os.environ.get("LIVEDIFF_CHROMIUM", "/usr/bin/chromium"))
"""Debian's Chromium; LIVEDIFF_CHROMIUM names another build."""
ENGINE_SIZE = 128

CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Host candidates as plain addresses, not mDNS names, on the loopback test network.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # Timers and video callbacks keep running in a page that is not in front.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--autoplay-policy=no-user-gesture-required",
]

T = TypeVar("T")


def chromium_missing() -> str | None:
    """Why the page tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


def skip_without(missing: str | None) -> None:
    """Skip the calling test when a browser is `missing` (the reason), or fail under CI, which
    sets LIVEDIFF_REQUIRE_BROWSER=1 so a broken install cannot pass as skipped page tests."""
    if missing is None:
        return
    if os.environ.get("LIVEDIFF_REQUIRE_BROWSER") == "1":
        pytest.fail(f"page tests need a browser: {missing}")
    pytest.skip(missing)


@dataclass
class LiveServer:
    """A running `livediff serve` app; `call` runs a coroutine on its loop and returns the result."""

    url: str
    loop: asyncio.AbstractEventLoop
    app: Any
    token: str = ""
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def service(self) -> Any:
        from livediff.server.common import SERVICE

        return self.app[SERVICE]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sessions(self) -> list[dict[str, Any]]:
        """Every session's description, as GET /api/sessions reports it."""
        return self.api("GET", "/api/sessions")["sessions"]

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def stop(self) -> None:
        self._stop()


def start_server(
    parts: Any,
    size: int = ENGINE_SIZE,
    controlnets: tuple[tuple[str, str], ...] = (),
    depth_model: str = "",
    model: str = "tiny",
    loras: tuple[tuple[str, str], ...] = (),
    ip_adapter: str = "",
    **settings: Any,
) -> LiveServer:
    """Starts the app on a free port on a new thread; returns once /readyz says ready.

    `size`: the engine's frame side in pixels (a larger one makes the tiny model slower than a camera);
    `controlnets`, `depth_model`, `loras`: the engine's (`EngineSettings`); `model`: the name `parts` were
    loaded as (`tiny`, or `tiny-video` for the video engine's parts).
    """
    from aiohttp import web

    from livediff.config import EngineSettings, ServerSettings
    from livediff.server.app import create_app

    port = free_port()
    server_settings = ServerSettings(host="127.0.0.1", port=port, web_dir=WEB_DIR, **settings)
    engine = EngineSettings(
        model=model,
        device="cpu",
        dtype="float32",
        height=size,
        width=size,
        max_batch=2,
        controlnets=controlnets,
        depth_model=depth_model,
        loras=loras,
        ip_adapter=ip_adapter,
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        app = create_app(engine, server_settings, parts=parts)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        holder["app"], holder["runner"] = app, runner
        started.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(run())
        loop.run_forever()

    thread = threading.Thread(target=main, name=f"livediff-server-{port}", daemon=True)
    thread.start()
    if not started.wait(60):
        raise RuntimeError("the test server did not start")

    def stop() -> None:
        future = asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop)
        try:
            future.result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)

    server = LiveServer(f"http://127.0.0.1:{port}", loop, holder["app"], settings.get("token", ""), stop)
    wait_ready(server.url)
    return server


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium (Playwright, Debian's binary, the fake camera), or a skip/failure saying why not."""
    skip_without(chromium_missing())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} was not ready in {timeout} s")
        time.sleep(0.2)


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Publisher:
    """An OBS-like WHIP publisher (aiortc, synthetic moving camera) run on the server's loop."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.client: Any = None
        self.http: Any = None

    def start(self, query: str = "") -> str:
        async def run() -> Any:
            import aiohttp

            from tests.server_fixtures import CameraTrack, whip_publish

            self.http = aiohttp.ClientSession()
            return await whip_publish(
                self.http, self.server.url, camera=CameraTrack(width=160, height=120), query=query, audio=False
            )

        self.client = self.server.call(run())
        return str(self.client.session_id)

    def delete(self) -> None:
        """Ends the session as OBS does when it stops streaming (DELETE on the resource)."""

        async def run() -> None:
            async with self.http.delete(self.server.url + self.client.location) as response:
                assert response.status == 200, await response.text()

        self.server.call(run())

    def close(self) -> None:
        async def run() -> None:
            if self.client is not None:
                await self.client.close()
            if self.http is not None:
                await self.http.close()

        self.server.call(run())
        self.client = None
        self.http = None
