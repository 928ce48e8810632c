"""Camera-like synthetic frames: moving shapes on a drifting gradient.

Moving content on purpose: a constant frame would flatter encoders, similarity filters and caches.
Frame `i` is a pure function of (i, size, seed, options), so runs are repeatable.

For the temporal quality figures (`livediff bench --quality`) the camera can hold its background
still (`still_background`: moving shapes over a fixed scene, as a webcam on a desk sees a person
move) and add sensor noise (`noise`), so that a run has moving and static regions and the static
ones still change by a camera's few levels from frame to frame.
"""

from __future__ import annotations

import numpy as np


class SyntheticCamera:
    """Produces (H, W, 3) uint8 RGB frames of a scene that moves a little every frame."""

    def __init__(
        self, height: int, width: int, seed: int = 0, shapes: int = 4, still_background: bool = False,
        noise: float = 0.0,
    ) -> None:  # fmt: skip
        """`still_background`: the gradient stays put (only the shapes move); `noise`: the standard
        deviation, in levels of 255, of Gaussian sensor noise added to every pixel of every frame."""
        self.height, self.width = height, width
        self.seed = seed
        self.still_background = still_background
        self.noise = noise
        rng = np.random.default_rng(seed)
        self._y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
        self._x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
        self._centres = rng.uniform(0.2, 0.8, size=(shapes, 2)).astype(np.float32)
        self._velocity = rng.uniform(-0.012, 0.012, size=(shapes, 2)).astype(np.float32)
        self._radius = rng.uniform(0.06, 0.16, size=shapes).astype(np.float32)
        self._colour = rng.integers(40, 255, size=(shapes, 3)).astype(np.float32)

    def frame(self, index: int) -> np.ndarray:
        phase = 0.0 if self.still_background else index * 0.05
        image = np.empty((self.height, self.width, 3), dtype=np.float32)
        image[..., 0] = 120 + 80 * np.sin(2 * np.pi * (self._x + phase))
        image[..., 1] = 120 + 80 * np.sin(2 * np.pi * (self._y - phase * 0.7))
        image[..., 2] = 128 + 60 * np.cos(2 * np.pi * (self._x + self._y + phase * 0.3))
        # shapes bounce inside the unit square
        travelled = (self._centres + self._velocity * index) % 2.0
        centres = 0.1 + 0.8 * (1.0 - np.abs(travelled - 1.0))  # triangle wave in [0.1, 0.9]
        for (cy, cx), radius, colour in zip(centres, self._radius, self._colour):
            inside = (self._y - cy) ** 2 + ((self._x - cx) * self.width / self.height) ** 2 < radius**2
            image[inside] = colour
        if self.noise:
            rng = np.random.default_rng((self.seed, index))
            image += rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        return image.clip(0, 255).astype(np.uint8)

    def frames(self, count: int, start: int = 0) -> list[np.ndarray]:
        return [self.frame(start + i) for i in range(count)]
