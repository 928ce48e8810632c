"""WHEP viewers of the sessions' outputs: admission, their peers, and how each one ends.

A viewer is a send-only peer fed by its session's `Fanout` (encoded once for all). It is listed in
`Session.viewers` (how to end it) and in the service's resources (its URL) until it ends: by
`DELETE`, by its peer failing or closing, by its connect deadline, or with its session. Whatever
waits on the way (the SDP answer), a session that ended meanwhile gets no viewer: `SessionClosed`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from aiortc import RTCSessionDescription

from livediff.admission import Admission, AdmissionError
from livediff.config import ServerSettings
from livediff.server.metrics import Metrics
from livediff.server.peers import Background, Resource, answer, watch
from livediff.session import Session, SessionClosed
from livediff.transport.fanout import EncodedTrack, Fanout
from livediff.transport.ice_servers import IceServerConfig
from livediff.transport.offers import prepare_offer
from livediff.transport.peer import create_peer, negotiated_codec, prefer_codecs
from livediff.transport.whip import SdpError, new_etag

log = logging.getLogger(__name__)

EndViewer = Callable[[str], Awaitable[None]]
"""Ends one viewer, logging `cause` once (`Session.viewers` holds these, called with no cause on the
session's own end)."""


class Viewers:
    """Adds and ends the WHEP viewers of every session (each viewer's state stays in its own closure).

    Per session, at most `max_viewers` viewers hold slots, connected or not (at most
    `max_connecting` not yet); one that has not connected within its grace after its answer gives
    its slot to a newer offer: `livediff.admission`.
    """

    def __init__(
        self,
        settings: ServerSettings,
        ice: IceServerConfig,
        nat_1to1: Mapping[str, str],
        metrics: Metrics,
        resources: dict[str, Resource],
        outputs: Mapping[str, Fanout],
        background: Background,
    ) -> None:
        self.settings = settings
        self.ice = ice
        """The STUN/TURN servers of every peer (the publishers' too)."""
        self.nat_1to1 = nat_1to1
        """`livediff.config.nat_1to1_map`: the public addresses the answers announce."""
        self.metrics = metrics
        self.resources = resources
        self.outputs = outputs
        self.background = background

    def _slots(self, session: Session) -> Admission:
        if session.viewer_slots is None:
            session.viewer_slots = Admission(
                self.settings.max_viewers, self.settings.max_connecting, f"viewers of session {session.id}"
            )
        return session.viewer_slots

    async def add(self, session: Session, offer: RTCSessionDescription) -> Resource:
        """A viewer of `session`'s output for `offer`; the answer is `resource.answer`.

        Raises `SdpError` (bad offer), `UnsupportedCodecs` (no video codec in common),
        `AdmissionError` (the session's viewers are all connected and at its limit, or newer offers
        took this one's slot) or `SessionClosed` (the session ended, before or while the answer
        was made).
        """
        offer = prepare_offer(offer.sdp, self.settings.video_codecs)
        session.ensure_open()
        output = self.outputs.get(session.id)
        if output is None:  # its output went with its cleanups: the session is ending
            raise SessionClosed(session.id)
        slots = self._slots(session)
        viewer_id = uuid.uuid4().hex[:12]
        evicted = slots.admit(viewer_id)
        if evicted is not None:
            cause = f"not connected {slots.grace_s:g} s after its answer, a newer offer took its slot"
            self.background(self.end(session, evicted, cause))
        key = f"{session.id}/{viewer_id}"
        pc = create_peer(self.ice, self.settings.marker_completion)
        transceiver = pc.addTransceiver("video", direction="sendonly")
        prefer_codecs(transceiver, self.settings.video_codecs)
        tasks: list[asyncio.Task[Any]] = []
        tracks: list[EncodedTrack] = []

        async def end(cause: str = "its session ended") -> None:
            if session.viewers.pop(viewer_id, None) is None:
                return
            log.info("viewer %s ended: %s", key, cause)
            slots.release(viewer_id)
            self.resources.pop(key, None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for track in tracks:
                track.stop()
            await pc.close()
            self.metrics.viewers.dec()

        session.viewers[viewer_id] = end
        self.metrics.viewers.inc()
        try:
            sdp = await answer(pc, offer, self.nat_1to1)
            session.ensure_open()  # it may have ended while the answer was made
            if viewer_id not in session.viewers:
                raise AdmissionError(
                    "a newer offer took this viewer's slot before its answer was ready", slots.max_live
                )
            slots.answered(viewer_id)  # its connect grace starts (livediff.admission)
            codec = negotiated_codec(transceiver)
            if codec is None:
                raise SdpError("the offer's video has no codec in common with the server")
            tracks.append(output.subscribe(transceiver.sender, codec))
            tasks.append(
                watch(
                    pc,
                    session,
                    end,
                    self.settings.connect_timeout_s,
                    self.background,
                    on_connected=lambda: slots.connected(viewer_id),
                )
            )
        except BaseException as exc:
            evicted_meanwhile = viewer_id not in session.viewers
            await end(f"no answer: {type(exc).__name__}: {exc}"[:200])
            session.ensure_open()  # a session that ended meanwhile is the answer, not what it broke
            if evicted_meanwhile and not isinstance(exc, AdmissionError):
                raise AdmissionError(
                    "a newer offer took this viewer's slot before its answer was ready", slots.max_live
                ) from None
            raise
        resource = Resource(pc=pc, session=session, etag=new_etag(), answer=sdp, viewer_id=viewer_id)
        self.resources[key] = resource
        return resource

    async def end(self, session: Session, viewer_id: str, cause: str = "client DELETE") -> bool:
        """End one viewer (logged once with `cause`); False when `session` has no such viewer."""
        end = session.viewers.get(viewer_id)
        if end is None:
            return False
        await cast(EndViewer, end)(cause)  # what `add` put there takes the cause (Session.close calls it without)
        return True
