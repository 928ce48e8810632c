"""ICE candidates in the descriptions livediff takes and gives: what real clients send, what a server behind NAT says.

Remote offers (`accept_remote`)
-------------------------------
The server always answers (it is the ICE-controlled agent, RFC 8445 section 6.1.1) and its
answer carries its own host candidates, so a client that can reach one of them connects even
when the server knows none of the client's addresses: the client's connectivity checks arrive,
and the server learns the client's address from them as a peer-reflexive candidate
(RFC 8445 section 7.3.1.3). Two things in real offers defeat that in aiortc 1.16 / aioice 0.13:

* **`a=end-of-candidates` with no usable candidate.** A browser that finished gathering before
  it sent its offer marks the end (RFC 8838 section 8.2). aioice then has an empty check list and
  nothing more to wait for, so `Connection.connect()` reports failure at once: the server's ICE
  transport closes (clearing its own candidates, so the answer goes out with *none*) and the
  peer sits in `new` until the connect deadline reaps it. Browsers send such offers when every
  candidate they have is one the server cannot use, e.g. `.local` names only.
* **mDNS host candidates** (`<uuid>.local`, draft-ietf-mmusic-mdns-ice-candidates), which Firefox
  sends by default and Chromium sends when the page has no camera permission. aioice resolves
  them by multicast DNS, which only works on the client's own link: from a routed network the
  lookup times out after 1 s (delaying the answer by that second) and the candidate is dropped.

`accept_remote` removes both from a remote offer before aiortc sees it: the server then never
concludes that ICE failed on its own (only the connect deadline ends a peer that no client check
ever reaches) and learns every client address from the client's own checks. Nothing is lost:
a candidate the server could use is one the client's checks come from anyway, since the client
(the controlling agent) checks every pair it has, towards the server's candidates in the answer.
`ACCEPT_REMOTE_REASON` and `tests/test_candidates.py` hold aiortc to the behaviour this relies on:
if a new aiortc/aioice connects such an offer by itself, the test says so and this can go.

Local answers (`announce`)
--------------------------
A cloud VM's interface has a private address; the provider maps a public address to it 1:1
(every port). aioice gathers the private one, which no client can reach. `announce` rewrites the
host candidates (and the `c=` line) of the server's answer to the public address, keeping the
port: the provider's NAT carries packets to that port on to the private address and aioice's
socket there (what other WebRTC servers call a NAT 1:1 mapping or an announced address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

MDNS_SUFFIX = ".local"
ACCEPT_REMOTE_REASON = (
    "aioice fails ICE at once when a remote description ends its candidates (a=end-of-candidates) "
    "with none it can use, instead of waiting for peer-reflexive candidates"
)


def is_mdns(host: str) -> bool:
    """Whether a candidate's address is an mDNS name (`<uuid>.local`)."""
    return host.lower().rstrip(".").endswith(MDNS_SUFFIX)


def accept_remote(sdp: str) -> str:
    """The remote offer `sdp` without `a=end-of-candidates` and without mDNS (`.local`) candidates.

    Every other line is kept byte for byte; lines end with CRLF as RFC 8866 section 5 asks.
    """
    kept = [line for line in sdp.splitlines() if line and not _unusable(line)]
    return "\r\n".join(kept) + "\r\n"


def _unusable(line: str) -> bool:
    if line.strip() == "a=end-of-candidates":
        return True
    if line.startswith("a=candidate:"):
        fields = line.split()
        return len(fields) > 4 and is_mdns(fields[4])
    return False


def announce(sdp: str, mapping: Mapping[str, str]) -> str:
    """The local description `sdp` with its host candidates' addresses (and the `c=` lines) mapped.

    `mapping` is `livediff.config.nat_1to1_map`'s result (`"*"` maps every IPv4 address but
    loopback). Ports, priorities and foundations are kept: the public address reaches the same
    socket. Addresses with no mapping (loopback, IPv6 without an entry) are left as they are.
    """
    if not mapping:
        return sdp
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) > 7 and fields[7] == "host":
                fields[4] = _mapped(fields[4], mapping)
                line = " ".join(fields)
        elif line.startswith("c=IN IP"):
            fields = line.split()
            if len(fields) == 3:
                fields[2] = _mapped(fields[2], mapping)
                line = " ".join(fields)
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def _mapped(address: str, mapping: Mapping[str, str]) -> str:
    if address in mapping:
        return mapping[address]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if "*" in mapping and ip.version == 4 and not ip.is_loopback and not ip.is_unspecified:
        return mapping["*"]
    return address
