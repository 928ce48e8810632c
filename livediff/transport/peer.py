"""Peer connections as livediff makes them: ICE servers, codec preferences, encoder settings.

Encoder choices (every sender of a session's output is fed by its `Fanout`: one encoder per codec):
* codec: the first of `ServerSettings.video_codecs` (default VP8, then H.264) that the remote
  offer carries. Set with `setCodecPreferences` on transceivers created *before*
  `setRemoteDescription`, which aiortc then matches to the offer's m-lines.
* bitrate: `ServerSettings.bitrate`, lowered to the lowest receiver estimate (REMB) among the
  senders that share the encoder; aiortc's encoders clamp it (H.264 0.5-3 Mbit/s, VP8
  0.25-1.5 Mbit/s).
* keyframes: every `keyframe_interval_s`, on a receiver's PLI/FIR, and when a sender starts
  (a new viewer starts on a keyframe); see `livediff.transport.fanout`.
"""

from __future__ import annotations

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.codecs import is_rtx
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from livediff.transport import h264_profiles, loss_recovery, sctp_params
from livediff.transport.ice_servers import IceServerConfig
from livediff.transport.loss_recovery import LossStats


def create_peer(
    ice: IceServerConfig, marker_completion: bool = True, loss_totals: LossStats | None = None
) -> RTCPeerConnection:
    """A server-side peer with the configured STUN/TURN servers (none by default: no look-up
    delays on a LAN, and never aiortc's own default STUN server), H.264 Main and High among the
    codecs it receives (`h264_profiles`), SCTP packets with malformed chunk parameters dropped
    instead of looping forever (`sctp_params`) and, with `marker_completion`, marker-bit frame
    completion and loss recovery (`loss_recovery`: NACKs repeated, holes given up, keyframes
    asked for) on its video receivers, counted into `loss_totals` too if given."""
    h264_profiles.enable()  # idempotent
    sctp_params.reject_malformed_params()  # idempotent
    pc = RTCPeerConnection(RTCConfiguration(iceServers=ice.for_peer()))
    if marker_completion:
        loss_recovery.enable_for(pc, loss_totals)
    return pc


def prefer_codecs(transceiver: RTCRtpTransceiver, names: tuple[str, ...]) -> None:
    """Order the transceiver's video codecs by `names` (e.g. ("H264", "VP8")), RTX kept."""
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    ordered = [c for name in names for c in capabilities if c.mimeType.lower() == f"video/{name.lower()}"]
    ordered += [c for c in capabilities if is_rtx(c)]
    transceiver.setCodecPreferences(ordered)


def negotiated_codec(transceiver: RTCRtpTransceiver) -> RTCRtpCodecParameters | None:
    """The transceiver's codec (the first negotiated one) once the answer is made; None before."""
    codecs = getattr(transceiver, "_codecs", None) or []
    return codecs[0] if codecs else None
