"""Per-stage timing of an engine step without synchronising the device between stages.

On CUDA each stage boundary records an event; the durations are read after the step's one
device-to-host copy, which synchronises anyway. On CPU, wall-clock marks.
"""

from __future__ import annotations

import time

import torch


class StageClock:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, stage: str) -> None:
        """Marks the end of `stage` (and the start of the next)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((stage, event))
        else:
            self._marks.append((stage, time.perf_counter()))

    def durations_ms(self) -> dict[str, float]:
        """Milliseconds per stage, summed when a stage was marked more than once."""
        durations: dict[str, float] = {}
        if self._cuda and len(self._marks) > 1:
            self._marks[-1][1].synchronize()  # type: ignore[attr-defined]
        for (_, before), (stage, after) in zip(self._marks, self._marks[1:]):
            if self._cuda:
                ms = before.elapsed_time(after)  # type: ignore[attr-defined]
            else:
                ms = (after - before) * 1000.0  # type: ignore[operator]
            durations[stage] = durations.get(stage, 0.0) + ms
        return durations
