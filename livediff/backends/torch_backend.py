"""Runs the networks with PyTorch, eager or through `torch.compile`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch

from livediff.backends.base import EAGER, Stages
from livediff.backends.control_residuals import ControlNetResiduals
from livediff.backends.modules import UNet, VaeDecoder, VaeEncoder
from livediff.backends.unet_extras import NO_EXTRAS, ExtrasUNet, UNetExtras
from livediff.models import ModelParts
from livediff.models.controlnet import ControlNetParts


class TorchBackend:
    """The networks as torch modules: eager, or each wrapped in `torch.compile` (`compile=True`)."""

    def __init__(self, parts: ModelParts, compile: bool = False, extras: UNetExtras = NO_EXTRAS) -> None:
        """`extras`: the optional UNet inputs `unet_with` takes (their attention processors are
        installed on the model; its plain call stays exactly as it was)."""
        self.name = "torch.compile" if compile else "torch"
        self.extras = extras
        extras_unet = ExtrasUNet(parts.unet, extras) if extras else None
        modules = [VaeEncoder(parts.vae), UNet(parts.unet), VaeDecoder(parts.vae)]
        self.torch_threads: int | None = None
        # cuDNN's convolutions are fastest on channels-last tensors; oneDNN on CPU gained nothing here.
        self.channels_last = parts.device.type == "cuda"
        if self.channels_last:
            for module in modules:
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit it
        if compile:
            modules = [torch.compile(m, fullgraph=False, dynamic=False) for m in modules]  # type: ignore[misc]
        self._encode, self._unet, self._decode = modules
        self._extras_call: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
        if extras_unet is not None:  # by name, with the torch-only row split of the bank (see temporal_attention)
            call = extras_unet.call
            self._extras_call = torch.compile(call, fullgraph=False, dynamic=False) if compile else call

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet(latents, timesteps, embeds)

    def unet_with(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                  values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        if self._extras_call is None:
            raise RuntimeError(f"the {self.name} backend was built without extra UNet inputs")
        return self._extras_call(latents, timesteps, embeds, values)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)

    def stages(self, layout: Hashable | None) -> Stages:
        return EAGER


def controlnet_module(parts: ModelParts, controlnet: ControlNetParts, compile: bool = False) -> torch.nn.Module:
    """`controlnet` as the torch backend runs it (channels-last on CUDA, through `torch.compile` with `compile`)."""
    module = ControlNetResiduals(controlnet.model)
    if parts.device.type == "cuda":
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return torch.compile(module, fullgraph=False, dynamic=False) if compile else module  # type: ignore[return-value]
