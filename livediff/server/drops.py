"""The probe ids of frames a session dropped on purpose, for the `stats` messages of a measuring client.

When the model is slower than the camera, the session's latest-only inbox keeps only the newest
frame and drops the rest (see `transport/slot.py`); the outbox does the same when the encoder has
not taken the previous output yet. A client that counts the frames it sent and never saw again
cannot tell these drops from frames lost on the network. For a session in probe mode, each
dropped frame's id (read from the frame as the transport decoded it, 32 block means of its Y
plane) is kept here and goes out with the next `stats` message as
`"dropped": {"inbox": [ids], "outbox": [ids]}`.
"""

from __future__ import annotations

from collections import deque

from livediff.session import FrameIn, FrameOut, Session
from livediff.transport import probe
from livediff.transport.frames import luma

MAX_PENDING = 1024
"""Ids kept between two stats messages per slot (34 s of a 30 fps camera with no output at all)."""


class DropLog:
    """Watches one session's inbox and outbox; `take()` hands over the ids dropped since the last call."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.inbox: deque[int] = deque(maxlen=MAX_PENDING)
        self.outbox: deque[int] = deque(maxlen=MAX_PENDING)
        session.inbox.on_drop = self._dropped_in
        session.outbox.on_drop = self._dropped_out

    def _dropped_in(self, frame: FrameIn) -> None:
        if not self.session.probe:
            return
        frame_id = frame.frame_id if frame.frame_id is not None else probe.read(luma(frame.image))
        if frame_id is not None:  # an id the server cannot read is no id the page could match
            self.inbox.append(frame_id)

    def _dropped_out(self, out: FrameOut) -> None:
        if out.source.frame_id is not None:
            self.outbox.append(out.source.frame_id)

    def take(self) -> dict[str, list[int]]:
        """The ids dropped since the last call, by slot, oldest first; cleared."""
        taken = {"inbox": list(self.inbox), "outbox": list(self.outbox)}
        self.inbox.clear()
        self.outbox.clear()
        return taken

    def restore(self, taken: dict[str, list[int]]) -> None:
        """Put back what `take()` returned when its message was not sent (older than what came since;
        beyond `MAX_PENDING` per slot the oldest go)."""
        self.inbox = deque([*taken["inbox"], *self.inbox], maxlen=MAX_PENDING)
        self.outbox = deque([*taken["outbox"], *self.outbox], maxlen=MAX_PENDING)
