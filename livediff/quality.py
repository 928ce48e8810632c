"""Temporal quality of a transformed video: warp error, static-region flicker, structure kept (SSIM).

All three take the same things: the input frames a camera sent and the output frames the model
made of them, uint8 RGB arrays of shape (H, W, 3), in order. Pixel figures are on the 0-255
scale of those frames (one level = 1/255 of full scale), averaged over the three channels.

1. **Warp error** (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018; the
   temporal metric StreamV2V, arXiv 2405.15757, reports): the motion between consecutive *input*
   frames is estimated by optical flow (OpenCV's DIS), the output frame t is warped along it onto
   frame t+1, and the mean absolute difference to output t+1 is taken over the pixels whose motion
   is trusted: forward and backward flow agree (the consistency test of Sundaram et al., "Dense
   point trajectories by GPU-accelerated large displacement optical flow", ECCV 2010, with their
   alpha 0.01 and beta 0.5 px^2) and the pixel came from inside the frame. Occluded and
   disoccluded pixels have no counterpart and are left out. An output that moves exactly as its
   input scores ~0; frames that change at random score ~85 (the mean |a - b| of uniform levels).
2. **Static-region flicker**: the mean absolute change of the output between consecutive frames,
   over the pixels where the input did not change (both frames box-blurred 5x5 first, so that
   camera noise is not taken for change; a pixel is static when no channel moved by
   `STATIC_THRESHOLD` levels or more). What a viewer sees as boiling textures on a still scene.
3. **SSIM** between each output frame and its own input (Wang et al., "Image quality
   assessment: from error visibility to structural similarity", IEEE TIP 2004; scikit-image's
   implementation, 7x7 window, per channel then averaged): 1 is the input's structure unchanged,
   lower means more of it was replaced. With a trained img2img model above about 0.85 reads as
   coherent, below 0.75 as visible artifacts; with random weights it measures nothing but change.

Nothing here runs on the engine's per-frame path: `livediff bench --quality` calls it after the
frames are made, and the server samples a pair of frames now and then on a background thread
(`livediff.server.quality`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

OCCLUSION_ALPHA = 0.01
"""Forward-backward consistency: |f + b|^2 < alpha (|f|^2 + |b|^2) + beta (Sundaram et al. 2010)."""
OCCLUSION_BETA = 0.5
"""The same test's allowance in px^2 (Sundaram et al. 2010)."""
STATIC_THRESHOLD = 2.0
"""Levels (0-255) a blurred input pixel may change and still count as static: above the noise of a
camera (sensor noise of sigma 2 levels leaves sigma ~0.6 after the 5x5 blur), well below motion."""
STATIC_BLUR = 5
"""Box-blur size (pixels) applied to both input frames before the static test."""


@dataclass(frozen=True)
class QualityFigures:
    """The three figures over a run of frames; NaN where a figure had nothing to measure."""

    warp_error: float
    """Mean abs difference of output t+1 from output t warped along the input's motion, 0-255 levels."""
    flicker: float
    """Mean abs change of the output where the input stayed still, 0-255 levels."""
    ssim: float
    """Mean SSIM of each output frame against its input, -1..1 (1 = same structure)."""
    pairs: int
    """Consecutive frame pairs the temporal figures are averaged over."""

    def as_dict(self, digits: int = 3) -> dict[str, float | int | None]:
        """JSON-ready: rounded, NaN as None."""

        def value(x: float) -> float | None:
            return None if math.isnan(x) else round(x, digits)

        return {"warp_error": value(self.warp_error), "flicker": value(self.flicker), "ssim": value(self.ssim),
                "pairs": self.pairs}  # fmt: skip


_DIS = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM


def optical_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(H, W, 2) float32 flow from `first` to `second` (RGB uint8): pixel (x, y) of `first` is at
    (x + flow[y, x, 0], y + flow[y, x, 1]) in `second`. OpenCV's DIS flow (Kroeger et al., ECCV 2016)
    on the luma, medium preset."""
    dis = cv2.DISOpticalFlow_create(_DIS)  # type: ignore[attr-defined]  # one per call: instances keep state
    return dis.calc(_gray(first), _gray(second), None)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """`image` resampled at (x + flow_x, y + flow_y) for every pixel (bilinear; outside the frame: 0).

    With the backward flow of frame t+1 (towards frame t), this carries frame t onto frame t+1.
    """
    map_x, map_y = _sample_maps(flow)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def trusted_motion(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """(H, W) bool over frame t+1: where its backward flow is trusted.

    `forward` is the flow t -> t+1, `backward` t+1 -> t. A pixel p of frame t+1 is trusted when it
    came from inside frame t and going back then forth returns to it: |b(p) + f(p + b(p))|^2 <
    alpha (|b(p)|^2 + |f(p + b(p))|^2) + beta. Occluded and disoccluded pixels fail the test.
    """
    height, width = backward.shape[:2]
    map_x, map_y = _sample_maps(backward)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mismatch = np.square(backward + forward_there).sum(axis=2)
    magnitude = np.square(backward).sum(axis=2) + np.square(forward_there).sum(axis=2)
    return inside & (mismatch < OCCLUSION_ALPHA * magnitude + OCCLUSION_BETA)


def pair_warp_error(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Warp error of one pair: `inputs` and `outputs` hold frames t and t+1; 0-255 levels, NaN when
    no pixel's motion is trusted."""
    forward = optical_flow(inputs[0], inputs[1])
    backward = optical_flow(inputs[1], inputs[0])
    trusted = trusted_motion(forward, backward)
    if not trusted.any():
        return math.nan
    carried = warp(outputs[0], backward).astype(np.float32)
    return float(np.abs(carried - outputs[1].astype(np.float32))[trusted].mean())


def pair_flicker(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Static-region flicker of one pair (frames t and t+1); 0-255 levels, NaN when nothing stood still."""
    size = (STATIC_BLUR, STATIC_BLUR)
    before, after = (cv2.blur(frame, size).astype(np.float32) for frame in inputs[:2])
    static = (np.abs(after - before) < STATIC_THRESHOLD).all(axis=2)
    if not static.any():
        return math.nan
    change = np.abs(outputs[1].astype(np.float32) - outputs[0].astype(np.float32))
    return float(change[static].mean())


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of `image` against `reference` (same shape, uint8 RGB), -1..1 (scikit-image, 7x7 window)."""
    from skimage.metrics import structural_similarity  # imported on use: scipy takes a while to load

    return float(structural_similarity(image, reference, channel_axis=2, data_range=255))


def measure(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> QualityFigures:
    """The three figures over a run: temporal ones averaged over consecutive pairs, SSIM over frames.

    `inputs[i]` is the frame that produced `outputs[i]`; at least two frames.
    """
    if len(inputs) != len(outputs) or len(inputs) < 2:
        raise ValueError(f"need as many outputs as inputs, at least 2; got {len(inputs)} and {len(outputs)}")
    for frame in (*inputs, *outputs):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape != inputs[0].shape or frame.shape[2] != 3:
            raise ValueError(f"frames must be uint8 (H, W, 3) of one shape; got {frame.dtype} {frame.shape}")
    warps, flickers = [], []
    for t in range(len(inputs) - 1):
        pair_in, pair_out = inputs[t : t + 2], outputs[t : t + 2]
        warps.append(pair_warp_error(pair_in, pair_out))
        flickers.append(pair_flicker(pair_in, pair_out))
    return QualityFigures(
        warp_error=_mean(warps),
        flicker=_mean(flickers),
        ssim=_mean([ssim(out, frame) for frame, out in zip(inputs, outputs)]),
        pairs=len(inputs) - 1,
    )


def downscale(frame: np.ndarray, longest: int) -> np.ndarray:
    """`frame` shrunk (area averaging) so its longer side is at most `longest` pixels; as is when smaller."""
    height, width = frame.shape[:2]
    scale = longest / max(height, width)
    if scale >= 1.0:
        return frame
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _sample_maps(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
