"""Runs the networks with PyTorch, eager or through `torch.compile`."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from livediff.backends.base import EAGER, Stages
from livediff.backends.modules import UNet, VaeDecoder, VaeEncoder
from livediff.models import ModelParts


class TorchBackend:
    """The networks as torch modules: eager, or each wrapped in `torch.compile` (`compile=True`)."""

    def __init__(self, parts: ModelParts, compile: bool = False) -> None:
        self.name = "torch.compile" if compile else "torch"
        modules = [VaeEncoder(parts.vae), UNet(parts.unet), VaeDecoder(parts.vae)]
        self.torch_threads: int | None = None
        # cuDNN's convolutions are fastest on channels-last tensors; oneDNN on CPU gained nothing here.
        self.channels_last = parts.device.type == "cuda"
        if self.channels_last:
            for module in modules:
                module.to(memory_format=torch.channels_last)
        if compile:
            modules = [torch.compile(m, fullgraph=False, dynamic=False) for m in modules]  # type: ignore[misc]
        self._encode, self._unet, self._decode = modules

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet(latents, timesteps, embeds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)

    def stages(self, layout: Hashable | None) -> Stages:
        return EAGER
