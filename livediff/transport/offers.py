"""Offers as aiortc takes them: what is checked first, and what aiortc's own failures become.

aiortc parses and negotiates an offer trusting its shape: an offer without `a=setup` raises
AttributeError deep in `setRemoteDescription`, an `a=fmtp` naming a payload type that has no
`a=rtpmap` raises StopIteration out of its SDP parser. Whatever aiortc raises on an offer is
the client's fault, so an offer goes through these steps, each ending in a clear 4xx:

1. `check_offer`: the shape every WebRTC offer has (v=0, a video m-line, a DTLS fingerprint,
   ICE credentials), every `a=fmtp` naming a payload type with an `a=rtpmap` in its m-section,
   then aiortc's parser. A parse failure names the line: aiortc parses line by line, so the
   shortest prefix of the SDP it cannot parse ends at the line it choked on (found by
   bisection, a handful of parses). Then what aiortc assumes of every m-section without
   checking it: ICE credentials, a DTLS role (`a=setup`, RFC 8842), `a=rtcp-mux` for RTP
   (RFC 8834 4.5: WebRTC multiplexes RTP and RTCP), `a=sctp-port` for data (RFC 8841), unique
   `a=mid`s (RFC 5888 4), a BUNDLE group naming only those (RFC 9143).
   -> `SdpError` (400), with the offending line where there is one.
2. `check_codecs`: per audio/video m-section, the codecs aiortc would agree on (its own
   matching: H.264 by packetization mode and profile), limited for video to the codecs the
   server is set to use. None in common -> `UnsupportedCodecs` (422), naming the codecs
   offered and the codecs accepted.
3. `with_directions`: an m-section without a direction attribute gets RFC 3264's default
   written out (aiortc does not assume it). `prepare_offer` runs steps 1-3.
0. `check_media_count`, before anything parses the offer: at most `MAX_MEDIA_SECTIONS` m-lines
   (livediff takes one video, one audio, one data channel); more -> `SdpError` (400) naming the
   limit. aiortc's negotiation costs grow with the square of the m-lines (a 400-m-line offer
   held the event loop for about a minute), so they are counted first, in one pass.
   Then `sdp_grammar.normalize` rewrites valid lines aiortc's parser mis-reads.
4. `negotiate`: set the offer, create and set the answer; anything aiortc still raises is an
   `SdpError` (400) naming aiortc's exception.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCSessionDescription, rtcpeerconnection
from aiortc import codecs as aiortc_codecs
from aiortc.sdp import MediaDescription, SessionDescription

from livediff.transport import h264_profiles, sdp_grammar
from livediff.transport.whip import SdpError

log = logging.getLogger(__name__)

_FMTP = re.compile(r"a=fmtp:(\S+)")
_RTPMAP = re.compile(r"a=rtpmap:(\S+)")


class UnsupportedCodecs(ValueError):
    """A well-formed offer whose m-section has no codec livediff can use (answered 422).

    `offered` and `accepted` name codecs as `describe` does.
    """

    def __init__(self, kind: str, offered: list[str], accepted: list[str]) -> None:
        super().__init__(
            f"no {kind} codec in common: the offer has {', '.join(offered) or 'none'}; "
            f"livediff takes {', '.join(accepted)}"
        )
        self.kind = kind
        self.offered = offered
        self.accepted = accepted


MAX_MEDIA_SECTIONS = 3
"""m-lines an offer may have: livediff takes one video, one audio (dropped) and one data channel
(what browsers, OBS and WHIP/WHEP clients send, bundled or not)."""


def check_media_count(sdp: str) -> None:
    """`SdpError` (400) naming `MAX_MEDIA_SECTIONS` when `sdp` has more m-lines; one pass, no parse."""
    count = sum(1 for line in sdp.splitlines() if line.startswith("m="))
    if count > MAX_MEDIA_SECTIONS:
        raise SdpError(
            f"the offer has {count} m-lines; livediff takes at most {MAX_MEDIA_SECTIONS} "
            "(one video, one audio, one data channel)",
            line=f"m-line {MAX_MEDIA_SECTIONS + 1}",
        )


def check_offer(sdp: str) -> SessionDescription:
    """The offer as aiortc parses it, once it has the shape aiortc relies on; else `SdpError`."""
    if not sdp.strip():
        raise SdpError("empty SDP")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines[0].startswith("v=0"):
        raise SdpError("SDP must start with v=0", line=_shown(lines[0]))
    if not any(line.startswith("m=video ") for line in lines):
        raise SdpError("the offer has no video m-line")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise SdpError("the offer has no DTLS fingerprint (a=fingerprint)")
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        raise SdpError("the offer has no ICE credentials (a=ice-ufrag)")
    _check_fmtp(sdp.splitlines())
    description = _parse(sdp)
    for index, media in enumerate(description.media):
        _check_media(index, media)
    _check_mids(description)
    return description


def _check_mids(description: SessionDescription) -> None:
    """m-line ids are unique (RFC 5888 4) and every id a BUNDLE group names is one of them (else
    aiortc leaves a peer that it cannot even close)."""
    counts = Counter(media.rtp.muxId for media in description.media if media.rtp.muxId)
    repeated = next((mid for mid, count in counts.items() if count > 1), None)
    if repeated is not None:
        line = _shown(f"a=mid:{repeated}")
        raise SdpError(f"{line} names more than one m-line", line=line)
    for group in description.group:
        missing = [str(item) for item in group.items if str(item) not in counts]
        if group.semantic == "BUNDLE" and missing:
            line = _shown(f"a=group:BUNDLE {' '.join(map(str, group.items))}")
            raise SdpError(f"{line!r} names {_shown(', '.join(missing))}, which no m-line has as its a=mid", line=line)


def _check_fmtp(lines: list[str]) -> None:
    """Every `a=fmtp:<pt>` names a payload type with an `a=rtpmap:<pt>` in its m-section (aiortc
    raises StopIteration otherwise)."""
    sections: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            sections.append([])
        elif sections:
            sections[-1].append(line)
    for section in sections:
        mapped = {m.group(1) for m in map(_RTPMAP.match, section) if m}
        for line in section:
            match = _FMTP.match(line)
            if match and match.group(1) not in mapped:
                raise SdpError(
                    f"{_shown(line)!r} describes payload type {_shown(match.group(1))}, which has no "
                    "a=rtpmap line in its m-section",
                    line=_shown(line),
                )


def _parse(sdp: str) -> SessionDescription:
    try:
        return SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the line makes it raise
        error = exc
    lines = sdp.splitlines()  # as aiortc splits them
    low, high = 0, len(lines)  # parse(lines[:low]) works (nothing parsed), parse(lines[:high]) fails
    while high - low > 1:
        middle = (low + high) // 2
        try:
            SessionDescription.parse("\r\n".join(lines[:middle]))
            low = middle
        except Exception:
            high = middle
    shown = _shown(lines[high - 1])
    raise SdpError(f"cannot parse line {high} {shown!r}: {_reason(error)}", line=shown) from error


def _shown(line: str) -> str:
    """A line as error bodies quote it: at most 120 characters."""
    return line if len(line) <= 120 else line[:120] + f"... ({len(line)} characters)"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(index: int, media: MediaDescription) -> str:
    mid = f", mid {media.rtp.muxId}" if media.rtp.muxId else ""
    return f"m-line {index + 1} ({media.kind}{mid})"


def _check_media(index: int, media: MediaDescription) -> None:
    where = _where(index, media)
    if not media.ice or not media.ice.usernameFragment or not media.ice.password:
        raise SdpError(
            f"{where} has no ICE credentials: a=ice-ufrag and a=ice-pwd are needed, at session or media level",
            line="a=ice-ufrag",
        )
    if media.dtls is None:
        raise SdpError(
            f"{where} has no a=setup attribute (the DTLS role); an offer carries a=setup:actpass (RFC 8842)",
            line="a=setup",
        )
    if media.kind in ("audio", "video") and not media.rtcp_mux:
        raise SdpError(f"{where} has no a=rtcp-mux: WebRTC multiplexes RTP and RTCP (RFC 8834 4.5)", line="a=rtcp-mux")
    if media.kind == "application" and media.profile != "DTLS/SCTP" and media.sctp_port is None:
        raise SdpError(f"{where} has no a=sctp-port (RFC 8841)", line="a=sctp-port")
    for codec in media.rtp.codecs:  # aiortc compares H.264 modes with int(), which takes no None
        mode = codec.parameters.get("packetization-mode", "0")
        if codec.mimeType.lower() == "video/h264" and str(mode) not in ("0", "1", "2"):
            raise SdpError(
                f"{where}: payload type {codec.payloadType}'s packetization-mode is {mode!r}; it is 0, "
                "1 or 2 (RFC 6184 8.1)",
                line=f"a=fmtp:{codec.payloadType}",
            )


def accepted_codecs(kind: str, names: tuple[str, ...]) -> list[RTCRtpCodecParameters]:
    """The rows of aiortc's codec table a livediff peer negotiates for `kind`: for video, those
    named in `names` (e.g. ("H264", "VP8")), in that order, H.264 with Main and High added."""
    h264_profiles.enable()
    rows = [c for c in aiortc_codecs.CODECS[kind] if not aiortc_codecs.is_rtx(c)]
    if kind != "video":
        return rows
    return [c for name in names for c in rows if c.mimeType.lower() == f"video/{name.lower()}"]


def check_codecs(description: SessionDescription, video_codecs: tuple[str, ...]) -> None:
    """Raise `UnsupportedCodecs` for the first audio/video m-section with no codec in common."""
    for media in description.media:
        if media.kind not in ("audio", "video"):
            continue
        accepted = accepted_codecs(media.kind, video_codecs)
        if rtcpeerconnection.find_common_codecs(accepted, media.rtp.codecs):
            continue
        offered = [describe(c) for c in media.rtp.codecs if not aiortc_codecs.is_rtx(c)]
        raise UnsupportedCodecs(
            media.kind, list(dict.fromkeys(offered)), list(dict.fromkeys(describe(c) for c in accepted))
        )


def describe(codec: RTCRtpCodecParameters) -> str:
    """A codec as error bodies name it: `VP8/90000`, `opus/48000/2`,
    `H264/90000 High (profile-level-id=64001f, packetization-mode=1)`."""
    name = f"{codec.mimeType.split('/')[-1]}/{codec.clockRate}" + (f"/{codec.channels}" if codec.channels else "")
    if codec.mimeType.lower() != "video/h264":
        return name
    level_id = str(codec.parameters.get("profile-level-id", "42e01f"))
    mode = codec.parameters.get("packetization-mode", 0)
    return f"{name} {h264_profiles.profile_name(level_id)} (profile-level-id={level_id}, packetization-mode={mode})"


DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


def with_directions(sdp: str) -> str:
    """`sdp` with a direction attribute in every m-section: RFC 3264 5.1's default written out
    (the session-level one, else `a=sendrecv`), which aiortc does not assume (it fails with
    "None is not in list"). Returned unchanged when every m-section has one."""
    lines = sdp.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    attributes = {f"a={d}" for d in DIRECTIONS}
    session = next((line for line in lines[: starts[0]] if line.strip() in attributes), "a=sendrecv").strip()
    sections = [lines[a:b] for a, b in zip(starts, starts[1:])]
    if all(any(line.strip() in attributes for line in section) for section in sections):
        return sdp
    out = lines[: starts[0]]
    for section in sections:
        out += section if any(line.strip() in attributes for line in section) else section + [session]
    return "".join(line + "\r\n" for line in out)


def prepare_offer(sdp: str, video_codecs: tuple[str, ...]) -> RTCSessionDescription:
    """The offer to hand aiortc: at most `MAX_MEDIA_SECTIONS` m-lines, the valid lines aiortc
    mis-reads rewritten (`sdp_grammar.normalize`), checked (`check_offer`, `check_codecs`, raising
    `SdpError` or `UnsupportedCodecs`), with RFC 3264's default directions written out
    (`with_directions`)."""
    check_media_count(sdp)
    sdp_grammar.check_aiortc_parses()
    sdp = sdp_grammar.normalize(sdp)
    check_codecs(check_offer(sdp), video_codecs)
    return RTCSessionDescription(sdp=with_directions(sdp), type="offer")


async def negotiate(pc: RTCPeerConnection, offer: RTCSessionDescription) -> None:
    """Set `offer` as the remote description and answer it; whatever aiortc raises is an `SdpError`.

    The caller closes `pc` on failure.
    """
    try:
        await pc.setRemoteDescription(offer)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # the offer is the only input here: its fault, answered 400
        log.info("offer refused by aiortc: %s", _reason(exc))
        raise SdpError(f"cannot negotiate this offer: {_reason(exc)}") from exc
