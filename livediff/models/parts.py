"""The parts of a loaded Stable-Diffusion-style model: what the engine, the backends and the
adapters (LCM-LoRA, single-file loading) pass between them; `livediff.models.loading` makes them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from livediff.models.controlnet import ControlNetParts
    from livediff.models.depth import DepthParts


@dataclass
class ModelParts:
    """What the engine needs from a model, on its device and in its dtype."""

    ref: str
    """The name the user gave (hub id, folder or built-in name)."""
    revision: str
    """Hub commit, `builtin-vN`, or a fingerprint of a local folder's files."""
    unet: UNet2DConditionModel
    vae: torch.nn.Module
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    vae_ref: str
    controlnet: ControlNetParts | None = None
    """Set on the copy of the parts that builds a ControlNet's graph (`with_controlnet`), else None."""
    depth: DepthParts | None = None
    """Set on the copy of the parts that builds the depth estimator's graph (`with_depth`), else None."""
    lcm_lora: str = ""
    """The LCM-LoRA source fused into the UNet (`livediff.models.lcm_lora`), empty for none."""

    def with_controlnet(self, controlnet: ControlNetParts) -> ModelParts:
        """These parts with `controlnet`: what the backends export and key the `controlnet` component from."""
        return dataclasses.replace(self, controlnet=controlnet)

    def with_depth(self, depth: DepthParts) -> ModelParts:
        """These parts with `depth`: what the backends export and key the `depth` component from."""
        return dataclasses.replace(self, depth=depth)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype
