"""Optional extra inputs and outputs of the UNet: one spec that the torch call, the export and the key share.

The plain UNet takes (latents, timesteps, embeds) and returns the prediction. A feature that
needs more of it (the temporal feature bank: keys and values of earlier frames in, this frame's
out; ControlNet residuals in) is a `UNetFeature`: it names its extra tensors with their shapes
(`TensorSpec`) and knows how to hand them to diffusers' UNet call and collect what comes back.
`UNetExtras` (here) gathers the features one graph carries: the export takes its inputs after the
plain three and returns its outputs after the prediction, in spec order; the engine cache keys the
graph by `UNetExtras.tag`; the runners feed and read the tensors by name. Adding a feature to the
same export is adding it to the tuple. The spec and the protocol live in
`livediff.backends.unet_feature`, which the features import (so that they and this module do not
import each other).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from livediff.backends.unet_feature import TensorSpec, UNetFeature

if TYPE_CHECKING:
    from livediff.config import EngineSettings
    from livediff.models import ModelParts


@dataclass(frozen=True)
class UNetExtras:
    """The features one UNet graph carries, in order."""

    features: tuple[UNetFeature, ...] = ()

    @property
    def tag(self) -> str:
        """What the engine key records: `+`-joined feature tags, empty for the plain graph."""
        return "+".join(f.tag for f in self.features)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for f in self.features for spec in f.inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(spec for f in self.features for spec in f.outputs)

    def __bool__(self) -> bool:
        return bool(self.features)


NO_EXTRAS = UNetExtras()
"""The plain UNet: no extra inputs."""


class ExtrasUNet(torch.nn.Module):
    """The UNet with `extras`: forward(latents, timesteps, embeds, *extra inputs) -> (prediction, *extra outputs).

    What the torch backend calls and the ONNX exporter traces. With no extras it is the plain call.
    """

    def __init__(self, unet: Any, extras: UNetExtras) -> None:
        """`unet`: a diffusers UNet2DConditionModel."""
        super().__init__()
        self.unet = unet
        self.extras = extras
        for feature in extras.features:
            feature.install(unet)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        names = [spec.name for spec in self.extras.inputs]
        if len(extra) != len(names):
            raise ValueError(f"the UNet takes {len(names)} extra inputs ({', '.join(names)}), got {len(extra)}")
        prediction, outputs = self.call(latents, timesteps, embeds, dict(zip(names, extra)))
        return (prediction, *(outputs[spec.name] for spec in self.extras.outputs))

    def call(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
             values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """The same by name: the prediction and the outputs by name of the features whose inputs
        `values` holds (the others are left out of the call, as in a plain one)."""
        kwargs: dict[str, Any] = {}
        collectors = [feature.bind(values, kwargs) for feature in self.extras.features
                      if all(spec.name in values for spec in feature.inputs)]  # fmt: skip
        prediction = self.unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
        outputs: dict[str, torch.Tensor] = {}
        for collect in collectors:
            outputs.update(collect())
        return prediction, outputs


def unet_extras(settings: EngineSettings, parts: ModelParts) -> UNetExtras:
    """The extra inputs `settings` asks the UNet to carry: the feature bank with `feature_bank`,
    ControlNet residuals with `controlnets`, per-row LoRA scales with `loras` (the LoRAs loaded
    here into their slots), per-row image tokens and scales with `ip_adapter` (the adapter loaded
    here); all in one graph when several are asked for."""
    features: list[UNetFeature] = []
    if settings.feature_bank:
        from livediff.backends.temporal_attention import TemporalBank, bank_layers

        features.append(TemporalBank(bank_layers(parts.unet, settings.height, settings.width)))
    if settings.controlnets:
        from livediff.backends.control_residuals import ControlResiduals
        from livediff.models.controlnet import residual_layout

        features.append(ControlResiduals(residual_layout(parts.unet, settings.height, settings.width)))
    if settings.loras:
        from livediff.backends.multi_lora import MultiLoRA
        from livediff.models.lora import load_lora

        features.append(MultiLoRA([load_lora(name, source, parts.unet) for name, source in settings.loras], parts.unet))
    if settings.ip_adapter:  # last: its processors go on the cross-attention layers after the bank's on every layer
        from livediff.backends.image_prompt import ImagePrompt
        from livediff.models.ip_adapter import load_ip_adapter

        features.append(ImagePrompt(load_ip_adapter(settings.ip_adapter, parts.unet)))
    return UNetExtras(tuple(features))
