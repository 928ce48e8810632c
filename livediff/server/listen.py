"""The listening sockets of `livediff serve`, bound before anything is loaded.

A busy port, a `--host` that is not an address of this machine or a port that needs privileges
is answered at once, in one line naming the flag that changes it, instead of after the model has
loaded. The sockets are handed to aiohttp (`web.SockSite`), which listens on them.

Imports nothing heavy: the CLI binds before it imports torch, aiortc or the model code.
"""

from __future__ import annotations

import errno
import os
import socket

from livediff.errors import ConfigError


def bind(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) TCP sockets for `host` and `port`, one per address `host` resolves to.

    `host` is an address or a name (`localhost` may give both 127.0.0.1 and ::1), `""` or
    `0.0.0.0` for every IPv4 interface; `port` 0 picks a free port, the same for every address.
    Raises ConfigError naming `--port` (busy, or below 1024 without privileges) or `--host`
    (does not resolve, or not an address of this machine); the sockets bound so far are closed.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address, and the name does not resolve ({exc.strerror})") from None
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix":  # as asyncio does: restart at once over the last run's TIME_WAIT
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # every address on the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigError(_explain(exc, host, port or int(address[1]))) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _explain(exc: OSError, host: str, port: int) -> str:
    where = f"{host}:{port}" if host else f"port {port}"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use on {host or 'this machine'} (another livediff?): choose another with --port"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"port {port} needs privileges to listen on: choose one from 1024 up with --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine: use 127.0.0.1, 0.0.0.0 or one of its own"
    return f"cannot listen on {where}: {exc.strerror} (see --host and --port)"


def bound_port(sockets: list[socket.socket]) -> int:
    """The port the sockets listen on (the one picked when `--port 0`)."""
    return int(sockets[0].getsockname()[1])
