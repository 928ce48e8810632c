"""A causal Wan 2.1 transformer: diffusers' `WanTransformer3DModel`, run block-causally over chunks.

The weights and configuration are diffusers' `WanTransformer3DModel` as they are (patch (1, 2, 2),
the 1.3B model: 30 layers, 12 heads x 128, FFN 8960, text dim 4096), so a causal checkpoint in that
layout loads with `from_pretrained`. What changes is how a forward pass runs: `forward_chunk` takes
the latent frames of one chunk per row and lets them attend, in every self-attention layer, to the
keys and values of the row's earlier frames (its `KVCache`) and to its own frames; nothing attends
to a later chunk. This is the block-causal attention of CausVid (Yin et al., "From Slow
Bidirectional to Fast Autoregressive Video Diffusion Models", 2024) and Self-Forcing (Huang et
al., 2025), which StreamDiffusionV2 (Feng et al., 2025, arXiv 2511.07399) serves live.

Rules taken from those systems:
- keys are cached after the rotary embedding, at the frame's absolute position (CausVid's
  `CausalWanSelfAttention`); a chunk's queries sit at the next positions;
- the cache keeps the first `sink` frames and a window of the most recent ones (StreamDiffusionV2's
  sink-token rolling KV cache), and when positions pass a limit they are refreshed (its "RoPE
  refresh"): the window's keys are rotated back so that it follows the sinks again
  (`KVCache.refresh`), which keeps every window-to-query distance as it was;
- the prompt's cross-attention keys and values depend on the prompt alone: computed once per
  prompt (`CrossKV`), not per chunk.

Per-stream state (caches, positions, prompt K/V) is passed in and never kept on the module, so
rows of different streams, prompts, timesteps and cache lengths share one call (padding the
shorter caches and masking the padding out).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import get_1d_rotary_pos_embed

WAN_1_3B: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
"""Wan 2.1 T2V 1.3B (diffusers' `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` transformer/config.json)."""

TINY_VIDEO: dict[str, Any] = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64,
                                  freq_dim=64, ffn_dim=128, num_layers=2)  # fmt: skip
"""The built-in `tiny-video` transformer: the same code and layout, 2 layers of 2 heads x 32."""


@dataclass(frozen=True)
class CrossKV:
    """A prompt's cross-attention keys and values in every layer: computed once per prompt."""

    keys: tuple[torch.Tensor, ...]
    """Per layer, (1, text tokens, heads, head_dim)."""
    values: tuple[torch.Tensor, ...]
    """Per layer, (1, text tokens, heads, head_dim)."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` (..., head_dim), pairs interleaved as Wan's (diffusers' `WanAttnProcessor`):
    pair (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos); `cos`/`sin` broadcast to `x`."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class Rope:
    """Wan's 3D rotary frequencies (the split and theta of diffusers' `WanRotaryPosEmbed`) at any
    frame position: the temporal part is computed for the positions asked, not read from a table,
    so positions are not bounded by `rope_max_seq_len` (they are refreshed before they grow large)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - self.h_dim - self.w_dim
        self.theta = theta

    def _part(self, dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        where: Any = positions.to(torch.float64)  # diffusers types it as an array; it takes a tensor as well
        cos, sin = get_1d_rotary_pos_embed(dim, where, self.theta, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=torch.float64)  # fmt: skip
        return cos.float(), sin.float()

    def frames(self, positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(F * height * width, 1, head_dim) cos and sin for frames at `positions` (F,) of a
        `height` x `width` token grid, frame-major like the patch embedding's flattening."""
        device = positions.device
        parts = [self._part(self.t_dim, positions), self._part(self.h_dim, torch.arange(height, device=device)),
                 self._part(self.w_dim, torch.arange(width, device=device))]  # fmt: skip
        count = positions.numel()
        out = []
        for which in (0, 1):
            t, h, w = (p[which] for p in parts)
            grid = torch.cat([t.view(count, 1, 1, -1).expand(count, height, width, -1),
                              h.view(1, height, 1, -1).expand(count, height, width, -1),
                              w.view(1, 1, width, -1).expand(count, height, width, -1)], dim=-1)  # fmt: skip
            out.append(grid.reshape(count * height * width, 1, -1))
        return out[0], out[1]

    def shift(self, delta: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(head_dim,) cos and sin that move keys already rotated at frame p to frame p + `delta`
        (rotations compose; the spatial parts stay as they are)."""
        t_cos, t_sin = self._part(self.t_dim, torch.tensor([float(delta)], device=device))
        rest = self.h_dim + self.w_dim
        cos = torch.cat([t_cos[0], torch.ones(rest, device=device)])
        sin = torch.cat([t_sin[0], torch.zeros(rest, device=device)])
        return cos, sin


@dataclass
class Row:
    """One row of a `forward_chunk` call: a stream's chunk and its state."""

    cross: CrossKV
    cache_keys: tuple[torch.Tensor, ...]
    """Per layer, (cached tokens, heads, head_dim): the stream's cached keys (rotated), maybe empty."""
    cache_values: tuple[torch.Tensor, ...]
    """Per layer, (cached tokens, heads, head_dim)."""
    positions: torch.Tensor
    """(F,) the absolute frame positions of the chunk's latent frames."""
    extra: tuple[int, ...] = ()
    """Rows of the same call whose chunk keys and values this row also attends to, in every layer,
    after its cached tokens and before its own (Stream Batch: a chunk finished in an earlier call
    whose context pass runs in this one). Those rows must not attend to this one."""


class CausalWan:
    """`forward_chunk` over a diffusers `WanTransformer3DModel`; keeps no stream state."""

    def __init__(self, model: Any) -> None:
        """`model`: a `WanTransformer3DModel` (typed Any: diffusers' model classes are opaque to mypy)."""
        self.model = model
        config = self.model.config
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.attention_head_dim)
        self.layers = int(config.num_layers)
        self.patch = tuple(int(p) for p in config.patch_size)
        if self.patch[0] != 1:
            raise ValueError(f"a causal Wan model needs a temporal patch of 1, got patch_size {self.patch}")
        self.rope = Rope(self.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.patch[1]) * (latent_width // self.patch[2])

    def cross_kv(self, embeds: torch.Tensor) -> CrossKV:
        """The prompt's keys and values in every layer from its text encoder states (1, tokens, text_dim)."""
        context = self.model.condition_embedder.text_embedder(embeds.to(self.dtype))
        keys, values = [], []
        for block in self.model.blocks:
            attn = block.attn2
            keys.append(attn.norm_k(attn.to_k(context)).unflatten(2, (self.heads, -1)))
            values.append(attn.to_v(context).unflatten(2, (self.heads, -1)))
        return CrossKV(tuple(keys), tuple(values))

    def forward_chunk(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: list[Row], keep: bool = False,
                      dense: Callable[..., Any] | None = None,
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:  # fmt: skip
        """The flow prediction for one chunk per row.

        latents: (B, C, F, h, w) noisy latents; timesteps: (B,) in [0, 1000]; rows: B `Row`s (all
        with F positions). Self-attention of row b sees its cached tokens, its extra rows' chunk
        tokens and its own F frames. Returns (B, C, F, h, w) flow (noise - clean, the Wan
        flow-matching target) and, when `keep`, per layer the (B, F * tokens, heads, head_dim) keys
        (rotated) and values of the chunk, to be cached by the caller (else an empty list).

        `dense`: what runs `dense_forward` (a compiled or graph-replayed form of it; by default the
        method itself). Everything that varies from call to call in Python (rows' cache lengths,
        extras, positions) is turned into tensors of one layout first (`dense_inputs`), so that a
        compiled form sees only tensors and recompiles only for a new layout."""
        inputs = self.dense_inputs(latents, timesteps, rows)
        run: Callable[..., Any] = dense or self.dense_forward
        flow, kept = run(*inputs, keep=keep)
        return flow, list(kept)

    def dense_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: list[Row]) -> tuple[Any, ...]:
        """`dense_forward`'s tensors for `rows`: latents (B, C, F, h, w); timesteps (B,); the rotary
        cos and sin (B, S, 1, head_dim); per layer the caches padded to the longest (B, Lc, heads,
        head_dim), keys and values; the extra rows (B, E) (-1: none); the attention mask
        (B, 1, 1, Lc + E * S + S), True where a row may look, or None when every row sees all;
        per layer the prompts' keys and values (B, text tokens, heads, head_dim).
        Its layout (what a compiled form specialises on): B, F, h, w, Lc, E, the mask's presence."""
        height, width = latents.shape[-2:]
        grid_h, grid_w = height // self.patch[1], width // self.patch[2]
        tokens = latents.shape[2] * grid_h * grid_w
        device = latents.device
        ropes = [self.rope.frames(row.positions, grid_h, grid_w) for row in rows]
        cos = torch.stack([c for c, _ in ropes])  # (B, S, 1, head_dim)
        sin = torch.stack([s for _, s in ropes])
        cached = [row.cache_keys[0].shape[0] if row.cache_keys else 0 for row in rows]
        longest, extras = max(cached), max(len(row.extra) for row in rows)
        past_k = tuple(_padded([row.cache_keys[i] if row.cache_keys else None for row in rows], longest, self)
                       for i in range(self.layers))  # fmt: skip
        past_v = tuple(_padded([row.cache_values[i] if row.cache_values else None for row in rows], longest, self)
                       for i in range(self.layers))  # fmt: skip
        extra = torch.tensor([list(row.extra) + [-1] * (extras - len(row.extra)) for row in rows], device=device,
                             dtype=torch.long).view(len(rows), extras)  # fmt: skip
        mask = None
        if any(n != longest for n in cached) or any(len(row.extra) != extras for row in rows):
            valid = [[p < n for p in range(longest)]
                     + [e < len(row.extra) for e in range(extras) for _ in range(tokens)]
                     + [True] * tokens for n, row in zip(cached, rows)]  # fmt: skip
            mask = torch.tensor(valid, device=device)[:, None, None, :]
        text_k = tuple(torch.cat([row.cross.keys[i] for row in rows]) for i in range(self.layers))
        text_v = tuple(torch.cat([row.cross.values[i] for row in rows]) for i in range(self.layers))
        return latents, timesteps, cos, sin, past_k, past_v, extra, mask, text_k, text_v

    def dense_forward(self, latents: torch.Tensor, timesteps: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      past_k: tuple[torch.Tensor, ...], past_v: tuple[torch.Tensor, ...], extra: torch.Tensor,
                      mask: torch.Tensor | None, text_k: tuple[torch.Tensor, ...], text_v: tuple[torch.Tensor, ...],
                      keep: bool = False,
                      ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:  # fmt: skip
        """`forward_chunk` on the tensors of `dense_inputs` (no Python state: what a compiled form
        or a CUDA graph replays). Self-attention keys of row b: its padded cache, then the chunk
        keys of its extra rows (this layer's, computed in this call), then its own."""
        model, dtype = self.model, self.dtype
        batch, _, frames, height, width = latents.shape
        grid_h, grid_w = height // self.patch[1], width // self.patch[2]
        x = model.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, S, D)
        extras = extra.shape[1]
        gather = extra.clamp(min=0)

        embedder = model.condition_embedder
        t_freq = embedder.timesteps_proj(timesteps.float())
        temb = embedder.time_embedder(t_freq.to(next(embedder.time_embedder.parameters()).dtype)).type_as(x)
        modulation = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)

        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(model.blocks):
            shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + modulation.float()).chunk(6, 1)
            # 1. self-attention over the row's cache, its extra rows' chunks and its own chunk
            h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
            attn = block.attn1
            q = rotate(attn.norm_q(attn.to_q(h)).unflatten(2, (self.heads, -1)), cos, sin)
            k = rotate(attn.norm_k(attn.to_k(h)).unflatten(2, (self.heads, -1)), cos, sin)
            v = attn.to_v(h).unflatten(2, (self.heads, -1))
            if keep:
                kept.append((k, v))
            keys, values = [past_k[i], k], [past_v[i], v]
            if extras:
                keys.insert(1, k[gather].flatten(1, 2))  # (B, E * S, heads, head_dim)
                values.insert(1, v[gather].flatten(1, 2))
            k, v = torch.cat(keys, dim=1), torch.cat(values, dim=1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask).transpose(1, 2).flatten(2).type_as(x)  # fmt: skip
            x = (x.float() + attn.to_out[0](out) * gate).type_as(x)
            # 2. cross-attention to the prompt's precomputed keys and values
            attn = block.attn2
            q = attn.norm_q(attn.to_q(block.norm2(x.float()).type_as(x))).unflatten(2, (self.heads, -1))
            q, text_keys, text_values = q.transpose(1, 2), text_k[i].transpose(1, 2), text_v[i].transpose(1, 2)
            out = F.scaled_dot_product_attention(q, text_keys, text_values)
            out = out.transpose(1, 2).flatten(2).type_as(x)
            x = x + attn.to_out[0](out)
            # 3. feed-forward
            h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
            x = (x.float() + block.ffn(h).float() * c_gate).type_as(x)

        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = model.proj_out(x)  # (B, S, C * ph * pw)
        _, ph, pw = self.patch
        x = x.reshape(batch, frames, grid_h, grid_w, ph, pw, -1)  # the patch's channels last, as diffusers
        flow = x.permute(0, 6, 1, 2, 4, 3, 5).reshape(batch, -1, frames, grid_h * ph, grid_w * pw)
        return flow, tuple(kept)


def _padded(parts: list[torch.Tensor | None], length: int, model: CausalWan) -> torch.Tensor:
    """(B, length, heads, head_dim): each row's cached tokens first, zeros after (masked out)."""
    found = next((p for p in parts if p is not None), None)
    if found is None:
        return torch.zeros((len(parts), length, model.heads, model.head_dim), device=model.device, dtype=model.dtype)
    out = found.new_zeros((len(parts), length, *found.shape[1:]))
    for b, part in enumerate(parts):
        if part is not None:
            out[b, : part.shape[0]] = part
    return out


def build_transformer(config: dict[str, Any], seed: int = 0) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` of `config` at random weights (seeded: the same every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)
