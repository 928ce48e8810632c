"""The fast path's two kernel variants as backends: `cuda-graph-fused-norm` (`cuda-graph` with
GroupNorm+SiLU fused, `livediff.backends.fused_norm`) and `cuda-graph-compiled-fp8`
(`cuda-graph-compiled` with the UNet's large linear layers in float8, `livediff.backends.fp8`).

Each runs on a copy of the UNet that carries its change, so the model the engine was given stays
as it was. LoRAs are refused with either (they are loaded into the given UNet's layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from livediff.backends import fp8, fused_norm
from livediff.backends.compiled_graph import CompiledGraphBackend
from livediff.backends.cuda_graph import Capture, CudaGraphBackend
from livediff.backends.multi_lora import MultiLoRA
from livediff.backends.unet_extras import NO_EXTRAS, UNetExtras
from livediff.errors import ConfigError
from livediff.models import ModelParts


def _refuse_loras(name: str, extras: UNetExtras) -> None:
    if any(isinstance(feature, MultiLoRA) for feature in extras.features):
        raise ConfigError(f"--lora is not supported with --backend {name}: use cuda-graph or cuda-graph-compiled")


class FusedNormGraphBackend(CudaGraphBackend):
    """`cuda-graph` whose UNet's residual blocks run GroupNorm+SiLU as one Triton kernel (on CUDA;
    the torch reference elsewhere, so the tests run it on the CPU through a host `capture`)."""

    def __init__(self, parts: ModelParts, capture: Capture | None = None, max_layouts: int = 16,
                 extras: UNetExtras = NO_EXTRAS) -> None:  # fmt: skip
        _refuse_loras(fused_norm.NAME, extras)
        fused, self.fused_blocks = fused_norm.with_fused_norm(parts)
        super().__init__(fused, capture=capture, max_layouts=max_layouts, extras=extras)
        self.name = fused_norm.NAME
        self.kernel = "triton" if parts.device.type == "cuda" and fused_norm.triton_available() else "torch reference"

    def describe(self) -> dict[str, Any]:
        """What the engine's description records: how many residual blocks were fused, and by what."""
        return {"fused_blocks": self.fused_blocks, "group_norm_silu": self.kernel}


class Fp8CompiledBackend(CompiledGraphBackend):
    """`cuda-graph-compiled` with the UNet's large linear layers in float8 (CUDA compute capability
    >= 8.9 and torchao; refused elsewhere with BackendUnavailable)."""

    def __init__(self, parts: ModelParts, capture: Capture | None = None, max_layouts: int = 16,
                 extras: UNetExtras = NO_EXTRAS, engines_dir: Path | None = None,
                 options: Mapping[str, Any] | None = None, measure_attention: bool = True,
                 size: tuple[int, int] = (512, 512)) -> None:  # fmt: skip
        _refuse_loras(fp8.NAME, extras)
        quantized, self.fp8_layers = fp8.with_fp8_unet(parts)
        super().__init__(quantized, capture=capture, max_layouts=max_layouts, extras=extras,
                         engines_dir=engines_dir, options=options, measure_attention=measure_attention,
                         size=size, tag="fp8")  # fmt: skip
        self.name = fp8.NAME

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fp8_linear_layers": self.fp8_layers}
