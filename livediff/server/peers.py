"""What publishing sessions and WHEP viewers share: the resource a URL names, the SDP answer (as
sent: `transport.offers` checks and negotiates, `transport.candidates` fixes the candidates), and
the watch that ends a peer when it fails, closes, or never connects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from livediff.session import Session
from livediff.transport.candidates import accept_remote, announce
from livediff.transport.offers import negotiate

log = logging.getLogger(__name__)

Background = Callable[[Awaitable[Any]], None]
"""Runs a coroutine outside any request or session task (`Service._background`)."""


@dataclass
class Resource:
    """A WHIP session or WHEP viewer as addressed by its URL."""

    pc: RTCPeerConnection
    session: Session
    etag: str
    answer: str
    """The SDP answer as sent: the server's candidates, as `announce` maps them."""
    viewer_id: str | None = None


async def answer(pc: RTCPeerConnection, offer: RTCSessionDescription, nat_1to1: Mapping[str, str]) -> str:
    """Negotiate `offer` (checked by `transport.offers.prepare_offer`) on `pc`; the answer SDP to send.

    `transport.offers.negotiate` turns whatever aiortc raises into an `SdpError` (400); the offer's
    end-of-candidates and mDNS candidates are left out, and the answer's host candidates carry the
    NAT 1:1 public address (`transport.candidates`: `accept_remote`, `announce`).
    """
    await negotiate(pc, RTCSessionDescription(sdp=accept_remote(offer.sdp), type=offer.type))
    return announce(pc.localDescription.sdp, nat_1to1)


def watch(
    pc: RTCPeerConnection,
    owner: Session,
    end: Callable[[str], Awaitable[None]],
    connect_timeout_s: float,
    background: Background,
    on_connected: Callable[[], bool] | None = None,
) -> asyncio.Task[Any]:
    """End the peer (`end(cause)`) when it fails or closes, or has not connected `connect_timeout_s` from now.

    `on_connected` runs when the peer connects and says whether it may stay (it took a live slot,
    `livediff.admission`); when it may not, the peer is ended. The watchdog is a task of `owner`
    (cancelled when the session closes); `end` runs in the background, so that it may close
    `owner` itself. Returns the watchdog task.
    """

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected" and on_connected is not None and not on_connected():
            background(end("connected after a newer offer took its slot (past its grace)"))
        elif pc.connectionState == "failed":
            background(end("peer connection failed (ICE consent lost, or ICE/DTLS failed)"))
        elif pc.connectionState == "closed":
            background(end("peer connection closed"))

    async def watchdog() -> None:
        await asyncio.sleep(connect_timeout_s)
        if pc.connectionState != "connected":
            background(end(f"did not connect in {connect_timeout_s:g} s (--connect-timeout)"))

    return owner.spawn(watchdog(), "connect-watchdog")
