"""A tiny temporal autoencoder of TAEHV's shape, run in streaming form with per-stream memories.

TAEHV (madebyollin/taehv, the tiny autoencoder for Hunyuan/Wan video latents) compresses 8x in
space and 4x in time with plain 2D convolutions: "memory blocks" see their input at frame t beside
their input at frame t - 1, temporal pooling joins pairs of frames (a 1x1 convolution over their
channels side by side) and temporal growth splits one frame into two. Its latent is Wan 2.1's (16
channels). Our version follows that shape (3 stages of 3 memory blocks each way; encoder width 64,
decoder widths 256/128/64/64: about 11 M parameters at full size), layer for layer as TAEHV's
source has it, so TAEHV's trained files load into it (`livediff.models.taehv_weights`); built here
it has random weights, and the built-in `tiny-video` uses narrower stages.

Streaming: a memory block's "t - 1" at the first frame of a chunk is the last frame it saw in the
previous chunk, kept in the stream's `TaeState`, so a chunk is encoded and decoded once, with the
same result as the whole video at once. As Wan's causal VAE, the first latent frame stands for one
frame and every later one for four (1 + 4k frames -> 1 + k latents): the encoder's first chunk is
preceded by three copies of its first frame, and the decoder's first three frames are dropped.
Pixels are in [0, 1], (B, T, 3, H, W); latents (B, T / 4, 16, H / 8, W / 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LATENT_CHANNELS = 16
TIME_SCALE = 4
SPACE_SCALE = 8
TAEHV_SHAPE: dict[str, Any] = dict(encoder=64, decoder=(256, 128, 64, 64))
"""TAEHV's widths (about 11 M parameters)."""
TINY_SHAPE: dict[str, Any] = dict(encoder=8, decoder=(32, 16, 8, 8))
"""The built-in `tiny-video` autoencoder's widths."""


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class MemBlock(nn.Module):
    """out_t = relu(conv([x_t, x_{t-1}]) + skip(x_t)); x_{t-1} at a chunk's first frame comes from the memory."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C, H, W); memory: (B, 1, C, H, W), the input of the frame before x's first."""
        past = torch.cat([memory, x[:, :-1]], dim=1)
        flat, past = x.flatten(0, 1), past.flatten(0, 1)
        out = torch.relu(self.conv(torch.cat([flat, past], dim=1)) + self.skip(flat))
        return out.unflatten(0, x.shape[:2])


class TPool(nn.Module):
    """`stride` consecutive frames -> one (a 1x1 convolution over their channels side by side)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        grouped = x.reshape(b * t // self.stride, self.stride * c, h, w)
        return self.conv(grouped).reshape(b, t // self.stride, c, h, w)


class TGrow(nn.Module):
    """One frame -> `stride` frames."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).reshape(b, t * self.stride, c, h, w)


class Framewise(nn.Module):
    """A 2D module applied to every frame of (B, T, C, H, W)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _encoder(width: int) -> nn.ModuleList:
    c = width
    layers: list[nn.Module] = [Framewise(_conv(3, c)), Framewise(nn.ReLU())]
    for stride in (2, 2, 1):  # 4x in time over the first two stages
        layers += [TPool(c, stride), Framewise(_conv(c, c, stride=2, bias=False)), MemBlock(c, c), MemBlock(c, c),
                   MemBlock(c, c)]  # fmt: skip
    layers.append(Framewise(_conv(c, LATENT_CHANNELS)))
    return nn.ModuleList(layers)


def _decoder(widths: tuple[int, ...]) -> nn.ModuleList:
    layers: list[nn.Module] = [Clamp(), Framewise(_conv(LATENT_CHANNELS, widths[0])), Framewise(nn.ReLU())]
    for stage, stride in enumerate((1, 2, 2)):
        c, nxt = widths[stage], widths[stage + 1]
        layers += [MemBlock(c, c), MemBlock(c, c), MemBlock(c, c), Framewise(nn.Upsample(scale_factor=2)),
                   TGrow(c, stride), Framewise(_conv(c, nxt, bias=False))]  # fmt: skip
    layers += [Framewise(nn.ReLU()), Framewise(_conv(widths[-1], 3))]
    return nn.ModuleList(layers)


@dataclass
class TaeState:
    """One stream's autoencoder memories: each memory block's input of the last frame it saw."""

    encoder: list[torch.Tensor | None] = field(default_factory=list)
    decoder: list[torch.Tensor | None] = field(default_factory=list)
    encoded: int = 0
    """Chunks encoded so far (0: the next one is a first chunk)."""
    decoded: int = 0

    def reset(self) -> None:
        self.encoder, self.decoder, self.encoded, self.decoded = [], [], 0, 0


class TinyVideoAutoencoder(nn.Module):
    """The streaming TAEHV-shaped autoencoder; its weights are shared, its memories per stream (`TaeState`)."""

    latent_channels = LATENT_CHANNELS
    time_scale = TIME_SCALE
    space_scale = SPACE_SCALE

    def __init__(self, encoder: int = 64, decoder: tuple[int, ...] = (256, 128, 64, 64)) -> None:
        super().__init__()
        self.encoder = _encoder(encoder)
        self.decoder = _decoder(tuple(decoder))

    name = "tae"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def new_state(self) -> TaeState:
        """A new stream's (empty) memories."""
        return TaeState()

    def encode(self, pixels: torch.Tensor, states: list[TaeState]) -> torch.Tensor:
        """(B, T, 3, H, W) in [0, 1] -> (B, T', 16, H/8, W/8) latents, one row per stream's state.

        T is 1 + 4k for streams whose first chunk this is (all rows alike), else 4k. The latents are
        the transformer's own (with TAEHV's trained weights: Wan VAE latents already normalised by
        its `latents_mean` / `latents_std`, as `WanStreamingVae.encode` returns them), so neither
        this nor `decode` shifts or scales them."""
        if states[0].encoded == 0:
            pixels = torch.cat([pixels[:, :1].expand(-1, TIME_SCALE - 1, -1, -1, -1), pixels], dim=1)
        if pixels.shape[1] % TIME_SCALE:
            raise ValueError(f"a chunk of {pixels.shape[1]} frames is not 4k (1 + 4k for a first chunk)")
        out = self._run(self.encoder, pixels.to(self.dtype), [s.encoder for s in states])
        for s in states:
            s.encoded += 1
        return out

    def decode(self, latents: torch.Tensor, states: list[TaeState]) -> torch.Tensor:
        """(B, T', 16, h, w) -> (B, 4 T', 3, 8h, 8w) in [0, 1] (the first chunk's first 3 frames dropped)."""
        first = states[0].decoded == 0
        out = self._run(self.decoder, latents.to(self.dtype), [s.decoder for s in states])
        for s in states:
            s.decoded += 1
        out = out[:, TIME_SCALE - 1 :] if first else out
        return out.clamp(0, 1)

    @staticmethod
    def _run(layers: nn.ModuleList, x: torch.Tensor, memories: list[list[torch.Tensor | None]]) -> torch.Tensor:
        blocks = 0
        for layer in layers:
            if isinstance(layer, MemBlock):
                for mem in memories:
                    if len(mem) <= blocks:
                        mem.append(None)
                pasts = []
                for b, mem in enumerate(memories):
                    held = mem[blocks]
                    pasts.append(torch.zeros_like(x[b : b + 1, :1]) if held is None else held)
                past = torch.cat(pasts)
                for b, mem in enumerate(memories):
                    mem[blocks] = x[b : b + 1, -1:].clone()
                x = layer(x, past)
                blocks += 1
            else:
                x = layer(x)
        return x


def build_autoencoder(shape: dict[str, Any], seed: int = 0) -> TinyVideoAutoencoder:
    """A `TinyVideoAutoencoder` of `shape` (`TAEHV_SHAPE`, `TINY_SHAPE`) at random weights (seeded).

    Random weights that still show the input: He initialisation for every convolution (He et al.
    2015: keeps the activations' scale through ReLUs), then, on a random clip, the encoder's last
    convolution scaled to unit-variance latents and the decoder's last to outputs around 0.5 with a
    spread of 0.2 (a data-dependent initialisation in the manner of LSUV, Mishkin and Matas 2015).
    Without it the random decoder's output is black whatever the camera shows."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = TinyVideoAutoencoder(**shape)
        for module in ae.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        clip = torch.rand((1, 5, 3, 64, 64))
        last_in, last_out = ae.encoder[-1].module, ae.decoder[-1].module
        assert isinstance(last_in, nn.Conv2d) and isinstance(last_out, nn.Conv2d)
        with torch.no_grad():
            last_in.weight /= ae.encode(clip, [TaeState()]).std()
            out = ae._run(ae.decoder, ae.encode(clip, [TaeState()]), [[]])  # before the clamp; biases are 0
            scale = 0.2 / out.std()
            last_out.weight *= scale
            assert last_out.bias is not None
            last_out.bias.fill_(float(0.5 - scale * out.mean()))
        return ae
