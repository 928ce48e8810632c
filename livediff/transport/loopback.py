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
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import aioice.ice

LOOPBACK = "127.0.0.1"


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [LOOPBACK] if use_ipv4 else []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def loopback_candidates() -> Iterator[None]:
    """Within the block, ICE gathers 127.0.0.1 only (see the module docstring)."""
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = _loopback_addresses
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original
