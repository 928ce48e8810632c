"""Admission of peers that first connect, then live: publishing sessions (per server) and WHEP viewers
(per session).

A 201 is a promise: every admitted offer holds one of the `max_live` slots from its offer on, so a
peer that connects always finds its slot (before, up to `max_connecting` offers were admitted beyond
the limit and those that connected after the slots filled were ended: 40 offers against a limit of
4 got eight 201s). Beyond the limit an offer is answered 503 with `Retry-After`.

Abandoned offers (an answer never applied) must not lock real clients out, so a slot held by a peer
that has not connected is kept for `grace_s` after its answer went out (`CONNECT_GRACE_S`; a real
client connects in well under a second on a LAN, in a few through TURN), and no longer: once that
has passed, a new offer takes the slot of the oldest such peer, which is ended. To keep a real
client out, one must now send a new offer for every slot every `grace_s` seconds, and a client that
connected in time is never ended for another.

* every slot holds a connected peer: 503, `Retry-After: RETRY_AFTER_S` (a polling interval: when
  a connected peer ends, nobody can foresee);
* some slots hold peers not connected yet, none of them past its grace: 503, `Retry-After` the
  seconds until the first of them is (at least 1);
* `max_connecting` caps the peers not connected yet at once (within the limit), the same way.

Whatever happens, a peer that has not connected by the connect deadline is ended by its owner.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

RETRY_AFTER_S = 5
"""`Retry-After` when every live slot holds a connected peer: a polling interval, not a promise."""

CONNECT_GRACE_S = 3.0
"""Seconds after its answer a peer that has not connected keeps its slot against newer offers."""


class AdmissionError(Exception):
    """No slot for a new peer: answer 503 with `Retry-After: retry_after` (seconds)."""

    def __init__(self, message: str, limit: int, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class Admission:
    """Slots for peers named by a key (a session id, a viewer id): at most `max_live` admitted,
    connected or not, of which at most `max_connecting` not connected yet."""

    def __init__(
        self,
        max_live: int,
        max_connecting: int,
        what: str,
        grace_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_live = max_live
        self.max_connecting = max_connecting
        self.what = what
        """What the slots hold, plural, for messages ("sessions", "viewers of session X")."""
        self.grace_s = CONNECT_GRACE_S if grace_s is None else grace_s
        self.clock = clock
        self._live: set[str] = set()
        self._connecting: OrderedDict[str, float | None] = OrderedDict()
        """Peers not connected yet, oldest first -> when their answer went out (None: being made)."""

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def connecting(self) -> int:
        return len(self._connecting)

    def admit(self, key: str) -> str | None:
        """Give `key` a slot; returns the key it took the slot of (end that peer), if any.

        Raises `AdmissionError` when every slot is taken by a connected peer or by one still in
        its grace.
        """
        if len(self._live) >= self.max_live:
            raise AdmissionError(
                f"at the limit of {self.max_live} connected {self.what}; a slot frees when one of them ends",
                self.max_live,
            )
        evicted = None
        if len(self._live) + len(self._connecting) >= self.max_live or len(self._connecting) >= self.max_connecting:
            evicted = self._past_grace()
            if evicted is None:
                raise AdmissionError(
                    f"at the limit of {self.max_live} {self.what} ({len(self._connecting)} of them not connected "
                    f"yet, at most {self.max_connecting} at once); a peer that has not connected "
                    f"{self.grace_s:g} s after its answer gives its slot to the next offer",
                    self.max_live,
                    retry_after=self._wait(),
                )
            del self._connecting[evicted]
        self._connecting[key] = None
        return evicted

    def answered(self, key: str) -> None:
        """`key`'s answer went out: its grace starts now."""
        if key in self._connecting:
            self._connecting[key] = self.clock()

    def _past_grace(self) -> str | None:
        now = self.clock()
        return next((k for k, t in self._connecting.items() if t is not None and now - t >= self.grace_s), None)

    def _wait(self) -> int:
        """Whole seconds until the first peer not connected yet is past its grace (at least 1)."""
        now = self.clock()
        left = [self.grace_s - (now - t) for t in self._connecting.values() if t is not None]
        return max(1, math.ceil(min(left, default=1.0)))

    def connected(self, key: str) -> bool:
        """`key`'s peer connected: True (its slot was kept for it), False when it lost its slot to a
        newer offer (past its grace) or was released; then end it."""
        if key in self._live:
            return True
        if key not in self._connecting:
            return False
        del self._connecting[key]
        self._live.add(key)
        return True

    def release(self, key: str) -> None:
        """`key`'s peer ended: free its slot, whichever it held (a no-op when it held none)."""
        self._live.discard(key)
        self._connecting.pop(key, None)
