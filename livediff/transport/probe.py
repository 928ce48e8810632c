"""The latency-probe frame id: a strip of large black/white blocks painted into a frame.

Format (shared by the latency page, the server and the tests)
-------------------------------------------------------------
* The strip is the top 1/8 of the frame: 2 rows x 16 columns of equal blocks. With a frame of
  width W and height H, block (row r, column c) covers x in [c*W/16, (c+1)*W/16) and
  y in [r*H/16, (r+1)*H/16), edges rounded down.
* 32 bits, row 0 left to right then row 1 left to right, most significant bit first:
  the 24-bit frame id, then CRC-8 of the id's 3 bytes (big-endian), CRC-8/I-432-1:
  polynomial 0x07, initial value 0x00, final XOR 0x55 (an all-black or all-white strip is not valid).
* A 1 bit is white (RGB 255,255,255), a 0 bit is black (0,0,0).
* Reading: the mean luma of the middle half (in each direction) of each block, thresholded at
  the midpoint between the darkest and the brightest block mean (at least 48 apart, else no id);
  the id is valid only when the CRC matches. A frame under 48 px either way carries no id
  (its blocks are under 3 px, with no middle to read). Block centres survive VP8/H.264 compression at the
  sizes we use (blocks of 8 px and more).

The server reads the id from each input frame (at the camera's own size, before any resize)
and paints the same id onto the output frame after the engine, at the engine size.
"""

from __future__ import annotations

import functools

import numpy as np

ROWS = 2
COLUMNS = 16
BITS = ROWS * COLUMNS
ID_BITS = 24
MAX_ID = (1 << ID_BITS) - 1
_MIN_CONTRAST = 48.0


def crc8(data: bytes) -> int:
    """CRC-8/I-432-1 (poly 0x07, init 0, xorout 0x55)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def encode_bits(frame_id: int) -> list[int]:
    """The 32 block values (0 or 1) for `frame_id`, in reading order."""
    if not 0 <= frame_id <= MAX_ID:
        raise ValueError(f"frame id must be in 0..{MAX_ID}, got {frame_id}")
    word = (frame_id << 8) | crc8(frame_id.to_bytes(3, "big"))
    return [(word >> (BITS - 1 - i)) & 1 for i in range(BITS)]


def _block(height: int, width: int, index: int) -> tuple[int, int, int, int]:
    row, column = divmod(index, COLUMNS)
    return (row * height // 16, (row + 1) * height // 16, column * width // COLUMNS, (column + 1) * width // COLUMNS)


def paint(image: np.ndarray, frame_id: int) -> None:
    """Paint `frame_id` into `image` ((H, W, 3) uint8 RGB or (H, W) luma), in place."""
    height, width = image.shape[:2]
    for index, bit in enumerate(encode_bits(frame_id)):
        y0, y1, x0, x1 = _block(height, width, index)
        image[y0:y1, x0:x1] = 255 if bit else 0


@functools.lru_cache(maxsize=16)
def _inner_blocks(height: int, width: int) -> tuple[np.ndarray, ...]:
    """Each block's middle half (y0, y1, x0, x1 arrays), the part that is read."""
    bounds = np.array([_block(height, width, index) for index in range(BITS)])
    y0, y1, x0, x1 = bounds.T
    dy, dx = np.maximum(1, (y1 - y0) // 4), np.maximum(1, (x1 - x0) // 4)
    return y0 + dy, y1 - dy, x0 + dx, x1 - dx


def _block_means(plane: np.ndarray) -> np.ndarray:
    """The mean of each block's middle half: per block row, one sum over its rows, then prefix sums."""
    y0, y1, x0, x1 = _inner_blocks(*plane.shape[:2])
    means = np.empty(BITS)
    for row in range(ROWS):
        blocks = slice(row * COLUMNS, (row + 1) * COLUMNS)
        top, bottom = int(y0[blocks.start]), int(y1[blocks.start])  # the same for the whole row
        columns = plane[top:bottom].sum(axis=0, dtype=np.float64)
        if columns.ndim == 2:  # RGB: the channels' mean
            columns = columns.mean(axis=1)
        running = np.concatenate(([0.0], columns.cumsum()))
        means[blocks] = (running[x1[blocks]] - running[x0[blocks]]) / ((bottom - top) * (x1[blocks] - x0[blocks]))
    return means


def read(plane: np.ndarray) -> int | None:
    """The frame id painted in `plane` ((H, W) luma, or (H, W, 3) RGB), or None when there is none."""
    height, width = plane.shape[:2]
    if min(height, width) < 3 * 16:  # blocks under 3 px have no middle to read
        return None
    means = _block_means(plane)
    low, high = float(means.min()), float(means.max())
    if high - low < _MIN_CONTRAST:
        return None
    word = int("".join("1" if m > (low + high) / 2 else "0" for m in means), 2)
    frame_id, check = word >> 8, word & 0xFF
    return frame_id if crc8(frame_id.to_bytes(3, "big")) == check else None
