"""Optional extra inputs and outputs of the UNet: one spec that the torch call, the export and the key share.

The plain UNet takes (latents, timesteps, embeds) and returns the prediction. A feature that
needs more of it (the temporal feature bank: keys and values of earlier frames in, this frame's
out; ControlNet residuals in) is a `UNetFeature`: it names its extra tensors with their shapes
(`TensorSpec`) and knows how to hand them to diffusers' UNet call and collect what comes back.
`UNetExtras` gathers the features one graph carries: the export takes its inputs after the plain
three and returns its outputs after the prediction, in spec order; the engine cache keys the graph
by `UNetExtras.tag`; the runners feed and read the tensors by name. Adding a feature to the same
export is adding it to the tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from livediff.config import MAX_BANK_FRAMES

if TYPE_CHECKING:
    from livediff.config import EngineSettings
    from livediff.models import ModelParts

Dim = int | str
"""A tensor dimension: a fixed size, or the name of a dynamic axis (`batch`, `bank`)."""

DYNAMIC_AXES: dict[str, tuple[int, int]] = {"bank": (1, MAX_BANK_FRAMES)}
"""Bounds of each named dynamic axis but the batch (which every input has, and which the backends
bound themselves): what an export declares and a TensorRT profile spans. The bank: 1 to the most
frames a stream may keep."""


@dataclass(frozen=True)
class TensorSpec:
    """One extra input or output of the UNet graph."""

    name: str
    """The graph's input or output name, also the key of the tensor in the engine's feeds."""
    shape: tuple[Dim, ...]
    """Dimensions, the first always `batch` (the UNet's rows)."""
    float32: bool = False
    """True for inputs kept in float32 whatever the model dtype (biases added to softmax logits)."""

    def dynamic(self) -> dict[int, str]:
        """Axis index -> axis name, for the dynamic axes."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


Collect = Callable[[], dict[str, torch.Tensor]]
"""Returns a feature's outputs after the UNet call, by `TensorSpec.name`."""


class UNetFeature(Protocol):
    """Something that adds inputs (and maybe outputs) to the UNet call."""

    tag: str
    """Short, stable name for the engine key (bump its version when the graph it makes changes)."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def install(self, unet: torch.nn.Module) -> None:
        """Prepare the diffusers UNet once (attention processors); a plain call must stay exactly as before."""
        ...

    def bind(self, values: Mapping[str, torch.Tensor], unet_kwargs: dict[str, Any]) -> Collect:
        """Put this feature's inputs from `values` into the UNet call's keyword arguments."""
        ...

    def neutral(self, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inputs for `rows` rows that leave the call as it is without this feature: what a graph
        carrying several features is fed for one that no row of a call uses."""
        ...


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
    here into their slots; all in one graph when several are asked for)."""
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
    return UNetExtras(tuple(features))
