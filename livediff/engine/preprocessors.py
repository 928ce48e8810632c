"""Control images: what a ControlNet sees of a frame, for many streams' frames at once.

Each preprocessor turns frames into (N, 3, H, W) control images in [0, 1] on the device, in the
engine's dtype (what diffusers' ControlNet pipelines feed: `VaeImageProcessor(do_normalize=False)`):

- `canny`: Canny edges (OpenCV, thresholds `CANNY_LOW` / `CANNY_HIGH` on the grey image, as in
  diffusers' ControlNet examples), white edges on black, computed on the host frame, which is
  in host memory already; one host-to-device copy for the batch.
- `depth`: a depth estimator's map (`livediff.models.depth`), one batched network call on the
  device for every frame that needs it: the frame is resized (aspect kept, sides a multiple of
  the model's patch) so that its shorter side is the model's input size or the frame's own,
  whichever is smaller (a 256x256 frame is not enlarged to Depth Anything's 518 only to be shrunk
  again), normalised as the model's processor says, and the map scaled back to the frame and
  stretched to [0, 1] per frame (near is bright, as those models output inverse depth).
- `previous`: the stream's previous output frame (TemporalNet-style: the last picture steers the
  next), the input frame itself until there is one.

The engine times each as a stage of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from livediff.backends.base import Runner
from livediff.models.depth import DepthParts

CANNY_LOW = 100
CANNY_HIGH = 200
"""Hysteresis thresholds of `cv2.Canny` (levels of 255 on the grey image's gradient)."""


def upload(frames: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 host frames -> (N, 3, H, W) in [0, 1] on `device` in `dtype` (one copy)."""
    host = torch.stack(list(frames))
    images = host.to(device, non_blocking=True).to(dtype).div_(255.0)
    if images.dim() == 3:  # one channel: the same in all three
        return images.unsqueeze(1).expand(-1, 3, -1, -1)
    return images.permute(0, 3, 1, 2)


def canny(frames: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Canny edges of (H, W, 3) uint8 RGB host frames -> (N, 3, H, W) in {0, 1}."""
    edges = []
    for frame in frames:
        grey = cv2.cvtColor(np.ascontiguousarray(frame.numpy()), cv2.COLOR_RGB2GRAY)
        edges.append(torch.from_numpy(cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)))
    return upload(edges, device, dtype)


def depth(pixels: torch.Tensor, model: DepthParts, network: Runner) -> torch.Tensor:
    """(N, 3, H, W) frames in [-1, 1] on the device -> (N, 3, H, W) depth maps in [0, 1], same dtype.

    `network` is `model`'s network as the engine's backend runs it (`livediff.backends.create_depth`):
    (N, 3, h, w) normalised images in the engine's dtype -> (N, h', w') depth, one call for the batch.
    """
    height, width = pixels.shape[-2:]
    images = pixels.float().add(1.0).mul_(0.5)  # [0, 1], resized in float32 (no bfloat16 kernel on the CPU)
    images = F.interpolate(images, size=model.input_size(height, width), mode="bilinear", antialias=True,
                           align_corners=False)  # fmt: skip
    mean = torch.tensor(model.mean, device=images.device)[:, None, None]
    std = torch.tensor(model.std, device=images.device)[:, None, None]
    predicted = network(((images - mean) / std).to(pixels.dtype))  # (N, h, w)
    maps = F.interpolate(predicted.unsqueeze(1).float(), size=(height, width), mode="bilinear", align_corners=False)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-6)
    return maps.to(pixels.dtype).expand(-1, 3, -1, -1)
