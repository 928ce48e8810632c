"""Depth estimators for the `depth` control image: transformers depth-estimation models.

Any checkpoint `transformers.AutoModelForDepthEstimation` loads (Depth Anything V2, DPT/MiDaS...)
from a hub id, a local folder (`config.json`, the weights and `preprocessor_config.json`) or the
built-in `tiny`, under the base model's rules (`livediff.models.loading`). The image processor's
settings (input size, the multiple its sides must be, mean and std) are read from its config so
the engine can prepare whole batches on the device itself (`livediff.engine.preprocessors`).

`tiny` is a Depth Anything network with a 4-layer, 32-wide DINOv2 backbone and random weights,
built in code (no download), initialised so that its depth is positive and varies with the image:
what tests and CPU runs need of it; its maps mean nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.errors import ModelLoadError
from livediff.models.builtin import BUILDER_VERSION, SEED, build_once, cache_root, rescale_output
from livediff.models.hub import HubKind, fingerprint, snapshot

log = logging.getLogger(__name__)

DEPTH_BUILDER_VERSION = 1
PROCESSOR_FILE = "preprocessor_config.json"
BUILTINS = ("tiny",)


@dataclass
class DepthParts:
    """A loaded depth estimator and how its inputs are prepared."""

    ref: str
    revision: str
    model: Any
    """A transformers model for depth estimation: pixel_values (B, 3, h, w) -> predicted_depth (B, h', w')."""
    size: int
    """The processor's input side in pixels (the shorter side, for a keep-aspect-ratio processor)."""
    multiple: int
    """Input sides are rounded to a multiple of this (DINOv2's patch of 14 for Depth Anything)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The network's input size for a `height` x `width` frame: shorter side min(`size`, the
        frame's), aspect kept, each side rounded to the nearest multiple of `multiple` (at least one)."""
        side = min(self.size, height, width)
        scale = side / min(height, width)

        def fit(length: int) -> int:
            return max(self.multiple, round(length * scale / self.multiple) * self.multiple)

        return fit(height), fit(width)


def load_depth_model(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DepthParts:
    """Load depth estimator `ref` (hub id, local folder or `tiny`); `ModelLoadError` naming it when it cannot."""
    from transformers import AutoModelForDepthEstimation

    folder, revision = _locate(ref)
    log.info("loading depth model %s (%s)", ref, revision)
    try:
        model = AutoModelForDepthEstimation.from_pretrained(str(folder), dtype=dtype)
        processor = json.loads((folder / PROCESSOR_FILE).read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"depth model {ref!r} at {folder} could not be loaded: {exc}") from exc
    size = processor.get("size") or {}
    side = size.get("shortest_edge") or min(size.get("height", 518), size.get("width", 518))
    model.to(torch.device(device)).eval().requires_grad_(False)
    return DepthParts(
        ref=ref,
        revision=revision,
        model=model,
        size=int(side),
        multiple=int(processor.get("ensure_multiple_of") or 1),
        mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
        std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
    )


def _locate(ref: str) -> tuple[Path, str]:
    if ref in BUILTINS:
        return builtin_depth_dir(ref), f"builtin-v{BUILDER_VERSION}.{DEPTH_BUILDER_VERSION}"
    path = Path(ref).expanduser()
    if path.is_dir():
        missing = [name for name in ("config.json", PROCESSOR_FILE) if not (path / name).is_file()]
        if missing:
            raise ModelLoadError(f"{path} is not a transformers depth-estimation folder (no {' or '.join(missing)})")
        return path, fingerprint(path)
    if path.suffix or ref.count("/") != 1:
        raise ModelLoadError(
            f"depth model {ref!r} is not a built-in ({', '.join(BUILTINS)}), an existing folder, nor a hub id "
            "(owner/name, e.g. depth-anything/Depth-Anything-V2-Small-hf)"
        )
    kind = HubKind("depth model", BUILTINS, "run with `--depth-model tiny` (built in, random weights)")
    folder = snapshot(ref, ["*.json", "*.safetensors"], kind)
    return folder, folder.name


@torch.no_grad()
def _tiny(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    shape: dict[str, Any] = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=112,
        patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    backbone = Dinov2Config(**shape)
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )  # fmt: skip
    model = DepthAnythingForDepthEstimation(config).eval()
    # From default init the neck and head return nearly the same map for any image: variance-
    # preserving weights and no biases there, then the last layer scaled to a positive depth
    for layer in (*model.neck.modules(), *model.head.modules()):
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
    images = torch.randn(4, 3, 112, 112)
    rescale_output(model.head.conv3, lambda: model(pixel_values=images), mean=1.0, std=0.5)  # before its ReLU
    model.save_pretrained(folder)
    processor = {
        "image_processor_type": "DPTImageProcessor",
        "do_resize": True,
        "size": {"height": 112, "width": 112},
        "keep_aspect_ratio": True,
        "ensure_multiple_of": 14,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (folder / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2))


def builtin_depth_dir(name: str) -> Path:
    """The folder of built-in depth model `name`, built on first use."""

    def build(staging: Path) -> None:
        torch.manual_seed(SEED)
        _tiny(staging)

    folder = cache_root() / "depth" / f"{name}-v{BUILDER_VERSION}.{DEPTH_BUILDER_VERSION}"
    return build_once(folder, PROCESSOR_FILE, build)
