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

    def refresh(self, rope: Rope) -> None:
        """Rotate the window's keys back so that its oldest frame sits right after the sinks."""
        window = [p for p in self.positions[self.sink :]]
        target = min(self.sink, self.next_position)
        offset = (window[0] if window else self.next_position) - target
        if offset <= 0:
            return
        if window:
            start = self.sink * self.tokens_per_frame
            cos, sin = rope.shift(-offset, self.keys.device)
            self.keys[:, start : self.tokens] = rotate(self.keys[:, start : self.tokens], cos, sin)
            self.positions[self.sink :] = [p - offset for p in window]
        self.next_position -= offset
        self.refreshes += 1

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
        self.positions.extend(int(p) for p in positions.tolist())
        self.next_position = self.positions[-1] + 1

    def reset(self) -> None:
        """Forget every frame (a scene cut): the next chunk starts at position 0."""
        self.positions.clear()
        self.next_position = 0

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
