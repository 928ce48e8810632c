"""Loopback-only ICE: peers in this process gather 127.0.0.1 host candidates and nothing else.

aioice (aiortc's ICE) leaves 127.0.0.1 out of its host candidates, so two peers on a machine with
only a loopback interface cannot connect, and on other machines the measured path would be a LAN
address. Measurements (`livediff bench --g2g`) and the server tests want loopback and nothing
else: no packet leaves the machine, no STUN server is asked.

aioice has no option for this; it reads its addresses from `aioice.ice.get_host_addresses` when
a peer gathers. `loopback_candidates()` swaps that function for the life of the `with` block and
restores it after. It is process-wide: every peer that gathers inside the block, client or
server, gets loopback only, which is the point. A server reachable only from its own machine is
what `livediff serve --ice-loopback` asks for (the bench's server); never for real clients.

`host_candidates(addresses)` is the same with other addresses: a cluster replica on a test node
gathers only its node's own loopback address (127.0.0.2, 127.0.0.3), so a client's media visibly
goes to the replica that holds its session (`livediff.cluster`, `LIVEDIFF_ICE_ADDRESSES`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import aioice.ice

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def host_candidates(addresses: Sequence[str]) -> Iterator[None]:
    """Within the block, ICE gathers host candidates on `addresses` (IPv4 or IPv6) only."""
    chosen = [ipaddress.ip_address(a) for a in addresses]  # ValueError names a bad address

    def gather(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(a) for a in chosen if (a.version == 4 and use_ipv4) or (a.version == 6 and use_ipv6)]

    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = gather
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


def loopback_candidates() -> AbstractContextManager[None]:
    """Within the block, ICE gathers 127.0.0.1 only (see the module docstring)."""
    return host_candidates([LOOPBACK])
