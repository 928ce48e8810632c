"""Backends run the UNet and VAE: PyTorch (eager, compiled or replayed from CUDA graphs), ONNX Runtime,
OpenVINO or TensorRT, behind one protocol."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from livediff.backends.base import EAGER, Backend, Runner, Stages

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from livediff.backends.onnx_backend import Progress
    from livediff.config import EngineSettings
    from livediff.models import ModelParts
    from livediff.models.controlnet import ControlNetParts
    from livediff.models.depth import DepthParts

__all__ = ["EAGER", "Backend", "Stages", "create_backend", "create_controlnet", "create_depth", "resolve_backend"]

log = logging.getLogger(__name__)

GRAPH_BACKENDS = ("cuda-graph", "cuda-graph-compiled", "cuda-graph-fused-norm", "cuda-graph-compiled-fp8")
"""The backends that replay a step's stages from CUDA graphs (CUDA only)."""
COMPILED_GRAPH_BACKENDS = ("cuda-graph-compiled", "cuda-graph-compiled-fp8")
"""Those whose networks inductor compiles (their ControlNets too)."""


def resolve_backend(name: str, device: torch.device, engines_dir: Path | None = None) -> str:
    """`auto`: on the CPU OpenVINO where it is installed, else ONNX Runtime; on CUDA the fastest
    variant that matched eager torch in a measurement of this GPU, torch version and engine dtype
    kept in `engines_dir` (`livediff.backends.choice`: the GPU kit's `variants` step writes it),
    else `cuda-graph` (the GPU check of 2026-11-30 on an H200: 4.2x eager torch at batch 1, 1.4x at
    batch 4, frames identical; a TensorRT build takes minutes, so it is asked for by name). Says
    which it picked, and why.

    A named backend that cannot run on `device` at all (`cuda-graph` off CUDA, float8 on a GPU
    without it) raises BackendUnavailable here, before any model is loaded.
    """
    if name in GRAPH_BACKENDS:
        from livediff.backends.cuda_graph import require_cuda

        require_cuda(device, name)
    if name == "cuda-graph-compiled-fp8":
        from livediff.backends.fp8 import require_fp8

        require_fp8(device)
    if name != "auto":
        return name
    if device.type == "cuda":
        from livediff.backends.choice import measured_choice

        choice = measured_choice(engines_dir, device)
        if choice is not None:
            log.info("--backend auto picked %s (device %s): %s", choice.variant, device, choice.why)
            return choice.variant
        picked = "cuda-graph"
    else:
        picked = "openvino" if importlib.util.find_spec("openvino") is not None else "onnx"
    log.info("--backend auto picked %s (device %s)", picked, device)
    return picked


def create_backend(settings: EngineSettings, parts: ModelParts) -> Backend:
    """The backend `settings.backend` names, built (or loaded from the engine cache) for `parts`."""
    if settings.backend == "torch":
        from livediff.backends.torch_backend import TorchBackend
        from livediff.backends.unet_extras import unet_extras

        return TorchBackend(parts, compile=settings.compile, extras=unet_extras(settings, parts))
    if settings.backend == "cuda-graph":
        from livediff.backends.cuda_graph import CudaGraphBackend
        from livediff.backends.unet_extras import unet_extras

        return CudaGraphBackend(parts, extras=unet_extras(settings, parts))
    if settings.backend == "cuda-graph-compiled":
        from livediff.backends.compiled_graph import CompiledGraphBackend
        from livediff.backends.unet_extras import unet_extras

        return CompiledGraphBackend(parts, extras=unet_extras(settings, parts), engines_dir=settings.engines_dir,
                                    size=(settings.height, settings.width))  # fmt: skip
    if settings.backend == "cuda-graph-fused-norm":
        from livediff.backends.unet_extras import unet_extras
        from livediff.backends.variants import FusedNormGraphBackend

        return FusedNormGraphBackend(parts, extras=unet_extras(settings, parts))
    if settings.backend == "cuda-graph-compiled-fp8":
        from livediff.backends.unet_extras import unet_extras
        from livediff.backends.variants import Fp8CompiledBackend

        return Fp8CompiledBackend(parts, extras=unet_extras(settings, parts), engines_dir=settings.engines_dir,
                                  size=(settings.height, settings.width))  # fmt: skip
    if settings.backend == "onnx":
        from livediff.backends.onnx_backend import OnnxBackend

        return OnnxBackend(settings, parts)
    if settings.backend == "openvino":
        from livediff.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(settings, parts)
    if settings.backend == "tensorrt":
        from livediff.backends.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(settings, parts)
    raise ValueError(f"unknown backend {settings.backend!r}")


def create_controlnet(settings: EngineSettings, parts: ModelParts, controlnet: ControlNetParts,
                      progress: Progress | None = None) -> Runner:  # fmt: skip
    """`controlnet` as `settings.backend` runs it beside `parts`' UNet.

    The runner takes (latents (N, C, h, w), timesteps (N,) float32, embeds (N, tokens, dim),
    control_image (N, 3, H, W) in [0, 1], scale (N,) float32) and returns (N, total) residuals in
    the engine's dtype (`livediff.backends.control_residuals`). On the compiled backends its graph
    is exported (and compiled) into the engine cache and checked against torch the first time:
    seconds to minutes, so callers keep it off the frame path.
    """
    from livediff.backends.cache import CONTROLNET

    if settings.backend == "torch" or settings.backend in GRAPH_BACKENDS:  # recorded into the step's graphs
        from livediff.backends.torch_backend import controlnet_module

        if settings.backend in COMPILED_GRAPH_BACKENDS:
            from livediff.backends.compiled_graph import compile_module

            return compile_module(controlnet_module(parts, controlnet), "controlnet", parts.device)
        return controlnet_module(parts, controlnet, compile=settings.compile)
    return _compiled(settings, parts.with_controlnet(controlnet), CONTROLNET, progress)


def create_depth(settings: EngineSettings, parts: ModelParts, depth: DepthParts,
                 progress: Progress | None = None) -> Runner:  # fmt: skip
    """The depth estimator `depth` as `settings.backend` runs it: (N, 3, h, w) normalised images at
    `depth.input_size` of the engine's frames -> (N, h', w') depth in the engine's dtype. Built into
    the engine cache and checked against torch on the compiled backends, as `create_controlnet`."""
    from livediff.backends.cache import DEPTH

    if settings.backend == "torch" or settings.backend in GRAPH_BACKENDS:  # recorded into the step's graphs
        from livediff.backends.modules import DepthNetwork

        network = DepthNetwork(depth.model).eval()
        if settings.backend in COMPILED_GRAPH_BACKENDS:
            from livediff.backends.compiled_graph import compile_module

            return compile_module(network, "depth", parts.device)
        return network
    return _compiled(settings, parts.with_depth(depth), DEPTH, progress)


def _compiled(settings: EngineSettings, parts: ModelParts, component: str, progress: Progress | None) -> Runner:
    """`component` of `parts` on a compiled backend, from the engine cache (built and checked if missing)."""
    report = progress or log.info
    runner: Runner
    if settings.backend == "onnx":
        from livediff.backends.onnx_backend import OrtRunner, ensure_for_ort

        runner = OrtRunner(ensure_for_ort(settings, parts, component, report).path, parts.device)
    elif settings.backend == "openvino":
        from livediff.backends.openvino_backend import OvRunner, ensure_blob, require_openvino, run_precision

        ov = require_openvino(parts.device)
        runner = OvRunner.load(ov, ensure_blob(settings, parts, component, report).path, run_precision(ov, parts.dtype))
    elif settings.backend == "tensorrt":
        from livediff.backends.tensorrt_backend import TrtRunner, ensure_engine

        runner = TrtRunner(ensure_engine(settings, parts, component, report).path, parts.device)
    else:
        raise ValueError(f"unknown backend {settings.backend!r}")
    dtype = parts.dtype
    return lambda *tensors: runner(*tensors).to(dtype)  # a float32 graph serves a bfloat16 engine on the CPU
