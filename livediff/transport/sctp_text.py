"""A data-channel text message that is not UTF-8 must not end the peer connection.

Why
---
aiortc decodes a text message (SCTP payload protocol 51, "WebRTC String") with
`data.decode("utf8")` inside `RTCSctpTransport._data_channel_receive`; invalid bytes raise
`UnicodeDecodeError` there, which unwinds through the SCTP and DTLS receive loops and closes the
DTLS transport: one malformed control message ended its whole session (video included).

What
----
`tolerate_invalid_text(sctp)` wraps that method on one transport instance: a text message that
is not UTF-8 is handed to its channel's "message" listeners as `InvalidText` (bytes) instead, so
the application answers it (`livediff.server.control` says "not UTF-8") and the peer lives on.
Everything else goes to aiortc's method unchanged. `check_aiortc_internals()` raises
`AiortcInternalsError` if the method, its call from `_receive` or the protocol number moved.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiortc.rtcsctptransport import WEBRTC_STRING, RTCSctpTransport

from livediff.transport.aiortc_guard import moved

_RECEIVE = "_data_channel_receive"


class InvalidText(bytes):
    """The bytes of a data-channel text message that is not valid UTF-8."""


def check_aiortc_internals() -> None:
    """Raise `AiortcInternalsError` if aiortc no longer decodes text messages where this module expects."""
    method = getattr(RTCSctpTransport, _RECEIVE, None)
    if method is None or list(inspect.signature(method).parameters) != ["self", "stream_id", "pp_id", "data"]:
        raise moved(
            "sctp_text", f"RTCSctpTransport.{_RECEIVE}(stream_id, pp_id, data) moved", "aiortc/rtcsctptransport.py"
        )
    if f"self.{_RECEIVE}(" not in inspect.getsource(RTCSctpTransport._receive) or WEBRTC_STRING != 51:
        raise moved(
            "sctp_text",
            f"RTCSctpTransport._receive no longer hands messages to {_RECEIVE}",
            "aiortc/rtcsctptransport.py",
        )


def tolerate_invalid_text(sctp: RTCSctpTransport) -> None:
    """Hand text messages that are not UTF-8 to the channel as `InvalidText` instead of failing the transport."""
    check_aiortc_internals()
    original = getattr(sctp, _RECEIVE)

    async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
        if pp_id == WEBRTC_STRING:
            try:
                data.decode("utf8")
            except UnicodeDecodeError:
                channel: Any = sctp._data_channels.get(stream_id)
                if channel is not None:
                    channel.emit("message", InvalidText(data))
                return
        await original(stream_id, pp_id, data)

    setattr(sctp, _RECEIVE, receive)
