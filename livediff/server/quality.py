"""Live temporal quality of each session: warp error, static-region flicker and SSIM, sampled off the frame path.

Once a second per session (`SAMPLE_INTERVAL_S`), the session's last two processed frames (inputs
and outputs at the engine's size, references the scheduler hands over with each output: no copy on
the frame path) go to one background thread, which shrinks them to `SAMPLE_SIDE` pixels and
measures them (`livediff.quality`: the same definitions as `livediff bench --quality`). The
figures are smoothed (`SMOOTHING`) and shown in the session's `stats` messages, in
`/api/sessions/{id}` and, as histograms of every sample, in `/metrics`. Nothing here runs in the
engine step or on the event loop beyond keeping two references and a time check per frame; when
the thread is still busy with an earlier pair, a sample is skipped, never queued.

Downscaled figures differ from full-size ones (flow and SSIM see less detail); they are for
watching a session change, not for comparing with the bench's numbers.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from livediff import quality
from livediff.session import FrameOut, Session

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
"""Seconds between two samples of one session."""
SAMPLE_SIDE = 128
"""Longest side, in pixels, of the frames the figures are measured on (~3 ms a pair here)."""
SMOOTHING = 0.3
"""Weight of the newest sample in the moving average of each figure (about 3 samples' memory)."""
FIGURES = ("warp_error", "flicker", "ssim")

Pair = tuple[torch.Tensor, torch.Tensor]
"""(input, output) of one frame: (H, W, 3) uint8 host tensors at the engine's size."""


@dataclass
class LiveQuality:
    """One session's sampling state and smoothed figures (`Session.quality`)."""

    previous: Pair | None = None
    last_sample: float = -math.inf
    busy: bool = False
    samples: int = 0
    warp_error: float | None = None
    flicker: float | None = None
    ssim: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """For `stats` messages and the API: figures rounded (None until measured), and the sample count."""

        def value(x: float | None, digits: int) -> float | None:
            return None if x is None else round(x, digits)

        return {"warp_error": value(self.warp_error, 2), "flicker": value(self.flicker, 2),
                "ssim": value(self.ssim, 3), "samples": self.samples}  # fmt: skip

    def add(self, figures: dict[str, float]) -> None:
        """Fold one sample in (NaN figures, e.g. flicker on a scene with no still pixel, leave theirs as they were)."""
        for name in FIGURES:
            value = figures[name]
            if math.isnan(value):
                continue
            old = getattr(self, name)
            setattr(self, name, value if old is None else old + SMOOTHING * (value - old))
        self.samples += 1


def measure_pair(before: Pair, after: Pair, side: int = SAMPLE_SIDE) -> dict[str, float]:
    """The three figures of two consecutive frames, measured at `side` pixels (see `livediff.quality`)."""
    inputs = [quality.downscale(pair[0].numpy(), side) for pair in (before, after)]
    outputs = [quality.downscale(pair[1].numpy(), side) for pair in (before, after)]
    return {
        "warp_error": quality.pair_warp_error(inputs, outputs),
        "flicker": quality.pair_flicker(inputs, outputs),
        "ssim": quality.ssim(outputs[1], inputs[1]),
    }


class QualitySampler:
    """Takes the scheduler's outputs (a `StepObserver`) and measures a pair per session per interval on its thread.

    `observe(figures)` is called on that thread with each sample's raw figures (the metrics histograms).
    """

    def __init__(self, observe: Any = None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        import cv2

        cv2.setNumThreads(1)  # OpenCV's own pool would take cores from the engine for a 128-pixel frame
        self.interval_s = interval_s
        self.observe = observe
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livediff-quality")

    def on_step(self, outputs: list[tuple[Session, FrameOut]], dropped_out: int = 0) -> None:
        now = time.monotonic()
        for session, out in outputs:
            if out.frames is not None and not session.params.passthrough:
                self.offer(session, out.frames, now)

    def offer(self, session: Session, pair: Pair, now: float) -> None:
        """Keep `pair` as the session's latest; start a sample when one is due and the thread is free."""
        live = session.quality
        if live is None:
            live = session.quality = LiveQuality()
        previous, live.previous = live.previous, pair
        if previous is None or live.busy or now - live.last_sample < self.interval_s:
            return
        live.busy, live.last_sample = True, now
        future = self._executor.submit(measure_pair, previous, pair)
        future.add_done_callback(lambda done: self._done(live, done))

    def _done(self, live: LiveQuality, done: Future[dict[str, float]]) -> None:
        live.busy = False
        try:
            figures = done.result()
        except Exception:  # a sample that fails costs a figure, never the session
            log.exception("quality sample failed")
            return
        live.add(figures)
        if self.observe is not None:
            self.observe(figures)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
