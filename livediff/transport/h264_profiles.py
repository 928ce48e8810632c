"""Receive H.264 Main and High, not only (Constrained) Baseline: rows added to aiortc's codec table.

Why
---
aiortc lists H.264 in its codec table (``aiortc.codecs.CODECS["video"]``) as Baseline
``42001f`` and Constrained Baseline ``42e01f`` only, and matches an offered H.264 codec to a row
by packetization mode and *profile* (``aiortc.rtcpeerconnection.is_codec_compatible``; the
level is not compared). An offer whose only video codec is H.264 Main (``4d001f``),
Constrained High (``640c1f``, what browsers offer as High) or High (``64001f``, what ``ffmpeg
-profile:v high`` produces), as OBS sends on some platforms, has no row in common and aiortc
refuses it ("Failed to set remote video description send parameters"). The decoder behind
aiortc's receiver (libavcodec's h264 through PyAV) decodes all of these profiles, B-frames
included: pictures leave the decoder in presentation order once its reorder delay is filled,
so a stream with B-frames costs that delay and nothing else.

What
----
:func:`enable` appends rows for Main (``profile-level-id=4d001f``), Constrained High
(``640c1f``) and High (``64001f``), each with packetization-mode 1, level-asymmetry-allowed 1
and its RTX row, *after* aiortc's own rows. An offer's codec is matched to the row of its own
profile, so the answer carries the offered profile, at level 3.1 as aiortc's Baseline rows
(with level-asymmetry-allowed the level only bounds what we may be sent; libavcodec reads any
level). Offers that also carry Baseline keep getting Baseline first, as before. What aiortc
*sends* stays its own encoder's Constrained Baseline bitstream, which every Main and High
decoder decodes (Constrained Baseline is a subset of Main and High, ITU-T H.264 A.2.1).

The table is module state of aiortc, shared by every peer connection in the process, so
:func:`enable` is idempotent and changes nothing else. :func:`check_aiortc_internals` verifies,
before the change, that aiortc still keeps and matches codecs the way relied upon; it raises
:class:`~livediff.transport.aiortc_guard.AiortcInternalsError` naming what moved.
"""

from __future__ import annotations

import copy
from typing import Any

from aiortc import RTCRtpCodecParameters, rtcpeerconnection
from aiortc import codecs as aiortc_codecs
from aiortc.sdp import H264Profile, parse_h264_profile_level_id

from livediff.transport.aiortc_guard import AiortcInternalsError, moved, warn_if_untested

PROFILES = {
    "4d001f": H264Profile.PROFILE_MAIN,
    "640c1f": H264Profile.PROFILE_CONSTRAINED_HIGH,
    "64001f": H264Profile.PROFILE_HIGH,
}
"""profile-level-id of each added row -> the profile aiortc must read from it (RFC 6184 8.1:
profile_idc, then the constraint flags, then level_idc; 0x0c in the flags makes High "Constrained")."""

PROFILE_NAMES = {
    H264Profile.PROFILE_CONSTRAINED_BASELINE: "Constrained Baseline",
    H264Profile.PROFILE_BASELINE: "Baseline",
    H264Profile.PROFILE_MAIN: "Main",
    H264Profile.PROFILE_CONSTRAINED_HIGH: "Constrained High",
    H264Profile.PROFILE_HIGH: "High",
}


def _fail(what: str) -> AiortcInternalsError:
    return moved("h264_profiles", what, "aiortc/codecs/__init__.py and aiortc/rtcpeerconnection.py")


def check_aiortc_internals() -> None:
    """Raise `AiortcInternalsError` unless aiortc keeps and matches video codecs as this module relies on.

    Outside `aiortc_guard.TESTED_AIORTC_RANGE` a warning is issued first; these checks decide.
    """
    warn_if_untested("h264_profiles")
    table: Any = getattr(aiortc_codecs, "CODECS", None)
    video = table.get("video") if isinstance(table, dict) else None
    if not isinstance(video, list):
        raise _fail("aiortc.codecs.CODECS is no longer a dict with a 'video' list")
    if getattr(rtcpeerconnection, "CODECS", None) is not table:
        raise _fail("RTCPeerConnection no longer negotiates from aiortc.codecs.CODECS")
    for name in ("find_common_codecs", "is_codec_compatible"):
        if not callable(getattr(rtcpeerconnection, name, None)):
            raise _fail(f"aiortc.rtcpeerconnection.{name} is gone")
    base = _h264_row(video)
    if base is None:
        raise _fail("the codec table has no H.264 row with packetization-mode 1")
    for level_id, profile in PROFILES.items():
        if parse_h264_profile_level_id(level_id)[0] != profile:
            raise _fail(f"profile-level-id {level_id} no longer reads as {profile.name}")
        offered = _row(base, level_id, base.payloadType or 0)
        if rtcpeerconnection.is_codec_compatible(base, offered):
            raise _fail("H.264 codecs are no longer matched by profile")


def _h264_row(rows: list[RTCRtpCodecParameters]) -> RTCRtpCodecParameters | None:
    return next(
        (c for c in rows if c.mimeType.lower() == "video/h264" and str(c.parameters.get("packetization-mode")) == "1"),
        None,
    )


def _row(base: RTCRtpCodecParameters, level_id: str, payload_type: int) -> RTCRtpCodecParameters:
    row = copy.deepcopy(base)
    row.payloadType = payload_type
    row.parameters = {**base.parameters, "profile-level-id": level_id}
    return row


def enabled() -> bool:
    """Whether aiortc's table has the added rows."""
    levels = {str(c.parameters.get("profile-level-id", "")).lower() for c in aiortc_codecs.CODECS["video"]}
    return set(PROFILES) <= levels


def enable() -> None:
    """Add the Main, Constrained High and High rows (with RTX) to aiortc's video codec table, once per process.

    Payload types are the lowest dynamic ones (96-127) that no audio or video row uses.
    """
    if enabled():
        return
    check_aiortc_internals()
    table = aiortc_codecs.CODECS
    base = _h264_row(table["video"])
    assert base is not None  # checked above
    rtx = next(c for c in table["video"] if aiortc_codecs.is_rtx(c))
    used = {c.payloadType for rows in table.values() for c in rows}
    free = (pt for pt in range(96, 128) if pt not in used)
    for level_id in PROFILES:
        row = _row(base, level_id, next(free))
        retransmission = copy.deepcopy(rtx)
        retransmission.payloadType = next(free)
        retransmission.parameters = {"apt": row.payloadType}
        table["video"] += [row, retransmission]


def profile_name(profile_level_id: str) -> str:
    """`Main`, `Constrained High` ... for a profile-level-id (RFC 6184 8.1), or `unknown profile`."""
    try:
        return PROFILE_NAMES.get(parse_h264_profile_level_id(profile_level_id)[0], "unknown profile")
    except ValueError:
        return "unknown profile"
