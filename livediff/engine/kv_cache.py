"""One stream's self-attention cache: sink frames plus a rolling window of recent frames.

A causal video model's chunk attends to the keys and values of the stream's earlier latent frames.
The cache keeps the first `sink` frames for good and the `window` most recent after them; a new
frame beyond that evicts the oldest window frame (StreamDiffusionV2's sink-token rolling KV cache,
Feng et al. 2025, arXiv 2511.07399; the sink idea from StreamingLLM, Xiao et al. 2023).

Keys are stored after the rotary embedding, at the frame's absolute position (as CausVid caches
them). Positions grow by one per latent frame; when the next chunk would pass `position_limit`
the window is refreshed (StreamDiffusionV2's RoPE refresh): its keys are rotated back by the same
offset so that its oldest frame follows the sinks, and the positions go down by that offset. A
rotary embedding sees only differences of positions, so every window frame keeps its distance to
the chunks that follow; only the sinks come nearer. With no sinks a refresh changes nothing the
model computes (the test of that runs the same stream with and without refreshes).

All of it is per-stream state, allocated once at full size (the memory a session costs is known
when it opens) and freed with the stream.
"""

from __future__ import annotations

import torch

from livediff.models.wan import Rope, rotate


class KVCache:
    """Keys and values of every self-attention layer for up to `sink + window` latent frames."""

    def __init__(self, layers: int, tokens_per_frame: int, heads: int, head_dim: int, sink: int, window: int,
                 position_limit: int, device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        if window < 1 or sink < 0:
            raise ValueError(f"a KV cache needs window >= 1 and sink >= 0, got window {window}, sink {sink}")
        self.tokens_per_frame = tokens_per_frame
        self.sink = sink
        self.window = window
        self.position_limit = position_limit
        capacity = (sink + window) * tokens_per_frame
        self.keys = torch.zeros((layers, capacity, heads, head_dim), device=device, dtype=dtype)
        """(layers, capacity tokens, heads, head_dim): rotated keys, frames in order; the first `tokens` used."""
        self.values = torch.zeros_like(self.keys)
        self.positions: list[int] = []
        """The absolute position of each cached frame, oldest first (the sinks first)."""
        self.next_position = 0
        """Where the next latent frame goes."""
        self.reserved: list[int] = []
        """Stream Batch: positions of chunks in flight (`reserve_ahead`), not yet appended."""
        self.refreshes = 0

    @property
    def frames(self) -> int:
        return len(self.positions)

    @property
    def tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s cached (tokens, heads, head_dim) keys and values (views, not copies)."""
        return self.keys[index, : self.tokens], self.values[index, : self.tokens]

    def reserve(self, frames: int, rope: Rope) -> torch.Tensor:
        """The (frames,) positions of the next chunk, refreshing the window first when they would
        pass `position_limit`. Call once per chunk, before its denoising steps."""
        if self.next_position + frames > self.position_limit:
            self.refresh(rope)
        return torch.arange(self.next_position, self.next_position + frames, device=self.keys.device)

    def reserve_ahead(self, frames: int, rope: Rope) -> tuple[torch.Tensor, int]:
        """Stream Batch: the (frames,) positions of a chunk that enters while earlier ones are still in
        flight (reserved, not yet appended), and the refresh offset applied first (0 when none), which
        the caller subtracts from the positions of its chunks in flight. Each call moves
        `next_position` on; `append` takes the chunk's (shifted) positions when it is done."""
        offset = 0
        if self.next_position + frames > self.position_limit:
            offset = self.refresh(rope)
        positions = list(range(self.next_position, self.next_position + frames))
        self.reserved.extend(positions)
        self.next_position += frames
        return torch.tensor(positions, device=self.keys.device), offset

    def refresh(self, rope: Rope) -> int:
        """Rotate the window's keys back so that its oldest frame sits right after the sinks; the
        offset they moved by (0: nothing to do). Frames reserved and not yet appended count as
        appended: the offset is what it would be with them in the window, and they move by it too."""
        window = (self.positions[self.sink :] + self.reserved)[-self.window :]
        target = min(self.sink, self.next_position)
        offset = (window[0] if window else self.next_position) - target
        if offset <= 0:
            return 0
        if self.frames > self.sink:
            start = self.sink * self.tokens_per_frame
            cos, sin = rope.shift(-offset, self.keys.device)
            self.keys[:, start : self.tokens] = rotate(self.keys[:, start : self.tokens], cos, sin)
            self.positions[self.sink :] = [p - offset for p in self.positions[self.sink :]]
        self.reserved = [p - offset for p in self.reserved]
        self.next_position -= offset
        self.refreshes += 1
        return offset

    def seen(self, layer: int, extra_frames: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (tokens, heads, head_dim) keys and values as a chunk sees them when
        `extra_frames` more frames will be appended before it (Stream Batch: chunks finished, their
        context pass in the same call): the window frames those would evict are left out."""
        n = self.tokens_per_frame
        overflow = self.frames + extra_frames - (self.sink + self.window)
        keys, values = self.layer(layer)
        if overflow <= 0:
            return keys, values
        sink, start = self.sink * n, min(self.tokens, (self.sink + overflow) * n)
        return torch.cat([keys[:sink], keys[start:]]), torch.cat([values[:sink], values[start:]])

    def append(self, kept: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor) -> None:
        """Cache a chunk's keys and values: per layer (frames * tokens_per_frame, heads, head_dim),
        at `positions` (from `reserve`); the oldest window frames make room."""
        frames = positions.numel()
        if frames > self.window + self.sink:
            raise ValueError(f"a chunk of {frames} latent frames does not fit a cache of {self.sink + self.window}")
        keys = torch.stack([k for k, _ in kept])  # (layers, new tokens, heads, head_dim)
        values = torch.stack([v for _, v in kept])
        overflow = self.frames + frames - (self.sink + self.window)
        if overflow > 0:  # roll: drop the oldest window frames, keep the sinks
            sink_tokens, n = self.sink * self.tokens_per_frame, self.tokens_per_frame
            keep_from = sink_tokens + overflow * n
            kept_tokens = self.tokens - keep_from
            self.keys[:, sink_tokens : sink_tokens + kept_tokens] = self.keys[:, keep_from : self.tokens].clone()
            self.values[:, sink_tokens : sink_tokens + kept_tokens] = self.values[:, keep_from : self.tokens].clone()
            del self.positions[self.sink : self.sink + overflow]
        start = self.tokens
        self.keys[:, start : start + keys.shape[1]] = keys
        self.values[:, start : start + values.shape[1]] = values
        added = [int(p) for p in positions.tolist()]
        self.positions.extend(added)
        self.reserved = [p for p in self.reserved if p not in added]
        self.next_position = max(self.next_position, self.positions[-1] + 1)

    def reset(self) -> None:
        """Forget every frame (a scene cut): the next chunk starts at position 0."""
        self.positions.clear()
        self.reserved.clear()
        self.next_position = 0

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
