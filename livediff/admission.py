"""Admission of peers that first connect, then live: publishing sessions (per server) and WHEP viewers
(per session).

An offer costs the server a tenth of a second; a peer that never applies its answer used to
hold a full slot until the connect deadline, so four abandoned offers kept every publisher out
for 30 s, again and again. Here a slot that has not connected is cheap and short:

* live slots (`max_live`) count connected peers only. An offer is refused (503) only when they
  are all taken; the wait is then until a connected peer ends, which nobody can foresee, so
  `Retry-After` is a polling interval (`RETRY_AFTER_S`);
* peers that have not connected yet have a budget of their own (`max_connecting`). When it is
  full, a new offer takes the slot of the oldest one, which is ended (a real client connects in
  well under a second on a LAN, an abandoned offer never does; to keep a real client out, an
  attacker must now send `max_connecting` offers in less time than the client takes to connect);
* a peer that connects takes a live slot if one is free; if they all filled meanwhile (several
  peers connecting at once for the last slot), it is ended (`connected()` returns False).

Whatever happens, a peer that has not connected by the connect deadline is ended by its owner.
"""

from __future__ import annotations

from collections import OrderedDict

RETRY_AFTER_S = 5
"""`Retry-After` when every live slot holds a connected peer: a polling interval, not a promise."""


class AdmissionError(Exception):
    """Every live slot is taken: answer 503 with `Retry-After: retry_after` (seconds)."""

    def __init__(self, message: str, limit: int, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class Admission:
    """Live and connecting slots for peers named by a key (a session id, a viewer id)."""

    def __init__(self, max_live: int, max_connecting: int, what: str) -> None:
        self.max_live = max_live
        self.max_connecting = max_connecting
        self.what = what
        """What the slots hold, plural, for messages ("sessions", "viewers of session X")."""
        self._live: set[str] = set()
        self._connecting: OrderedDict[str, None] = OrderedDict()

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def connecting(self) -> int:
        return len(self._connecting)

    def admit(self, key: str) -> str | None:
        """Give `key` a connecting slot; returns the key it evicted (end that peer), if any.

        Raises `AdmissionError` when every live slot holds a connected peer.
        """
        if len(self._live) >= self.max_live:
            raise AdmissionError(
                f"at the limit of {self.max_live} connected {self.what}; a slot frees when one of them ends",
                self.max_live,
            )
        evicted = None
        if len(self._connecting) >= self.max_connecting:
            evicted, _ = self._connecting.popitem(last=False)
        self._connecting[key] = None
        return evicted

    def connected(self, key: str) -> bool:
        """`key`'s peer connected: True when it took a live slot (or had one), False when none was free
        or it was no longer admitted (evicted); then end it."""
        if key in self._live:
            return True
        if key not in self._connecting:
            return False
        del self._connecting[key]
        if len(self._live) >= self.max_live:
            return False
        self._live.add(key)
        return True

    def release(self, key: str) -> None:
        """`key`'s peer ended: free its slot, whichever it held (a no-op when it held none)."""
        self._live.discard(key)
        self._connecting.pop(key, None)
