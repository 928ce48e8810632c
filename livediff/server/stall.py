"""Stacks of every thread when the event loop stops turning: a hung server explains itself.

Every request, every ICE check and every frame of every session goes through one asyncio event
loop. A call that blocks it (a thread joined, a lock held, a C call that never returns) makes the
whole server stop answering while its process still runs, and from outside nothing says why.

`StallReporter` keeps Python's `faulthandler` timer armed `after_s` seconds ahead and pushes it
back from a loop callback every `after_s / 4` seconds. While the loop turns, the timer never
fires; once the loop has been stuck for `after_s`, faulthandler's own C thread (which needs
neither the loop nor the GIL) writes "Timeout (0:00:10)!" and every Python thread's stack to
stderr, once per stall; when the loop turns again, a line says how long it was blocked.
"""

from __future__ import annotations

import asyncio
import faulthandler
import sys
from typing import TextIO

STALL_AFTER_S = 10.0
"""Seconds without a turn of the loop after which the stacks are written."""


class StallReporter:
    """Writes every thread's stack to `file` once the running loop has been blocked `after_s` seconds.

    One per process (faulthandler has a single timer): `livediff serve` starts it once the app
    serves and stops it on shutdown.
    """

    def __init__(self, after_s: float = STALL_AFTER_S, file: TextIO | None = None) -> None:
        if after_s <= 0:
            raise ValueError(f"after_s must be positive, got {after_s}")
        self.after_s = after_s
        self.file = file if file is not None else sys.stderr
        self._handle: asyncio.TimerHandle | None = None
        self._last: float | None = None

    def start(self) -> None:
        """Arm the timer and keep pushing it back from the running loop."""
        self._rearm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        faulthandler.cancel_dump_traceback_later()

    def _rearm(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._last is not None and now - self._last > self.after_s:
            print(
                f"livediff: the event loop was blocked for {now - self._last:.1f} s (the stacks above, under "
                f"'Timeout', show where)",
                file=self.file,
                flush=True,
            )
        self._last = now
        faulthandler.dump_traceback_later(self.after_s, repeat=False, file=self.file, exit=False)
        self._handle = loop.call_later(self.after_s / 4, self._rearm)
