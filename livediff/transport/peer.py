"""Peer connections as livediff makes them: ICE servers, codec preferences, encoder settings.

Encoder choices (aiortc encodes each sender's frames itself, one encoder per sender):
* codec: the first of `ServerSettings.video_codecs` (default H.264, then VP8) that the remote
  offer carries. Set with `setCodecPreferences` on transceivers created *before*
  `setRemoteDescription`, which aiortc then matches to the offer's m-lines.
* bitrate: `ServerSettings.bitrate` is written into the sender's encoder (`target_bitrate`) once
  it exists (aiortc creates it on the first frame). aiortc clamps it (H.264 0.5-3 Mbit/s, VP8
  0.25-1.5 Mbit/s) and a receiver's REMB feedback overrides it later (congestion control).
* keyframes: every `keyframe_interval_s` the sender is asked for a keyframe; aiortc's own
  encoders otherwise send one only at the start and on PLI/FIR (VP8 gop 3000, x264 default).
  A new WHEP viewer gets its own encoder, whose first frame is a keyframe anyway.
Both use aiortc private attributes (`_RTCRtpSender__encoder`, `_send_keyframe`); if a new
aiortc moves them, a warning is logged once and the defaults stay.
"""

from __future__ import annotations

import asyncio
import logging

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.codecs import is_rtx

from livediff.transport import h264_profiles
from livediff.transport.ice_servers import IceServerConfig

log = logging.getLogger(__name__)
_warned: set[str] = set()


def create_peer(ice: IceServerConfig, marker_completion: bool = True) -> RTCPeerConnection:
    """A server-side peer with the configured STUN/TURN servers (none by default: no look-up
    delays on a LAN, and never aiortc's own default STUN server), H.264 Main and High among the
    codecs it receives (`h264_profiles`) and, with `marker_completion`, marker-bit frame
    completion on its video receivers."""
    h264_profiles.enable()  # idempotent
    pc = RTCPeerConnection(RTCConfiguration(iceServers=ice.for_peer()))
    if marker_completion:
        from livediff.transport.marker_jitterbuffer import enable_for

        enable_for(pc)
    return pc


def prefer_codecs(transceiver: RTCRtpTransceiver, names: tuple[str, ...]) -> None:
    """Order the transceiver's video codecs by `names` (e.g. ("H264", "VP8")), RTX kept."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    ordered = [c for name in names for c in capabilities if c.mimeType.lower() == f"video/{name.lower()}"]
    ordered += [c for c in capabilities if is_rtx(c)]
    transceiver.setCodecPreferences(ordered)


def negotiated_codec(transceiver: RTCRtpTransceiver) -> str | None:
    codecs = getattr(transceiver, "_codecs", None) or []
    return codecs[0].mimeType.split("/")[-1] if codecs else None


async def tune_sender(sender: RTCRtpSender, bitrate: int, keyframe_interval_s: float) -> None:
    """Set the encoder's bitrate once it exists, then ask for a keyframe every interval. Runs until cancelled."""
    tuned = False
    poll_s = min(0.1, keyframe_interval_s)
    waited = 0.0
    while True:
        await asyncio.sleep(poll_s)
        waited += poll_s
        if not tuned:
            encoder = getattr(sender, "_RTCRtpSender__encoder", None)
            if encoder is not None:
                if hasattr(encoder, "target_bitrate"):
                    encoder.target_bitrate = bitrate
                tuned = True
                poll_s = keyframe_interval_s
            elif not hasattr(sender, "_RTCRtpSender__encoder"):
                _warn_once("encoder", "aiortc's sender has no _RTCRtpSender__encoder: bitrate stays aiortc's default")
                tuned = True
                poll_s = keyframe_interval_s
            continue
        send_keyframe = getattr(sender, "_send_keyframe", None)
        if send_keyframe is None:
            _warn_once("keyframe", "aiortc's sender has no _send_keyframe: keyframes only on PLI")
            return
        send_keyframe()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
