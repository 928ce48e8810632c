"""Wan 2.1's VAE (diffusers' `AutoencoderKLWan`) in streaming form: each chunk encoded and decoded once.

The Wan VAE is causal in time: every 3D convolution pads on the past side only, and diffusers runs a
whole clip through it a piece at a time (the first frame, then 4 frames per latent frame to encode;
one latent frame at a time to decode), handing each causal convolution the last frames of its input
from the previous piece through a feature cache (`feat_cache`, one entry per causal convolution,
with `feat_idx` counting them). That cache lives on the module for one clip and is cleared after.
Here the same pieces come from a live stream chunk by chunk, and each stream's feature caches live
in its own `WanVaeState` (in the stream's object), swapped in per call and stacked along the batch
for streams at the same stage, so one call serves many streams and their caches never mix. Chunk
by chunk equals the whole clip at once (`tests/test_wan_vae.py`).

Scaling as Wan's pipelines do it: pixels in [0, 1] go to [-1, 1]; the encoder's mean (the posterior's
mode) is normalised with the config's `latents_mean` and `latents_std` into the transformer's space,
and back before decoding; decoded pixels are clamped to [-1, 1] and mapped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKLWan

from livediff.models.tae import TaeState

WAN_2_1_VAE: dict[str, Any] = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   attn_scales=[], temperal_downsample=[False, True, True])  # fmt: skip
"""Wan 2.1's VAE (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` vae/config.json, its defaults)."""
TINY_WAN_VAE: dict[str, Any] = dict(WAN_2_1_VAE, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
"""A few-channel `AutoencoderKLWan` of the same layout (8x spatial, 4x temporal, 16 latent channels)."""


@dataclass
class WanVaeState(TaeState):
    """One stream's Wan VAE feature caches (per causal convolution: None, "Rep" or its last input
    frames), beside `TaeState`'s counters: `encoded` chunks, `decoded` latent frames."""

    enc_cache: list[Any] = field(default_factory=list)
    dec_cache: list[Any] = field(default_factory=list)

    def reset(self) -> None:
        super().reset()
        self.enc_cache, self.dec_cache = [], []


def _stacked(caches: list[list[Any]], size: int) -> list[Any]:
    """Per causal convolution, the streams' entries stacked along the batch (all None, all "Rep",
    or tensors); `ValueError` when streams at different stages share a call."""
    out: list[Any] = []
    for i in range(size):
        entries = [c[i] if c else None for c in caches]
        if all(e is None for e in entries):
            out.append(None)
        elif all(isinstance(e, str) for e in entries):
            out.append(entries[0])
        elif all(isinstance(e, torch.Tensor) for e in entries):
            out.append(torch.cat([e for e in entries if isinstance(e, torch.Tensor)]))
        else:
            raise ValueError("streams at different stages of the Wan VAE in one call")
    return out


def _split(stacked: list[Any], caches: list[list[Any]]) -> None:
    """Hand each stream its rows of the caches a call left."""
    for b, cache in enumerate(caches):
        cache[:] = [e[b : b + 1] if isinstance(e, torch.Tensor) else e for e in stacked]


class WanStreamingVae:
    """`encode` / `decode` chunk by chunk over an `AutoencoderKLWan`, the caches per stream."""

    name = "wan-vae"
    latent_channels = 16
    time_scale = 4
    space_scale = 8

    def __init__(self, vae: Any) -> None:
        """`vae`: an `AutoencoderKLWan` (typed Any: diffusers' model classes are opaque to mypy)."""
        self.vae = vae
        config = vae.config
        self.latent_channels = int(config.z_dim)
        self._mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        counts = vae._cached_conv_counts  # diffusers' count of each half's causal convolutions
        self._enc_convs, self._dec_convs = int(counts["encoder"]), int(counts["decoder"])

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def new_state(self) -> WanVaeState:
        return WanVaeState()

    def to(self, device: torch.device | str) -> WanStreamingVae:
        self.vae.to(device)
        return self

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean.to(like.device, like.dtype), self._std.to(like.device, like.dtype)

    def encode(self, pixels: torch.Tensor, states: list[TaeState]) -> torch.Tensor:
        """(B, T, 3, H, W) in [0, 1] -> (B, T', 16, H/8, W/8) normalised latents, one row per stream.

        T is 1 + 4k for streams whose first chunk this is (all rows alike: T' = 1 + k), else 4k (T' = k)."""
        wan = [_as_wan(s) for s in states]
        first = wan[0].encoded == 0
        frames = pixels.shape[1]
        if (frames - 1 if first else frames) % self.time_scale:
            raise ValueError(f"a chunk of {frames} frames is not 4k (1 + 4k for a first chunk)")
        x = pixels.to(self.dtype).transpose(1, 2) * 2.0 - 1.0  # (B, 3, T, H, W) in [-1, 1]
        pieces = ([x[:, :, :1]] if first else []) + list(x[:, :, 1 if first else 0 :].split(self.time_scale, dim=2))
        caches = [s.enc_cache for s in wan]
        out = []
        for piece in pieces:
            stacked = _stacked(caches, self._enc_convs)
            out.append(self.vae.encoder(piece, feat_cache=stacked, feat_idx=[0]))
            _split(stacked, caches)
        moments = self.vae.quant_conv(torch.cat(out, dim=2))
        mean, std = self._scale(moments)
        latents = (moments[:, : self.latent_channels] - mean) / std  # the posterior's mode, normalised
        for s in wan:
            s.encoded += 1
        return latents.transpose(1, 2)

    def decode(self, latents: torch.Tensor, states: list[TaeState]) -> torch.Tensor:
        """(B, T', 16, h, w) normalised latents -> (B, frames, 3, 8h, 8w) in [0, 1]: 4 frames per
        latent frame, 1 for a stream's very first. Rows all at their stream's first latent frame, or
        all past it (`ValueError` else: the frame counts differ); inside, streams whose caches differ
        in shape (at their second latent frame or later) run in separate decoder calls."""
        wan = [_as_wan(s) for s in states]
        if len({s.decoded == 0 for s in wan}) > 1:
            raise ValueError("a stream's first latent frames and another's later ones give different frame counts")
        z = latents.to(self.dtype).transpose(1, 2)  # (B, 16, T', h, w)
        mean, std = self._scale(z)
        x = self.vae.post_quant_conv(z * std + mean)
        rows: list[list[torch.Tensor]] = [[] for _ in wan]
        for f in range(x.shape[2]):
            stages: dict[int, list[int]] = {}
            for b, s in enumerate(wan):
                stages.setdefault(min(s.decoded, 2), []).append(b)
            for stage, members in stages.items():
                caches = [wan[b].dec_cache for b in members]
                stacked = _stacked(caches, self._dec_convs)
                out = self.vae.decoder(x[members, :, f : f + 1], feat_cache=stacked, feat_idx=[0],
                                       first_chunk=stage == 0)  # fmt: skip
                _split(stacked, caches)
                for j, b in enumerate(members):
                    rows[b].append(out[j])
            for s in wan:
                s.decoded += 1
        decoded = torch.stack([torch.cat(r, dim=1) for r in rows])  # (B, 3, frames, H, W)
        return decoded.clamp(-1.0, 1.0).add(1.0).div(2.0).transpose(1, 2)


def _as_wan(state: TaeState) -> WanVaeState:
    if not isinstance(state, WanVaeState):
        raise TypeError("the Wan VAE takes WanVaeState (the stream was opened with another autoencoder)")
    return state


def build_wan_vae(config: dict[str, Any], seed: int = 0) -> Any:
    """An `AutoencoderKLWan` of `config` at random weights (seeded: the same every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**config)
