"""What `livediff serve` says while it starts: progress through the model load and engine build.

A first start exports and compiles every network (tens of seconds on a CPU, minutes for
TensorRT); the backends log a line per step (`exporting unet ...`, `compiling unet ...`). Those
lines carry the seconds since the command started (the CLI's log format), and when a step runs
long without a new line, `wait_loaded` says what is still running and for how long.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("livediff.startup")

REMIND_EVERY_S = 10.0
"""A quiet spell this long during the load gets a `still loading` line (the UNet's ONNX export
alone took 16 s at 512x512 on 2 cores)."""


def print_loading() -> None:
    """The first line of `livediff serve`, printed as soon as its port is bound."""
    print(
        "livediff: loading; the URL follows once the model is ready (a first start also builds its engines)", flush=True
    )


class LastLine(logging.Handler):
    """Remembers livediff's latest log line and when it came (the step a long load is on)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text = "starting"
        self.at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != log.name:  # its own reminders are not a step
            self.text = record.getMessage()
            self.at = time.monotonic()


async def wait_loaded(
    load: asyncio.Task[None], stop: asyncio.Event, started: float, remind_every_s: float = REMIND_EVERY_S
) -> bool:
    """Wait for `load`: True once it is done, False when `stop` is set first; raises its exception.

    `started` is the `time.monotonic()` the command started at. Every `remind_every_s` without a
    new livediff log line, logs the step it is still on and the seconds so far.
    """
    last = LastLine()
    root = logging.getLogger("livediff")
    root.addHandler(last)
    stopped = asyncio.ensure_future(stop.wait())
    reminded = 0.0
    try:
        while not load.done():
            due = max(last.at, reminded) + remind_every_s
            await asyncio.wait(
                [load, stopped], timeout=max(0.0, due - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if load.done():
                break
            if stopped.done():
                return False
            if time.monotonic() >= max(last.at, reminded) + remind_every_s:
                reminded = time.monotonic()
                log.info("still loading, %.0f s so far; the last step: %s", reminded - started, last.text)
        load.result()
        return True
    finally:
        root.removeHandler(last)
        stopped.cancel()
