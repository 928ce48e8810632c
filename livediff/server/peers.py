"""What publishing sessions and WHEP viewers share: the resource a URL names, the SDP answer, and the
watch that ends a peer when it fails, closes, or never connects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError, OperationError

from livediff.session import Session
from livediff.transport.whip import SdpError

log = logging.getLogger(__name__)

Background = Callable[[Awaitable[Any]], None]
"""Runs a coroutine outside any request or session task (`Service._background`)."""


@dataclass
class Resource:
    """A WHIP session or WHEP viewer as addressed by its URL."""

    pc: RTCPeerConnection
    session: Session
    etag: str
    viewer_id: str | None = None


async def answer(pc: RTCPeerConnection, offer: RTCSessionDescription) -> None:
    """Apply `offer` and create the answer (`pc.localDescription`); `SdpError` when aiortc cannot take it."""
    try:
        await pc.setRemoteDescription(offer)
        await pc.setLocalDescription(await pc.createAnswer())
    except (ValueError, AssertionError, KeyError, IndexError, OperationError, InvalidStateError) as exc:
        raise SdpError(f"cannot negotiate this offer: {exc or type(exc).__name__}") from exc


def watch(pc: RTCPeerConnection, owner: Session, end: Callable[[], Awaitable[None]], connect_timeout_s: float,
          background: Background, what: str, on_connected: Callable[[], bool] | None = None) -> asyncio.Task[Any]:
    """End the peer (`end()`) when it fails or closes, or has not connected `connect_timeout_s` from now.

    `on_connected` runs when the peer connects and says whether it may stay (it took a live slot,
    `livediff.admission`); when it may not, the peer is ended. The watchdog is a task of `owner`
    (cancelled when the session closes); `end` runs in the background, so that it may close
    `owner` itself. Returns the watchdog task.
    """

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected" and on_connected is not None and not on_connected():
            log.info("%s: connected, but no slot was left for it (or a newer offer took it): ended", what)
            background(end())
        elif pc.connectionState in ("failed", "closed"):
            background(end())

    async def watchdog() -> None:
        await asyncio.sleep(connect_timeout_s)
        if pc.connectionState != "connected":
            log.info("%s: peer did not connect in %.0f s, reaped", what, connect_timeout_s)
            background(end())

    return owner.spawn(watchdog(), "connect-watchdog")
