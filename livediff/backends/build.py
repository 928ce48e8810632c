"""Ahead-of-time builds for `livediff build-engines`: fill the engine cache before serving.

The backends build what is missing on first use anyway; building ahead keeps minutes of export and
compilation out of a server's start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from livediff.backends.cache import COMPONENTS, CONTROLNET, DEPTH, Artifact
from livediff.backends.onnx_backend import Progress, ensure_for_ort, require_onnxruntime
from livediff.backends.unet_extras import NO_EXTRAS, UNetExtras, unet_extras
from livediff.config import EngineSettings
from livediff.errors import ConfigError
from livediff.models import ModelParts

Ensure = Callable[[EngineSettings, ModelParts, str, Progress, UNetExtras], Artifact]


def build_engines(settings: EngineSettings, parts: ModelParts, progress: Progress = print) -> list[Path]:
    """Build or reuse the artifacts `settings.backend` runs, one per network, each checked against torch.

    `progress` receives a line per stage, and for each network whether it was built or reused.
    Returns the artifacts' paths (ONNX files, OpenVINO blobs or TensorRT engines) in the order the frame
    meets them, then the UNet with extra inputs where the settings ask for one (`feature_bank`,
    `controlnets`), then each ControlNet of `controlnets` and the `depth_model` (loaded here to be
    exported).
    """
    ensure = _ensure(settings, parts)
    extras = unet_extras(settings, parts)
    paths = [ensure(settings, parts, c, progress, NO_EXTRAS).path for c in COMPONENTS]
    if extras:
        paths.append(ensure(settings, parts, "unet", progress, extras).path)
    if settings.controlnets:
        from livediff.models.controlnet import load_controlnet

        for _, source in settings.controlnets:
            controlnet = load_controlnet(source, parts.unet, parts.device, parts.dtype)
            paths.append(ensure(settings, parts.with_controlnet(controlnet), CONTROLNET, progress, NO_EXTRAS).path)
    if settings.depth_model:
        from livediff.models.depth import load_depth_model

        depth = load_depth_model(settings.depth_model, parts.device, parts.dtype)
        paths.append(ensure(settings, parts.with_depth(depth), DEPTH, progress, NO_EXTRAS).path)
    return paths


def _ensure(settings: EngineSettings, parts: ModelParts) -> Ensure:
    """The artifact builder of `settings.backend` (checking first that it can run here)."""
    if settings.backend == "onnx":
        require_onnxruntime(parts.device)
        return ensure_for_ort
    if settings.backend == "openvino":
        from livediff.backends.openvino_backend import ensure_blob, require_openvino

        require_openvino(parts.device)
        return ensure_blob
    if settings.backend == "tensorrt":
        from livediff.backends.tensorrt_backend import ensure_engine, require_tensorrt

        require_tensorrt(parts.device)
        return ensure_engine
    raise ConfigError(f"build-engines builds for --backend onnx, openvino or tensorrt, not {settings.backend!r}")
