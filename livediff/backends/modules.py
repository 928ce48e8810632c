"""The three networks as plain tensor-in, tensor-out modules: what torch runs and ONNX exports.

The VAE's latent scaling is folded in, so every backend sees the same contract (see `Backend`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel


def _scale_and_shift(vae: AutoencoderKL | AutoencoderTiny) -> tuple[float, float]:
    config = vae.config
    return float(config.get("scaling_factor", 1.0) or 1.0), float(config.get("shift_factor", 0.0) or 0.0)


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL | AutoencoderTiny) -> None:
        super().__init__()
        self.vae = vae
        self.scale, self.shift = _scale_and_shift(vae)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.vae, AutoencoderTiny):
            latents = self.vae.encoder(images)
        elif isinstance(self.vae, AutoencoderKL):
            latents = self.vae.encode(images, return_dict=False)[0].mode()  # the mean: deterministic
        else:
            raise TypeError(f"unsupported VAE {type(self.vae).__name__}")
        return (latents - self.shift) * self.scale


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL | AutoencoderTiny) -> None:
        super().__init__()
        self.vae = vae
        self.scale, self.shift = _scale_and_shift(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scale + self.shift
        if isinstance(self.vae, AutoencoderTiny):
            return self.vae.decoder(latents)
        return self.vae.decode(latents, return_dict=False)[0]


class DepthNetwork(torch.nn.Module):
    """A transformers depth-estimation model as a plain call: (N, 3, h, w) normalised images -> (N, h', w') depth."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).predicted_depth  # type: ignore[no-any-return]


class UNet(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
