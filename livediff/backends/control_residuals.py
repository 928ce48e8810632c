"""ControlNet residuals inside the UNet: what a ControlNet hands the UNet, as one flat tensor per row.

A ControlNet (Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv
2302.05543) is a trainable copy of the UNet's encoder that reads a control image (edges, depth) and
returns one residual per skip connection of the UNet's down path plus one for its middle block;
the UNet adds them to its own features (diffusers: `down_block_additional_residuals`,
`mid_block_additional_residual`). Their shapes follow from the UNet's architecture and the frame
size alone (`livediff.models.controlnet.residual_layout`): the output of `conv_in`, of every
resnet and every downsampler of the down blocks, and of the middle block.

Here they travel as one (rows, `ResidualLayout.total`) tensor, the residuals flattened and
concatenated in that order: the ControlNet graph returns it (already multiplied by each row's
conditioning scale), the engine adds several ControlNets' outputs and leaves zeros in the rows of
streams without one with single tensor operations, and the UNet graph takes it as one extra input
(`ControlResiduals`, a `UNetFeature`) that it splits into views. A zero row adds nothing: that row's
prediction is the plain UNet's, up to the summation order of the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from livediff.backends.unet_feature import Collect, TensorSpec
from livediff.models.controlnet import ResidualLayout

CONTROL_TAG = "control-v1"
"""The engine-key tag of UNet graphs that take ControlNet residuals; bump when the interface changes."""
RESIDUALS = "control_residuals"
"""The graph input (UNet) and output (ControlNet) name of the flat residuals."""


class ControlResiduals:
    """ControlNet residuals as a `UNetFeature`: one input, `control_residuals` (batch, total), no outputs."""

    tag = CONTROL_TAG
    outputs: tuple[TensorSpec, ...] = ()

    def __init__(self, layout: ResidualLayout) -> None:
        self.layout = layout
        self.inputs: tuple[TensorSpec, ...] = (TensorSpec(RESIDUALS, ("batch", layout.total)),)

    def install(self, unet: torch.nn.Module) -> None:
        """Nothing to install: diffusers' UNet takes the residuals as call arguments."""

    def bind(self, values: Mapping[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> Collect:
        down, mid = self.layout.split(values[RESIDUALS])
        unet_kwargs["down_block_additional_residuals"] = down
        unet_kwargs["mid_block_additional_residual"] = mid
        return lambda: {}

    def neutral(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inputs that change nothing (zeros), for a call of the shared graph where no row has a ControlNet."""
        return {RESIDUALS: torch.zeros((rows, self.layout.total), device=device, dtype=dtype)}


def flatten(down: tuple[torch.Tensor, ...] | list[torch.Tensor], mid: torch.Tensor) -> torch.Tensor:
    """diffusers' residuals (each (rows, c, h, w)) -> (rows, `ResidualLayout.total`), in their order."""
    return torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)


class ControlNetResiduals(torch.nn.Module):
    """A diffusers ControlNetModel as the backends run it:
    forward(latents, timesteps, embeds, control_image, scale) -> (batch, total) residuals.

    `control_image` is (batch, 3, H, W) in [0, 1] (as diffusers' ControlNet pipelines prepare it);
    `scale` (batch,) each row's conditioning scale (float32, like timesteps), multiplied in here so
    rows of one call may differ.
    """

    def __init__(self, controlnet: Any) -> None:
        """`controlnet`: a diffusers ControlNetModel."""
        super().__init__()
        self.controlnet = controlnet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                control_image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
        down, mid = self.controlnet(latents, timesteps, encoder_hidden_states=embeds, controlnet_cond=control_image,
                                    conditioning_scale=1.0, return_dict=False)  # fmt: skip
        flat = flatten(down, mid)
        return flat * scale.to(flat.dtype)[:, None]
