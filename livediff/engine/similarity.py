"""Stochastic similarity filter: skip frames that barely changed and repeat the last output.

A static camera costs no GPU time. The decision runs on the host frame (already in host memory),
on a strided sample of its pixels, so it needs no device synchronisation.
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_STRIDE = 4
"""Every 4th pixel in each direction: 1/16 of the frame is plenty to see change."""


class SimilarityFilter:
    """Per-stream state: the last processed input sample and the run of skips since."""

    def __init__(self, seed: int) -> None:
        self._previous: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)
        self.consecutive_skips = 0

    def reset(self) -> None:
        self._previous = None
        self.consecutive_skips = 0

    def should_skip(self, image: torch.Tensor, threshold: float, max_skips: int) -> bool:
        """True when `image` (HWC uint8, host) may reuse the previous output.

        Skips with probability rising from 0 at `threshold` to 1 at identical frames, and never more
        than `max_skips` frames in a row, so slow drift still gets through.
        """
        pixels = image[::SAMPLE_STRIDE, ::SAMPLE_STRIDE].numpy().astype(np.float32).ravel()
        sample = pixels / 127.5 - 1.0  # centred, as the model sees it: raw pixels are all alike
        previous, self._previous = self._previous, sample
        if previous is None or self.consecutive_skips >= max_skips:
            self.consecutive_skips = 0
            return False
        norms = float(np.linalg.norm(sample) * np.linalg.norm(previous))
        similarity = float(sample @ previous) / norms if norms else 1.0
        skip_probability = max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))
        if self._rng.random() < skip_probability:
            self._previous = previous  # compare the next frame with the last one actually processed
            self.consecutive_skips += 1
            return True
        self.consecutive_skips = 0
        return False
