"""WHIP/WHEP (RFC 9725) resource helpers: SDP checks, ETags, trickle-ice-sdpfrag."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from aiortc import RTCIceCandidate
from aiortc.sdp import SessionDescription, candidate_from_sdp

SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"


class SdpError(ValueError):
    """The SDP or sdpfrag is malformed; the message says why."""


def check_offer(sdp: str) -> None:
    """Cheap structural checks before aiortc parses the offer, so garbage gets a clear reason."""
    if not sdp.strip():
        raise SdpError("empty SDP")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines[0].startswith("v=0"):
        raise SdpError("SDP must start with v=0")
    if not any(line.startswith("m=video ") for line in lines):
        raise SdpError("the offer has no video m-line")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise SdpError("the offer has no DTLS fingerprint (a=fingerprint)")
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        raise SdpError("the offer has no ICE credentials (a=ice-ufrag)")
    try:
        SessionDescription.parse(sdp)
    except (ValueError, AssertionError, KeyError, IndexError) as exc:
        raise SdpError(f"cannot parse the SDP: {exc or type(exc).__name__}") from exc


def new_etag() -> str:
    return f'"{secrets.token_hex(8)}"'


def etag_matches(if_match: str, etag: str) -> bool:
    """RFC 9110 If-Match: `*` or any listed entity tag (strong comparison)."""
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or etag in tags


@dataclass
class SdpFrag:
    """A parsed trickle-ice-sdpfrag (RFC 8840) body."""

    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[RTCIceCandidate] = field(default_factory=list)
    end_of_candidates: bool = False


def parse_sdpfrag(text: str) -> SdpFrag:
    frag = SdpFrag()
    mid: str | None = None
    index = 0
    media_seen = -1
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("m="):
            media_seen += 1
            index = media_seen
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        elif line.startswith("a=ice-ufrag:"):
            frag.ufrag = line[len("a=ice-ufrag:"):]
        elif line.startswith("a=ice-pwd:"):
            frag.pwd = line[len("a=ice-pwd:"):]
        elif line == "a=end-of-candidates":
            frag.end_of_candidates = True
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[len("a=candidate:"):])
            except (AssertionError, ValueError, IndexError) as exc:
                raise SdpError(f"bad candidate line {line!r}") from exc
            candidate.sdpMid = mid
            candidate.sdpMLineIndex = max(index, 0)
            frag.candidates.append(candidate)
        elif line[:2] not in ("a=", "c=", "o=", "s=", "t=", "v="):
            raise SdpError(f"unexpected line {line!r} in sdpfrag")
    return frag
