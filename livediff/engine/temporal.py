"""Per-stream temporal state: the feature bank's keys and values, batched into a UNet call and back;
the motion estimate that motion-aware strength follows.

The UNet side (which layers, how attention uses the bank) is `livediff.backends.temporal_attention`.
Here is what a stream keeps between frames, and how one step's rows are put together:

1. Each stream with `temporal_bank` > 0 has a `FeatureBank`: for every *slot* (a denoising step
   index, and for classifier-free guidance the conditional or unconditional branch: features at one
   noise level are only comparable with features at the same level) a ring of the last `frames`
   frames' keys and values, one (frames, 2, tokens, channels) tensor per self-attention layer.
   Rings are allocated on first use and live in the stream, never on the model.
2. `gather` turns the rows of one UNet call (each a stream's slot, or None for a row without a
   bank) into the graph's inputs (`BankFeed`): N = the largest bank size among the rows (at least
   1; the sizes, not how full the banks are, so a call's shapes never change while banks fill), a
   (rows, N) bias with ln(weight) on filled slots and `EMPTY_SLOT` elsewhere, and per layer (rows,
   N, 2, tokens, channels) keys and values (zeros where empty). A single stream with a full ring
   passes views of its ring, no copy.
3. `store` keeps each banked row's new keys and values, overwriting its ring's oldest frame.

The engine gathers every UNet call's feed of a step before its `unet` stage and stores what the
calls returned after it: the stage sees tensors of fixed shapes (for a given layout: batch, steps,
guidance and each row's bank size) and never indexes by host state, so under `cuda-graph` it is
recorded once per layout and replayed, the rings (static buffers per stream, allocated at their
full size on first use and written in place) copied in and out around the replay.

Memory per stream: `frames` x slots x `TemporalBank.bytes_per_frame(dtype)` (`FeatureBank.nbytes`
says what a bank holds). Per frame and slot at 512x512: the tiny model's 4 layers x 2 x 1024 tokens
x 64 channels, 0.5 M values (2 MiB in float32, 1 MiB in bfloat16); the SD 2.1 UNet of SD-Turbo, 16
layers, 23.1 M values (44 MiB in float16; 11 MiB at 256x256). So SD-Turbo, 1 step, no guidance,
a bank of 2 frames: 88 MiB per stream at 512x512.

Motion-aware strength (after StreamDiffusionV2's motion-aware noise controller, Feng et al., arXiv
2511.07399): `MotionEstimate` measures how much the camera's frame changed since the last one (the
mean absolute difference of a small, block-averaged copy of the frame, 0-255 levels), smooths it
(exponential moving average), and maps it to a strength between the stream's bounds: the high bound
on a still scene (denoise strongly: more style, and nothing moves to flicker), falling linearly to
the low bound at `MOTION_FULL` levels and above (denoise conservatively: the output keeps to the
moving input instead of redrawing it every frame). It runs in the engine step on the host frame:
0.4 ms at 256x256, 1-1.5 ms at 512x512 here (2 shared Zen 4 cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from livediff.backends.temporal_attention import EMPTY_SLOT, BankLayer

Slot = tuple[int, int]
"""(denoising step index, guidance branch: 0 conditional, 1 unconditional)."""


@dataclass
class _Ring:
    kv: list[torch.Tensor]
    """Per layer (frames, 2, tokens, channels); slots [0, filled) hold frames, in no particular order."""
    filled: int = 0
    next: int = 0


@dataclass
class FeatureBank:
    """One stream's bank: the keys and values of its last `frames` frames, per slot and layer."""

    layers: tuple[BankLayer, ...]
    frames: int
    """1 to `MAX_BANK_FRAMES`."""
    weight: float
    """Attention weight of a bank frame's keys relative to the current frame's (the bias is ln(weight))."""
    device: torch.device
    dtype: torch.dtype
    rings: dict[Slot, _Ring] = field(default_factory=dict)

    @property
    def bias(self) -> float:
        return math.log(self.weight)

    def filled(self, slot: Slot) -> int:
        ring = self.rings.get(slot)
        return 0 if ring is None else ring.filled

    def advance(self, slot: Slot) -> list[torch.Tensor]:
        """Where the next frame of `slot` goes, one (2, tokens, channels) view per layer of its ring's
        oldest (or first free) frame, counted as filled: the caller writes it before the next `gather`.
        The ring is allocated at its full size on first use."""
        ring = self.rings.get(slot)
        if ring is None:
            ring = self.rings[slot] = _Ring([
                torch.zeros((self.frames, 2, layer.tokens, layer.channels), device=self.device, dtype=self.dtype)
                for layer in self.layers
            ])  # fmt: skip
        views = [stored[ring.next] for stored in ring.kv]
        ring.next = (ring.next + 1) % self.frames
        ring.filled = min(ring.filled + 1, self.frames)
        return views

    def clear(self) -> None:
        """Forget every frame (the memory goes with it)."""
        self.rings.clear()

    @property
    def nbytes(self) -> int:
        """Memory the bank holds now."""
        return sum(t.numel() * t.element_size() for ring in self.rings.values() for t in ring.kv)


@dataclass(frozen=True)
class BankRow:
    """A UNet row that uses a bank: whose, and at which slot."""

    bank: FeatureBank
    slot: Slot


@dataclass
class BankFeed:
    """One UNet call's bank inputs, as tensors only: what a step passes into its `unet` stage (a
    recorded stage copies them into its static inputs before each replay, so the graph reads the
    same addresses whatever the streams and however full their banks)."""

    bias: torch.Tensor
    """(rows, N) float32 on the device: ln(weight) on a row's filled slots, `EMPTY_SLOT` elsewhere."""
    bank_rows: torch.Tensor
    """(banked rows,) int64: the rows that have a bank (the torch path runs the others plainly)."""
    plain_rows: torch.Tensor
    """(rows - banked rows,) int64: the rows that have none."""
    kv: tuple[torch.Tensor, ...]
    """Per layer (rows, N, 2, tokens, channels) keys and values of earlier frames, zeros where empty."""

    def values(self) -> dict[str, torch.Tensor]:
        """The feed by graph input name (`TemporalBank.inputs`, plus the torch path's row split)."""
        values = {"bank_bias": self.bias, "bank_rows": self.bank_rows, "plain_rows": self.plain_rows}
        values.update((f"bank_kv_{i}", kv) for i, kv in enumerate(self.kv))
        return values


def bank_slots(rows: Sequence[BankRow | None]) -> int:
    """N, the bank axis of a call of `rows`: the largest bank size (`FeatureBank.frames`) among them,
    at least 1. It depends on the rows' bank sizes only, never on how full the banks are, so a
    call's shapes stay the same while banks fill (the step's layout records the sizes)."""
    return max([1, *(row.bank.frames for row in rows if row is not None)])


def gather(rows: Sequence[BankRow | None], layers: tuple[BankLayer, ...], device: torch.device,
           dtype: torch.dtype) -> BankFeed:  # fmt: skip
    """The bank inputs of one UNet call (see the module docstring, step 2), N = `bank_slots(rows)`.

    Indexed on the host: which rows have a bank and how full each ring is are Python ints here,
    and the copies out of the rings are made before the call, so the call itself (a recorded
    graph on `cuda-graph`) has no host-dependent indexing."""
    fills = [0 if row is None else row.bank.filled(row.slot) for row in rows]
    slots = bank_slots(rows)
    bias = torch.full((len(rows), slots), EMPTY_SLOT)
    for r, (row, fill) in enumerate(zip(rows, fills)):
        if row is not None and fill:
            bias[r, :fill] = row.bank.bias
    banked = [r for r, row in enumerate(rows) if row is not None]
    plain = [r for r, row in enumerate(rows) if row is None]
    only = rows[0] if len(rows) == 1 and fills[0] == slots else None
    kvs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        if only is not None:  # one stream, a full ring: its own storage, no copy
            kvs.append(only.bank.rings[only.slot].kv[i].unsqueeze(0))
            continue
        kv = torch.zeros((len(rows), slots, 2, layer.tokens, layer.channels), device=device, dtype=dtype)
        for r, (row, fill) in enumerate(zip(rows, fills)):
            if row is not None and fill:
                targets.append(kv[r, :fill])
                sources.append(row.bank.rings[row.slot].kv[i][:fill])
        kvs.append(kv)
    if targets:  # every row's and layer's copy in few launches (a launch per copy costs the host ~5 us on CUDA)
        torch._foreach_copy_(targets, sources)
    return BankFeed(
        bias=bias.to(device, non_blocking=True),
        bank_rows=torch.tensor(banked, dtype=torch.long).to(device, non_blocking=True),
        plain_rows=torch.tensor(plain, dtype=torch.long).to(device, non_blocking=True),
        kv=tuple(kvs),
    )


def store(rows: Sequence[BankRow | None], new: Sequence[torch.Tensor]) -> None:
    """Keep each banked row's new keys and values (per layer `bank_new_{i}`, (rows, 2, tokens,
    channels)) in its ring, overwriting the oldest frame: a copy into the ring's slot `next`, a
    host-side index, so it runs after the call (or its graph's replay) and never inside it."""
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        if row is not None:
            slots = row.bank.advance(row.slot)
            targets.extend(slots)
            sources.extend(layer[r] for layer in new)
    if targets:  # in few launches, as `gather`
        torch._foreach_copy_(targets, sources)


MOTION_STRIDE = 4
"""Every 4th pixel in each direction is sampled, then averaged in blocks of `MOTION_BLOCK` x
`MOTION_BLOCK` samples: the figure needs the scene's change, not its detail, and the averaging
quiets sensor noise (sigma / 4)."""
MOTION_BLOCK = 4
MOTION_FLOOR = 0.5
"""Levels of change taken for noise, not motion: sensor noise of sigma 2 levels leaves ~0.5 after the
block averaging (measured on the synthetic camera with a still scene)."""
MOTION_FULL = 10.0
"""Levels of change at and above which the strength is the low bound: every pixel of the synthetic
camera's drifting background changes by ~9.6 levels a frame; its shapes moving over a still
background give ~1.3 (at 256x256 and 512x512)."""
MOTION_SMOOTHING = 0.3
"""Weight of the newest frame in the moving average (the estimate follows within ~3 frames)."""
STRENGTH_QUANTUM = 0.01
"""Strengths are rounded to this, so a stream visits a few dozen timestep sets, each computed once."""


@dataclass
class MotionEstimate:
    """Per-stream: the smoothed motion of the input, and the strength it maps to."""

    previous: np.ndarray | None = None
    motion: float = 0.0
    """Smoothed mean absolute change per frame, levels of 255 (0 until two frames came)."""

    def observe(self, image: torch.Tensor) -> float:
        """Update from the next (H, W, 3) uint8 host frame; returns the smoothed motion."""
        sample = image[::MOTION_STRIDE, ::MOTION_STRIDE].numpy().astype(np.float32)
        rows, cols = sample.shape[0] // MOTION_BLOCK, sample.shape[1] // MOTION_BLOCK
        blocks = sample[: rows * MOTION_BLOCK, : cols * MOTION_BLOCK].reshape(rows, MOTION_BLOCK, cols, MOTION_BLOCK, 3)
        sample = blocks.mean(axis=(1, 3))
        previous, self.previous = self.previous, sample
        if previous is not None:
            change = float(np.abs(sample - previous).mean())
            self.motion += MOTION_SMOOTHING * (change - self.motion)
        return self.motion

    def strength(self, low: float, high: float) -> float:
        """`high` when still, down to `low` at `MOTION_FULL` levels of motion, rounded to `STRENGTH_QUANTUM`."""
        fast = min(1.0, max(0.0, (self.motion - MOTION_FLOOR) / (MOTION_FULL - MOTION_FLOOR)))
        strength = high - (high - low) * fast
        return max(low, min(high, round(strength / STRENGTH_QUANTUM) * STRENGTH_QUANTUM))
