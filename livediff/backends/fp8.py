"""float8 for the UNet's large linear layers: `--backend cuda-graph-compiled-fp8`.

`cuda-graph-compiled` with the UNet's large `nn.Linear` layers (attention projections and
feed-forward layers at the 640- and 1280-channel levels of SD's UNet: `FP8_MIN_FEATURES`)
quantized by torchao's float8 dynamic activation and weight quantization
(`Float8DynamicActivationFloat8WeightConfig`: weights stored in float8 e4m3 with their scales,
each call's activations scaled and cast to float8 on the fly, products by the GPU's float8 tensor
cores through `torch._scaled_mm`), then compiled by inductor (which fuses the activations' scaling
into the neighbouring kernels) and recorded into the step's CUDA graphs like the other variants.
Per-row scales in bfloat16 (more accurate), one scale per tensor in float16. The convolutions, the
normalisations, the VAE and the text encoder stay in the engine's dtype.

It needs a CUDA GPU with float8 matrix multiplication (compute capability 8.9 or above: Ada,
Hopper, Blackwell) and torchao (`pip install -e '.[fp8]'`; `scripts/gpu-wheels` carries it to the
GPU kit): anywhere else the backend is refused before a model loads (`require_fp8`), in one line
saying which. The quantized UNet is a copy: the model the engine was given is left as it was.
Whether float8 pays, and stays within the parity bound (PSNR >= 40 dB against eager torch), is
measured by the GPU kit's `variants` and `variants-bf16` steps at batch 1, 4 and 8; `--backend
auto` takes it only where such a measurement says both (`livediff.backends.choice`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import torch

from livediff.errors import BackendUnavailable
from livediff.models import ModelParts

NAME = "cuda-graph-compiled-fp8"
FP8_MIN_FEATURES = 640
"""A linear layer is quantized when both its input and output widths are at least this (and
multiples of 16, as float8 matrix multiplication needs): SD's UNet's layers at its 640- and
1280-channel levels and the cross-attention key/value projections from the 1024-wide text; the
320-channel level's layers stay in the engine's dtype (small products, where the activations'
scaling would cost about what float8 saves)."""
FP8_CAPABILITY = (8, 9)
"""The lowest CUDA compute capability with float8 tensor cores (Ada Lovelace)."""


def fp8_unavailable(device: torch.device) -> str | None:
    """Why float8 cannot run on `device` (None when it can): not CUDA, a GPU below
    `FP8_CAPABILITY`, or torchao not installed."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return (
            f"needs a CUDA GPU with compute capability >= 8.9 for float8 matrix multiplication (the device is {device})"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        return (f"needs compute capability >= 8.9 for float8 matrix multiplication; "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")  # fmt: skip
    if importlib.util.find_spec("torchao") is None:
        return "needs torchao: pip install -e '.[fp8]'"
    return None


def require_fp8(device: torch.device) -> None:
    """Raises BackendUnavailable (one line, naming the backend and why) unless float8 runs on `device`."""
    why = fp8_unavailable(device)
    if why is not None:
        raise BackendUnavailable(f"{NAME} backend {why}; use --backend cuda-graph-compiled or auto on this host")


def quantizable(module: torch.nn.Module, fqn: str = "") -> bool:
    """Whether `module` is a linear layer float8 takes (see `FP8_MIN_FEATURES`); `fqn` (its path) is
    what torchao's filter passes and is not used."""
    if not isinstance(module, torch.nn.Linear):
        return False
    return all(size >= FP8_MIN_FEATURES and size % 16 == 0 for size in (module.in_features, module.out_features))


def quantize_fp8(unet: torch.nn.Module, dtype: torch.dtype) -> int:
    """Quantize `unet`'s large linear layers in place (see the module docstring); returns how many.
    Call `require_fp8` first: torchao asserts on hardware without float8."""
    from torchao.quantization import (  # type: ignore[import-not-found, unused-ignore]
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    count = sum(1 for m in unet.modules() if quantizable(m))
    granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=granularity), filter_fn=quantizable)
    return count


def with_fp8_unet(parts: ModelParts) -> tuple[ModelParts, int]:
    """`parts` with a copy of its UNet whose large linear layers are float8 (the given UNet is left
    as it was), and how many layers were quantized. Raises BackendUnavailable where float8 cannot run."""
    require_fp8(parts.device)
    unet = copy.deepcopy(parts.unet)
    return dataclasses.replace(parts, unet=unet), quantize_fp8(unet, parts.dtype)
