"""av.VideoFrame <-> uint8 HWC tensors at the engine size, with av's C scaler (no PIL, no Python loops).

Input frames of any size are scaled preserving their aspect ratio so that they cover the engine
size, then centre-cropped (a 1280x720 camera into 512x512 keeps the middle 720x720 square).
Output frames are sent at the engine size as yuv420p, converted once here rather than once per
encoder (one per codec, shared by every viewer).

Each conversion keeps its own swscale context from frame to frame (one reformatter per thread and
direction): `VideoFrame.reformat` sets one up for every frame, which at 512x512 cost more than
the conversion itself (rgb -> yuv 0.74 vs 0.45 ms per frame on this project's 2-core test box).
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

_local = threading.local()


def _reformatter(direction: str) -> VideoReformatter:
    """This thread's reformatter for `direction` ("in", "out")."""
    reformatters: dict[str, VideoReformatter] = _local.__dict__.setdefault("reformatters", {})
    if direction not in reformatters:
        reformatters[direction] = VideoReformatter()
    return reformatters[direction]


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The smallest size with `width:height`'s aspect that covers `target_w x target_h`."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, math.ceil(width * scale - 1e-6)), max(target_h, math.ceil(height * scale - 1e-6))


def frame_to_tensor(frame: av.VideoFrame, width: int, height: int) -> torch.Tensor:
    """A decoded frame as an (height, width, 3) uint8 RGB tensor: scaled to cover, centre-cropped."""
    scaled_w, scaled_h = cover_size(frame.width, frame.height, width, height)
    rgb: np.ndarray = _reformatter("in").reformat(frame, width=scaled_w, height=scaled_h, format="rgb24").to_ndarray()
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    if (scaled_w, scaled_h) != (width, height):
        rgb = np.ascontiguousarray(rgb[top : top + height, left : left + width])
    return torch.from_numpy(rgb)


def luma(frame: av.VideoFrame) -> np.ndarray:
    """The frame's Y plane as an (H, W) uint8 array (a view, no conversion, for yuv420p input)."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "nv12", "gray"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


def array_to_frame(rgb: np.ndarray, pts: int | None, time_base: Fraction | None) -> av.VideoFrame:
    """An (H, W, 3) uint8 RGB array as a yuv420p frame carrying the input frame's pts and time base."""
    frame = _reformatter("out").reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), format="yuv420p")
    frame.pts = pts
    if time_base is not None:
        frame.time_base = time_base
    return frame
