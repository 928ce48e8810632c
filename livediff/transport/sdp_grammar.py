"""Offers the way their senders write them: valid SDP that aiortc's parser mis-reads, rewritten first.

aiortc's `SessionDescription.parse` reads each line with fixed splits, so some lines the SDP
grammars allow make it raise (answered 400, "malformed SDP") or read a wrong value. Each rewrite
below keeps what livediff uses and drops or normalises only what aiortc mis-reads:

* `a=extmap:<id>[/<direction>] <uri> [<extension attributes>]` (RFC 8285 5, 8): aiortc splits the
  value into exactly two fields, so `a=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level vad=on`
  (RFC 6464 4) or `a=extmap:6 <uri> short` raised "too many values to unpack". Written as
  `a=extmap:<id> <uri>`: aiortc negotiates extensions by URI alone, and the answer carries no
  direction (RFC 8285 7: an answer may leave it out).
* `a=fmtp:<pt> <parameters>` (RFC 8866 6.15, RFC 4855 3): the parameters are `;`-separated and
  their names are case-insensitive (RFC 6838 4.3); aiortc splits on `;` without trimming and looks
  names up exactly, so `profile-level-id=42e01f; packetization-mode=1` or `Packetization-Mode=1`
  lost the mode (and H.264 matching with it). Written with the spaces around each parameter
  removed and the names in lower case; the values (e.g. base64 `sprop-parameter-sets`) unchanged.
  An `a=fmtp` line with no parameters (or only separators) is dropped: it says nothing, and aiortc
  raised on it.
* `a=ssrc:<ssrc> <attribute>` whose attribute has no value (RFC 5576 4.1 allows it): aiortc raised
  splitting on `:`. Dropped: aiortc (and livediff) read only `cname`, `msid`, `mslabel`, `label`,
  which have values.
* `m=<media> <port>/<number of ports> ...` (RFC 8866 5.14): aiortc's m-line pattern takes one
  port. The count is dropped: with ICE (RFC 8839) the ports of an m-line are not used.
* `a=setup:<role>` (RFC 4145 4): the roles are ABNF literals, case-insensitive (RFC 5234 2.3);
  aiortc looks them up in lower case only. Written in lower case.
* any line's trailing whitespace (RFC 8866 5 has none; some senders leave a space or a tab):
  aiortc then failed to look the value up (`a=setup:actpass `). Removed.

`normalize` returns the offer unchanged when nothing applies. `check_aiortc_parses` checks, once
per process, that aiortc's parser still reads the rewritten forms as livediff relies on, and raises
`AiortcInternalsError` naming what moved (the test suite runs it, like the other aiortc guards).
"""

from __future__ import annotations

import functools
import re

from livediff.transport.aiortc_guard import AiortcInternalsError, moved

_EXTMAP = re.compile(r"a=extmap:(\d+)(?:/\S*)?[ \t]+(\S+)(?:[ \t].*)?")
_FMTP = re.compile(r"a=fmtp:(\S+)(?:[ \t]+(.*))?")
_SSRC = re.compile(r"a=ssrc:(\d+)[ \t]+([^:]+)")
_MEDIA_PORT_COUNT = re.compile(r"(m=\S+ \d+)/\d+( .*)")
_SETUP = re.compile(r"a=setup:(\S+)")


def normalize_line(line: str) -> str | None:
    """One SDP line (no line ending) as aiortc reads it right; None to leave it out."""
    line = line.rstrip(" \t")
    if line.startswith("a=extmap:"):
        match = _EXTMAP.fullmatch(line)
        return f"a=extmap:{match.group(1)} {match.group(2)}" if match else line
    if line.startswith("a=fmtp:"):
        match = _FMTP.fullmatch(line)
        if match is None:
            return line
        parameters = [_parameter(p) for p in (match.group(2) or "").split(";") if p.strip(" \t")]
        return f"a=fmtp:{match.group(1)} {';'.join(parameters)}" if parameters else None
    if line.startswith("a=ssrc:"):
        return None if _SSRC.fullmatch(line) else line
    if line.startswith("m="):
        match = _MEDIA_PORT_COUNT.fullmatch(line)
        return match.group(1) + match.group(2) if match else line
    if line.startswith("a=setup:"):
        match = _SETUP.fullmatch(line)
        return f"a=setup:{match.group(1).lower()}" if match else line
    return line


def _parameter(text: str) -> str:
    name, equals, value = text.strip(" \t").partition("=")
    return f"{name.strip(' ').lower()}{equals}{value.strip(' ')}"


def normalize(sdp: str) -> str:
    """`sdp` with every line `normalize_line` rewrites rewritten (CRLF line endings); `sdp` itself
    when no line changes."""
    lines = sdp.splitlines()
    out = [normalized for normalized in map(normalize_line, lines) if normalized is not None]
    if out == lines:
        return sdp
    return "".join(line + "\r\n" for line in out)


_SAMPLE = (
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\n"
    "a=extmap:2 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=rtpmap:96 H264/90000\r\n"
    "a=fmtp:96 profile-level-id=42e01f;packetization-mode=1\r\na=ssrc:1 cname:x\r\n"
    "a=setup:actpass\r\na=ice-ufrag:u\r\na=ice-pwd:p\r\n"
)


@functools.cache
def check_aiortc_parses() -> None:
    """Raise `AiortcInternalsError` unless aiortc parses the forms `normalize` writes as it did when
    these rewrites were made (checked once per process: the result is cached)."""
    from aiortc.sdp import SessionDescription

    sources = "aiortc/sdp.py (SessionDescription.parse)"
    try:
        media = SessionDescription.parse(_SAMPLE).media[0]
    except Exception as exc:
        raise moved("sdp_grammar", f"the sample offer no longer parses ({exc!r})", sources) from exc
    extensions = [(e.id, e.uri) for e in media.rtp.headerExtensions]
    if extensions != [(2, "urn:ietf:params:rtp-hdrext:sdes:mid")]:
        raise moved("sdp_grammar", f"a=extmap reads as {extensions}", sources)
    parameters = media.rtp.codecs[0].parameters if media.rtp.codecs else {}
    if parameters != {"profile-level-id": "42e01f", "packetization-mode": "1"}:
        raise moved("sdp_grammar", f"a=fmtp reads as {parameters}", sources)
    if media.dtls is None or media.dtls.role != "auto" or media.port != 9:
        raise moved("sdp_grammar", "a=setup:actpass or the m-line port reads differently", sources)


__all__ = ["AiortcInternalsError", "check_aiortc_parses", "normalize", "normalize_line"]
