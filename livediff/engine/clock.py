"""Per-stage timing of an engine step without synchronising the device between stages.

On CUDA each stage boundary records an event; the durations are read after the step's one
device-to-host copy, which synchronises anyway. On CPU, wall-clock marks. A part of a stage
(the ControlNet runs inside the UNet's stage, between its calls) is timed with `part`: it counts
as a stage of its own and is taken out of the stage it ran in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageClock:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._parts: list[tuple[str, int, object, object]] = []
        """(name, index of the mark that ends the stage it ran in, start, end)."""
        self.mark("start")

    def _now(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str) -> None:
        """Marks the end of `stage` (and the start of the next)."""
        self._marks.append((stage, self._now()))

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Times the block as stage `name`, taken out of the stage it runs in (summed when repeated)."""
        start = self._now()
        yield
        self._parts.append((name, len(self._marks), start, self._now()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds per stage, in the order they ran (a part just before the stage it ran in),
        summed when a stage was marked more than once."""
        durations: dict[str, float] = {}
        if self._cuda and len(self._marks) > 1:
            self._marks[-1][1].synchronize()  # type: ignore[attr-defined]
        spans = [(stage, before, after) for (_, before), (stage, after) in zip(self._marks, self._marks[1:])]
        stage_ms = [self._elapsed(before, after) for _, before, after in spans]
        parts: dict[int, list[tuple[str, float]]] = {}
        for name, index, start, end in self._parts:  # a part ran in the stage that mark `index` ends
            ms = self._elapsed(start, end)
            parts.setdefault(index - 1, []).append((name, ms))
            if index - 1 < len(stage_ms):
                stage_ms[index - 1] -= ms
        for j, stage in enumerate([*(stage for stage, _, _ in spans), None]):
            for name, ms in parts.get(j, []):
                durations[name] = durations.get(name, 0.0) + ms
            if stage is not None:
                durations[stage] = durations.get(stage, 0.0) + max(0.0, stage_ms[j])
        return durations

    def _elapsed(self, before: object, after: object) -> float:
        if self._cuda:
            return float(before.elapsed_time(after))  # type: ignore[attr-defined]
        return (after - before) * 1000.0  # type: ignore[operator]
