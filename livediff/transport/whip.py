"""WHIP/WHEP (RFC 9725) resource helpers: SDP errors, ETags, trickle-ice-sdpfrag.

Offers are checked in `livediff.transport.offers`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from aiortc import RTCIceCandidate
from aiortc.sdp import candidate_from_sdp

SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"


class SdpError(ValueError):
    """The SDP or sdpfrag is malformed; the message says why, `line` names the line or attribute."""

    def __init__(self, message: str, line: str | None = None) -> None:
        super().__init__(message)
        self.line = line


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
            mid = line[len("a=mid:") :]
        elif line.startswith("a=ice-ufrag:"):
            frag.ufrag = line[len("a=ice-ufrag:") :]
        elif line.startswith("a=ice-pwd:"):
            frag.pwd = line[len("a=ice-pwd:") :]
        elif line == "a=end-of-candidates":
            frag.end_of_candidates = True
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[len("a=candidate:") :])
            except (AssertionError, ValueError, IndexError) as exc:
                raise SdpError(f"bad candidate line {line!r}") from exc
            candidate.sdpMid = mid
            candidate.sdpMLineIndex = max(index, 0)
            frag.candidates.append(candidate)
        elif line[:2] not in ("a=", "c=", "o=", "s=", "t=", "v="):
            raise SdpError(f"unexpected line {line!r} in sdpfrag")
    return frag


def is_ice_restart(frag: SdpFrag, remote_sdp: str) -> bool:
    """Whether a PATCH body asks for an ICE restart: it carries an `ice-ufrag` or `ice-pwd` other
    than those of the remote description in force (RFC 8839 4.4.1.1.1: new credentials restart
    ICE; RFC 9725 4.3.2: a WHIP client restarts ICE by PATCHing them)."""
    ufrags = {
        line[len("a=ice-ufrag:") :].strip() for line in remote_sdp.splitlines() if line.startswith("a=ice-ufrag:")
    }
    pwds = {line[len("a=ice-pwd:") :].strip() for line in remote_sdp.splitlines() if line.startswith("a=ice-pwd:")}
    return (frag.ufrag is not None and frag.ufrag not in ufrags) or (frag.pwd is not None and frag.pwd not in pwds)
