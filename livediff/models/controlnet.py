"""ControlNets: diffusers `ControlNetModel`s from a hub id, a local folder or a built-in name.

The same rules as the base model (`livediff.models.loading`): a built-in name is made in code with
random weights (no download, ever), an existing folder is read as a diffusers ControlNet folder
(`config.json` and the weights), an `owner/name` id comes from the Hugging Face cache or is
downloaded once. A ControlNet must fit the UNet it steers: the same residual shapes (channels per
skip connection, `residual_layout`) and the same text width;
one that does not is refused at load time with both shapes named, never at the first frame.

Built-ins: `tiny` has the tiny model's UNet encoder (0.36 GFLOP at 256x256 against the tiny
UNet's 0.65), its zero convolutions (and the control image's embedding, zero too in an untrained
ControlNet) given random weights scaled so each residual is half as strong as the UNet feature it
joins: a control image visibly steers the tiny model, so tests can tell it from none.
`sd-turbo-random` has the architecture of the SD 2.1 / SD-Turbo ControlNets (for speed on a GPU
without the weights).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel

from livediff.errors import ModelLoadError
from livediff.models.builtin import BUILDER_VERSION, SD21_UNET, SEED, TINY_UNET, build_once, cache_root, rescale_output
from livediff.models.hub import HubKind, fingerprint, snapshot

log = logging.getLogger(__name__)

CONTROLNET_BUILDER_VERSION = 2
"""Bump when a ControlNet builder changes (the base models' `BUILDER_VERSION` is part of the folder too)."""
PROBE_SIZE = 64
"""Frame side at which a ControlNet's residual shapes are compared with the UNet's (any multiple of 64 will do)."""


Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ResidualLayout:
    """The residuals' shapes, in the order diffusers passes them: the down path's, then the middle block's."""

    down: tuple[Shape, ...]
    """(channels, height, width) of each down-path residual, in latent cells."""
    mid: Shape

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return (*self.down, self.mid)

    @property
    def total(self) -> int:
        """Values per row of the flat tensor."""
        return sum(c * h * w for c, h, w in self.shapes)

    def split(self, flat: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(rows, total) -> (down residuals, mid residual) as (rows, c, h, w) views, no copy."""
        sizes = [c * h * w for c, h, w in self.shapes]
        parts = [part.unflatten(1, shape) for part, shape in zip(flat.split(sizes, dim=1), self.shapes)]
        return tuple(parts[:-1]), parts[-1]


def residual_layout(model: Any, height: int, width: int) -> ResidualLayout:
    """The residual shapes of a diffusers UNet2DConditionModel or ControlNetModel at `height` x `width` pixels.

    Both have the same down path: `conv_in` at full latent size, then per down block one output per
    resnet and one per downsampler (which halves the size, rounding up as a stride-2 convolution
    does), and the middle block at the last block's size and width.
    """
    h, w = height // 8, width // 8
    down: list[Shape] = [(int(model.conv_in.out_channels), h, w)]
    channels = down[0][0]
    for block in model.down_blocks:
        for resnet in block.resnets:
            channels = int(resnet.out_channels)
            down.append((channels, h, w))
        for sampler in block.downsamplers or ():
            h, w = (h + 1) // 2, (w + 1) // 2
            channels = int(sampler.out_channels)
            down.append((channels, h, w))
    return ResidualLayout(tuple(down), (channels, h, w))


@dataclass
class ControlNetParts:
    """A loaded ControlNet, on the engine's device and in its dtype."""

    ref: str
    """The name the user gave (hub id, folder or built-in name)."""
    revision: str
    """Hub commit, `builtin-vN.M`, or a fingerprint of a local folder's files."""
    model: ControlNetModel


def load_controlnet(ref: str, unet: Any, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> ControlNetParts:  # fmt: skip
    """Load ControlNet `ref` (hub id, local diffusers folder, `tiny` or `sd-turbo-random`) for `unet`.

    Raises `ModelLoadError` naming `ref` when it cannot be found or read, or does not fit `unet`.
    """
    folder, revision = _locate(ref)
    log.info("loading ControlNet %s (%s)", ref, revision)
    try:
        model = ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"ControlNet {ref!r} at {folder} could not be loaded: {exc}") from exc
    check_fits(ref, model, unet)
    model.to(torch.device(device)).eval().requires_grad_(False)
    return ControlNetParts(ref=ref, revision=revision, model=model)


def check_fits(ref: str, controlnet: Any, unet: Any) -> None:
    """Raises `ModelLoadError` unless `controlnet`'s residuals and text width match `unet`'s."""
    theirs = residual_layout(controlnet, PROBE_SIZE, PROBE_SIZE)
    ours = residual_layout(unet, PROBE_SIZE, PROBE_SIZE)
    if theirs != ours:
        raise ModelLoadError(
            f"ControlNet {ref!r} does not fit this model's UNet: its residual channels are "
            f"{[s[0] for s in theirs.shapes]}, the UNet's {[s[0] for s in ours.shapes]} (a ControlNet for "
            "another base model: SD 1.5 and SD 2.1 ControlNets are not interchangeable)"
        )
    if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"ControlNet {ref!r} reads text embeddings of width {controlnet.config.cross_attention_dim}, "
            f"this model's are {unet.config.cross_attention_dim} (a ControlNet for another base model)"
        )


def _locate(ref: str) -> tuple[Path, str]:
    """The local folder holding ControlNet `ref` and its revision, downloading hub ControlNets if needed."""
    if ref in BUILDERS:
        return builtin_controlnet_dir(ref), f"builtin-v{BUILDER_VERSION}.{CONTROLNET_BUILDER_VERSION}"
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers ControlNet folder (no config.json inside)")
        return path, fingerprint(path)
    if path.suffix or ref.count("/") != 1:
        raise ModelLoadError(
            f"ControlNet {ref!r} is not a built-in ({', '.join(BUILDERS)}), an existing folder, nor a hub id "
            "(owner/name, e.g. thibaud/controlnet-sd21-canny-diffusers)"
        )
    kind = HubKind("ControlNet", tuple(BUILDERS), "name the built-in one of the model (`--controlnet NAME=tiny`)")
    folder = snapshot(ref, ["config.json", "*.safetensors"], kind)
    return folder, folder.name  # the hub cache stores snapshots under their commit hash


# -- built-ins -----------------------------------------------------------------------------------


@torch.no_grad()
def _wake_zero_layers(controlnet: Any) -> None:
    """Random weights where an untrained ControlNet has zeros (its zero convolutions and the control
    image embedding's last layer): a ControlNet fresh from `__init__` changes nothing at all."""
    for layer in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out):  # fmt: skip
        layer.reset_parameters()


@torch.no_grad()
def _calibrate_tiny(controlnet: Any) -> None:
    """Make the random tiny ControlNet respond to its control image about as a trained one does.

    The control image's embedding gets variance-preserving weights and no biases (from default init
    its output hardly depends on the image: padding at the borders, not content, makes its spread),
    its last layer scaled to the strength of the latents' own first features; each zero convolution
    is scaled so its residual is half as strong as the feature it is made from (on random inputs).
    """
    embedding = controlnet.controlnet_cond_embedding
    for layer in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.zeros_(layer.bias)
    latents = torch.randn(4, 4, 8, 8)
    images = torch.rand(4, 3, 64, 64)
    timesteps = torch.full((4,), 500.0)
    embeds = torch.randn(4, 77, controlnet.config.cross_attention_dim)
    run = lambda: controlnet(latents, timesteps, embeds, images, return_dict=False)  # noqa: E731
    features = controlnet.conv_in(latents).std().item()
    rescale_output(embedding.conv_out, lambda: embedding(images), mean=0.0, std=features)
    for layer in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, inputs, _o, seen=seen: seen.append(inputs[0]))
        run()
        handle.remove()
        rescale_output(layer, run, mean=0.0, std=0.5 * torch.cat(seen).std().item())


def _architecture(unet: dict[str, Any]) -> dict[str, Any]:
    """The ControlNetModel arguments of a UNet's configuration (its encoder half)."""
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    return {key: value for key, value in unet.items() if key in accepted}


def _tiny(folder: Path) -> None:
    # the control image's embedding as small beside the tiny UNet as SD's (16, 32, 96, 256) is beside
    # SD's: with (8, 16, 32, 32) it alone cost 0.37 GFLOP at 256x256, more than half the tiny UNet's 0.65
    controlnet: Any = ControlNetModel(**_architecture(TINY_UNET), conditioning_embedding_out_channels=(4, 8, 16, 32))
    _wake_zero_layers(controlnet)
    _calibrate_tiny(controlnet)
    controlnet.save_pretrained(folder)


def _sd_turbo_random(folder: Path) -> None:
    controlnet: Any = ControlNetModel(**_architecture(SD21_UNET))  # control embedding (16, 32, 96, 256) as SD 2.1's
    _wake_zero_layers(controlnet)
    controlnet.save_pretrained(folder)


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny": _tiny, "sd-turbo-random": _sd_turbo_random}
"""Built-in ControlNets, each with the architecture of the built-in model of the same name."""


def builtin_controlnet_dir(name: str) -> Path:
    """The folder of built-in ControlNet `name`, built on first use (atomically, so racing is safe)."""

    def build(staging: Path) -> None:
        torch.manual_seed(SEED)
        BUILDERS[name](staging)

    folder = cache_root() / "controlnets" / f"{name}-v{BUILDER_VERSION}.{CONTROLNET_BUILDER_VERSION}"
    return build_once(folder, "config.json", build)
