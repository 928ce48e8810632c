"""Batch choice by deadline: the measured step time per batch size, and the largest batch that keeps
every stream's frame interval.

A bigger batch serves more frames per second (the step's fixed cost, hundreds of small kernels,
is paid once for all its frames) but each step takes longer, and while it runs no stream gets a
frame back. A stream at 30 fps needs a frame every 33.3 ms: a step longer than that misses its
interval however many frames it carries. So the scheduler measures, at warm-up, how long a step
of each batch size takes (`measure_step_times`: 1 to `max_batch` frames, each layout run until
it is warm, recorded where the backend records), keeps that `StepTable`, and before each step
takes the largest batch whose step fits the tightest interval of the admitted streams
(`StepTable.batch_for`), the rest of the ready frames going into the next step. Serving as many
streams as possible within every interval is the rule vLLM's scheduler applies to token budgets
(a plan per step from CPU bookkeeping, tested with hand-built numbers); here the budget is time.

`StepTable.capacity(fps)` is what `/readyz` and `/metrics` report: how many streams at `fps` the
engine holds at its size, the most over the batch sizes b whose step fits one interval of
b * (steps of b that fit in one interval).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

REFERENCE_FPS = 30.0
"""The camera rate capacity is reported at, and assumed for a stream whose rhythm is not known yet."""


@dataclass(frozen=True)
class StepTable:
    """Measured milliseconds of one engine step per batch size (frames in the step)."""

    step_ms: Mapping[int, float] = field(default_factory=dict)
    """Batch size -> wall-clock ms of a whole step of that many frames (upload to host copy)."""

    def __post_init__(self) -> None:
        for batch, ms in self.step_ms.items():
            if batch < 1 or not ms > 0:
                raise ValueError(f"step times need batch sizes >= 1 and positive ms, got {batch}: {ms}")

    def fits(self, batch: int, interval_ms: float) -> bool:
        """Whether a measured step of `batch` frames ends within `interval_ms`."""
        ms = self.step_ms.get(batch)
        return ms is not None and ms <= interval_ms

    def batch_for(self, ready: int, interval_ms: float, max_batch: int) -> int:
        """How many of `ready` frames the next step takes: the largest measured batch <= `ready` (and
        `max_batch`) whose step fits `interval_ms`, the tightest frame interval of the admitted
        streams. When not even one frame fits (the engine is slower than the cameras), every ready
        frame up to `max_batch`: each stream misses its interval anyway, and a full batch serves
        the most frames per second. An empty table leaves the batch as it was (no measurement)."""
        limit = min(ready, max_batch)
        if limit <= 0 or not self.step_ms:
            return max(limit, 0)
        for batch in range(limit, 0, -1):
            if self.fits(batch, interval_ms):
                return batch
        return limit

    def capacity(self, fps: float = REFERENCE_FPS) -> int:
        """How many streams at `fps` the engine holds: max over batch sizes b whose step fits one
        frame interval of b * floor(interval / step(b)) (0 when none fits)."""
        interval = 1000.0 / fps
        best = 0
        for batch, ms in self.step_ms.items():
            if ms <= interval:
                best = max(best, batch * math.floor(interval / ms))
        return best

    def describe(self, fps: float = REFERENCE_FPS) -> dict[str, Any]:
        """For `/readyz`: the step time per batch size (ms, 2 decimals) and the capacity at `fps`."""
        return {
            "step_ms": {str(b): round(ms, 2) for b, ms in sorted(self.step_ms.items())},
            f"streams_at_{fps:g}fps": self.capacity(fps),
        }


def tightest_interval_ms(intervals_s: list[float | None], fps: float = REFERENCE_FPS) -> float:
    """The shortest frame interval in ms among the streams' camera intervals (seconds; None: not
    known yet, taken as `fps`). With no stream at all, one interval at `fps`."""
    known = [1000.0 * (i if i is not None else 1.0 / fps) for i in intervals_s]
    return min(known, default=1000.0 / fps)


def measure_step_times(engine: Any, max_batch: int, runs: int | None = None) -> StepTable:
    """The step time of 1 to `max_batch` frames on `engine` (a `StreamEngine`), each batch size run
    `runs` times and the last timed. By default 3 where the backend records layouts (the first runs
    eagerly and the second records: by the third the step is as warm as it will be), else 2 (on a
    CPU each extra step of 512x512 costs a second of start-up). Runs on the engine's thread.

    Each step ends with the frames' copy to the host, so wall-clock time is the step's time with no
    extra synchronisation. The streams use the default params with the similarity filter off, so
    every frame runs the networks.
    """
    if runs is None:
        runs = 3 if hasattr(engine.backend, "graphs") else 2
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    import torch

    from livediff.config import StreamParams

    params = StreamParams(similarity_filter=False)
    streams = [engine.open_stream(params) for _ in range(max_batch)]
    image = torch.zeros(engine.frame_shape, dtype=torch.uint8)
    table: dict[int, float] = {}
    for batch in range(1, max_batch + 1):
        frames = [(stream, image) for stream in streams[:batch]]
        for _ in range(runs - 1):
            engine.step(frames)
        start = time.perf_counter()
        engine.step(frames)
        table[batch] = (time.perf_counter() - start) * 1000.0
    warmed = getattr(engine.backend, "warmed", None)
    if warmed is not None:  # the batch sizes compiled here join the compile cache
        warmed()
    result = StepTable(table)
    log.info("step times by batch size (ms): %s; %d streams at 30 fps", result.describe()["step_ms"],
             result.capacity())  # fmt: skip
    return result
