"""What one optional feature of the UNet graph is: its extra tensors (`TensorSpec`) and the
`UNetFeature` protocol that hands them to diffusers' UNet call and collects what comes back.

The features themselves (the temporal feature bank, ControlNet residuals) and `UNetExtras`, which
gathers the ones a graph carries, import this module; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from livediff.config import MAX_BANK_FRAMES

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
