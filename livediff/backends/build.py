"""Ahead-of-time builds for `livediff build-engines`: fill the engine cache before serving.

The backends build what is missing on first use anyway; building ahead keeps minutes of export and
compilation out of a server's start.
"""

from __future__ import annotations

from pathlib import Path

from livediff.backends.cache import COMPONENTS
from livediff.backends.onnx_backend import Progress, ensure_for_ort, require_onnxruntime
from livediff.backends.unet_extras import unet_extras
from livediff.config import EngineSettings
from livediff.errors import ConfigError
from livediff.models import ModelParts


def build_engines(settings: EngineSettings, parts: ModelParts, progress: Progress = print) -> list[Path]:
    """Build or reuse the artifacts `settings.backend` runs, one per network, each checked against torch.

    `progress` receives a line per stage, and for each network whether it was built or reused.
    Returns the artifacts' paths (ONNX files, OpenVINO blobs or TensorRT engines) in the order the frame
    meets them, then the UNet with extra inputs where the settings ask for one (`feature_bank`).
    """
    extras = unet_extras(settings, parts)
    if settings.backend == "onnx":
        require_onnxruntime(parts.device)
        paths = [ensure_for_ort(settings, parts, c, progress).path for c in COMPONENTS]
        return paths + ([ensure_for_ort(settings, parts, "unet", progress, extras).path] if extras else [])
    if settings.backend == "openvino":
        from livediff.backends.openvino_backend import ensure_blob, require_openvino

        require_openvino(parts.device)
        paths = [ensure_blob(settings, parts, c, progress).path for c in COMPONENTS]
        return paths + ([ensure_blob(settings, parts, "unet", progress, extras).path] if extras else [])
    if settings.backend == "tensorrt":
        from livediff.backends.tensorrt_backend import ensure_engine, require_tensorrt

        require_tensorrt(parts.device)
        paths = [ensure_engine(settings, parts, c, progress).path for c in COMPONENTS]
        return paths + ([ensure_engine(settings, parts, "unet", progress, extras).path] if extras else [])
    raise ConfigError(f"build-engines builds for --backend onnx, openvino or tensorrt, not {settings.backend!r}")
