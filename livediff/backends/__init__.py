"""Backends run the UNet and VAE: PyTorch, ONNX Runtime, OpenVINO or TensorRT, behind one protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from livediff.backends.base import Backend

if TYPE_CHECKING:
    from livediff.config import EngineSettings
    from livediff.models import ModelParts

__all__ = ["Backend", "create_backend"]


def create_backend(settings: EngineSettings, parts: ModelParts) -> Backend:
    """The backend `settings.backend` names, built (or loaded from the engine cache) for `parts`."""
    if settings.backend == "torch":
        from livediff.backends.torch_backend import TorchBackend

        return TorchBackend(parts, compile=settings.compile)
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
