"""Clients on test-bed hosts: an asyncio loop living in a namespace, browsers started in one.

`HostLoop(ns)` runs an event loop on a thread that entered `ns`, so every socket aiortc and
aiohttp make on it (ICE, DTLS, HTTPS) belongs to that host. Browsers are started from a thread
inside the namespace, so the browser process and everything it starts live there.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from livediff.transport import probe
from livediff.transport.frames import luma
from tests.net import netns

T = TypeVar("T")


class HostLoop:
    """An event loop on its own thread inside network namespace `ns`; `call` runs a coroutine there."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            with netns.entered(ns):
                asyncio.set_event_loop(self.loop)
                self.loop.call_soon(started.set)
                self.loop.run_forever()
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self.thread = threading.Thread(target=main, name=f"loop@{ns}", daemon=True)
        self.thread.start()
        started.wait(10)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def https_session(cert: Path) -> aiohttp.ClientSession:
    """An HTTP client that trusts the server's self-signed certificate `cert` (call on the host's loop)."""
    trusted = ssl.create_default_context(cafile=str(cert))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted))


class ProbeClock:
    """Glass-to-glass per frame: a receiver's arrival time of each probe id, less its send time."""

    def __init__(self, sent_at: dict[int, float]) -> None:
        self.sent_at = sent_at
        self.g2g_ms: list[float] = []
        self.first_at: float | None = None

    def on_frame(self, frame: Any, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        frame_id = probe.read(luma(frame))
        if frame_id is not None and frame_id in self.sent_at:
            self.g2g_ms.append((now - self.sent_at[frame_id]) * 1000.0)

    def p50(self) -> float:
        ordered = sorted(self.g2g_ms)
        return ordered[len(ordered) // 2] if ordered else float("nan")
