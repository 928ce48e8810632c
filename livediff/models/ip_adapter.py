"""Load an IP-Adapter (Ye et al. 2023, arXiv:2308.06721): image prompts for an SD-family UNet.

An IP-Adapter has three parts:

1. a CLIP vision encoder (`CLIPVisionModelWithProjection`): an RGB image -> (1, clip_dim) image embedding;
2. an image projection (diffusers' `ImageProjection`): that embedding -> (tokens, cross_dim) image
   tokens, 4 of them for the base IP-Adapter, in the width of the UNet's text embeddings;
3. per cross-attention layer (`attn2` of every transformer block) two bias-free linear layers,
   `to_k_ip` and `to_v_ip` (cross_dim -> the layer's width), whose keys and values the layer's
   queries attend to beside the text's ("decoupled cross-attention"); that attention's output,
   times a scale, is added to the text attention's before the output projection.

What is read here is those parts for one UNet; how a call applies them, one scale and one image per
row, is `livediff.backends.image_prompt`. Files in the original IP-Adapter layout
(`image_proj.*` and `ip_adapter.<n>.to_k_ip.weight` keys) are converted by diffusers' own
IP-Adapter loading (`UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers` and
`_convert_ip_adapter_attn_to_diffusers`, what `load_ip_adapter` runs), which leaves the UNet as it was.

Sources: `tiny` (built in: a tiny random CLIP vision encoder and a random adapter in the file
layout, for tests and benchmarks, with `--model tiny` or any SD-family UNet); a `.safetensors`
file with an `image_encoder` folder beside it (the layout of h94/IP-Adapter's `models/`); a hub id
`owner/name` (its `models/ip-adapter_sd15.safetensors` and `models/image_encoder`) or
`owner/name:path/in/repo.safetensors`. Only the base IP-Adapter (one `ImageProjection`) is served.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.errors import ModelLoadError
from livediff.models.hub import HubKind, first_line, hub_file, split_hub_file

log = logging.getLogger(__name__)

BUILTINS = ("tiny",)
IP_ADAPTER = HubKind("IP-Adapter", BUILTINS, "start without --ip-adapter")
HUB_DEFAULT_FILE = "models/ip-adapter_sd15.safetensors"
"""The weights read from a hub id given without `:FILE` (h94/IP-Adapter's SD 1.5 adapter)."""
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
"""The built-in `tiny` CLIP vision encoder's config (transformers' `CLIPVisionConfig`)."""
TINY_TOKENS = 4
"""Image tokens of the base IP-Adapter (diffusers' `ImageProjection` with `num_image_text_embeds=4`)."""


@dataclass
class IPAdapterWeights:
    """An IP-Adapter read for one UNet, on the UNet's device and in its dtype."""

    source: str
    encoder: Any
    """transformers `CLIPVisionModelWithProjection`: (n, 3, size, size) pixel values -> `image_embeds` (n, clip_dim)."""
    image_processor: Any
    """transformers `CLIPImageProcessor`: RGB images -> the encoder's normalised pixel values."""
    projection: torch.nn.Module
    """diffusers `ImageProjection`: (n, clip_dim) -> (n, tokens, cross_dim) image tokens."""
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """`attn2` module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn2`) -> its
    (`to_k_ip`, `to_v_ip`) weights, each (layer width, cross_dim)."""
    tokens: int
    """Image tokens per image."""
    cross_dim: int

    @property
    def digest(self) -> str:
        """A short fingerprint of the adapter's weights, for the engine key of exported graphs."""
        crc = 0
        for path in sorted(self.layers):
            crc = zlib.crc32(self.layers[path][0].float().cpu().numpy().tobytes()[:4096], crc)
        return f"{crc:08x}"


def load_ip_adapter(source: str, unet: Any) -> IPAdapterWeights:
    """The IP-Adapter `source` for `unet` (a diffusers UNet2DConditionModel), on its device and dtype.

    `ModelLoadError` in one line naming the source and why: not found, not an IP-Adapter, a variant
    other than the base one, or made for another model (its layers or widths do not fit).
    """
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    try:
        if source == "tiny":
            encoder, processor = tiny_image_encoder(seed=zlib.crc32(b"ip-adapter"))
            state = tiny_state(unet, encoder.config.projection_dim, seed=1)
        else:
            weights, encoder_dir = _locate(source)
            state = read_state(weights)
            encoder, processor = _read_encoder(encoder_dir)
        adapter = _convert(source, state, unet, encoder, processor)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, transformers and diffusers raise many kinds; one line
        raise ModelLoadError(
            f"IP-Adapter {source} could not be loaded: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    adapter.encoder.to(device, dtype).eval()
    adapter.projection.to(device, dtype).eval()
    adapter.layers = {path: (k.to(device, dtype), v.to(device, dtype)) for path, (k, v) in adapter.layers.items()}
    log.info("IP-Adapter %s: %d cross-attention layers, %d image tokens", source, len(adapter.layers), adapter.tokens)
    return adapter


def _locate(source: str) -> tuple[Path, Path]:
    """The weights file of `source` and the image encoder's folder."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"IP-Adapter {source}: only .safetensors files are read (no pickled checkpoints)")
        encoder = path.parent / "image_encoder"
        if not encoder.is_dir():
            raise ModelLoadError(
                f"IP-Adapter {source}: no image_encoder folder beside it (the CLIP vision encoder, as in "
                "h94/IP-Adapter's models/image_encoder)"
            )
        return path, encoder
    written = split_hub_file(source)
    if path.suffix == ".safetensors" or written is None:
        raise ModelLoadError(
            f"IP-Adapter {source!r} is not a built-in ({', '.join(BUILTINS)}), a .safetensors file, nor a hub id "
            "(owner/name or owner/name:path/in/repo.safetensors)"
        )
    repo, file = written[0], written[1] or HUB_DEFAULT_FILE
    encoder = Path(file).parent / "image_encoder"
    found = hub_file(repo, file, IP_ADAPTER, also=(f"{encoder}/*",))
    snapshot_root = found.parents[len(Path(file).parts) - 1]
    return found, snapshot_root / encoder


def read_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A `.safetensors` IP-Adapter as diffusers' loader splits it: {"image_proj": ..., "ip_adapter": ...}."""
    from safetensors.torch import load_file

    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(str(path)).items():
        part, _, rest = key.partition(".")
        if part not in state:
            raise ModelLoadError(f"IP-Adapter {path}: key {key!r} is neither image_proj.* nor ip_adapter.*")
        state[part][rest] = value
    return state


def _read_encoder(folder: Path) -> tuple[Any, Any]:
    from transformers import CLIPVisionModelWithProjection

    CLIPImageProcessor = image_processor_class()
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"IP-Adapter: the image encoder folder {folder} has no config.json")
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True)
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(folder)
    else:  # h94's image_encoder has none: CLIP's own preprocessing at the encoder's size
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return encoder, processor


def _convert(source: str, state: dict[str, dict[str, torch.Tensor]], unet: Any, encoder: Any,
             processor: Any) -> IPAdapterWeights:  # fmt: skip
    """Through diffusers' conversion: the `ImageProjection` and each `attn2`'s `to_k_ip`/`to_v_ip`."""
    if "proj.weight" not in state["image_proj"]:
        kinds = ", ".join(sorted(state["image_proj"])[:3]) or "none"
        raise ModelLoadError(
            f"IP-Adapter {source}: only the base IP-Adapter (image_proj.proj.weight) is served; this one has "
            f"image_proj keys {kinds} (Plus, Full Face or Face ID)"
        )
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
    clip_dim = projection.image_embeds.in_features
    if clip_dim != encoder.config.projection_dim:
        raise ModelLoadError(
            f"IP-Adapter {source}: its projection reads image embeddings of width {clip_dim}, its image encoder "
            f"gives {encoder.config.projection_dim}"
        )
    cross_dim = projection.norm.normalized_shape[0]
    if cross_dim != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"IP-Adapter {source}: its image tokens are {cross_dim} wide, this model's text embeddings "
            f"{unet.config.cross_attention_dim} (an IP-Adapter for another model family)"
        )
    # diffusers' conversion makes each self-attention layer a processor of the class it has now; with
    # livediff's own processors installed (the feature bank's take arguments) that fails, so it reads
    # a UNet with diffusers' default processors, and the UNet's own come back after.
    from diffusers.models.attention_processor import AttnProcessor2_0

    installed = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        processors = unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
    finally:
        unet.set_attn_processor(installed)
    layers = {}
    for name, processor_module in processors.items():
        if hasattr(processor_module, "to_k_ip"):
            path = name.removesuffix(".processor")
            layers[path] = (processor_module.to_k_ip[0].weight.detach(), processor_module.to_v_ip[0].weight.detach())
    if not layers:
        raise ModelLoadError(f"IP-Adapter {source}: this UNet has no cross-attention layers")
    return IPAdapterWeights(source, encoder, processor, projection, layers, projection.num_image_text_embeds,
                            cross_dim)  # fmt: skip


def image_processor_class() -> Any:
    """transformers' CLIP image processor on Pillow (no torchvision here): `CLIPImageProcessorPil`
    where transformers has it, else `CLIPImageProcessor`."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def tiny_image_encoder(seed: int) -> tuple[Any, Any]:
    """A random tiny CLIP vision encoder (`TINY_VISION`) and its image processor (32x32 input)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPImageProcessor = image_processor_class()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION))
    size = TINY_VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return encoder, processor


def tiny_state(unet: Any, clip_dim: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A random base IP-Adapter for `unet` in the original file layout (`image_proj.proj.weight`,
    `ip_adapter.<n>.to_k_ip.weight` with n = 1, 3, 5 ... over the cross-attention layers in the
    UNet's processor order): what the built-in loads through diffusers' conversion, as a file is.
    Weights sized so that scale 1 changes the tiny model's output visibly."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state: dict[str, dict[str, torch.Tensor]] = {
        "image_proj": {
            "proj.weight": torch.randn(TINY_TOKENS * cross, clip_dim, generator=generator) / clip_dim**0.5,
            "proj.bias": torch.zeros(TINY_TOKENS * cross),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        width = attn.to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            state["ip_adapter"][f"{key}.{kind}.weight"] = (
                torch.randn(width, cross, generator=generator) * 2 / cross**0.5
            )
        key += 2
    return state


def flat_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`state` with the `image_proj.` / `ip_adapter.` prefixes of a `.safetensors` IP-Adapter file."""
    return {f"{part}.{key}": value.contiguous() for part, values in state.items() for key, value in values.items()}


@torch.inference_mode()
def encode_images(adapter: IPAdapterWeights, images: list[torch.Tensor]) -> torch.Tensor:
    """(n, tokens, cross_dim) image tokens of `images`, each an (H, W, 3) uint8 RGB host tensor: the
    CLIP vision encoder's `image_embeds`, through the projection. Runs on the adapter's device."""
    encoder = adapter.encoder
    device, dtype = next(encoder.parameters()).device, next(encoder.parameters()).dtype
    pixels = adapter.image_processor([image.numpy() for image in images], return_tensors="pt").pixel_values
    embeds = encoder(pixel_values=pixels.to(device, dtype)).image_embeds
    return adapter.projection(embeds)  # type: ignore[no-any-return]


@torch.inference_mode()
def unconditional_tokens(adapter: IPAdapterWeights) -> torch.Tensor:
    """(1, tokens, cross_dim): the projection of a zero image embedding, what the unconditional
    branch of classifier-free guidance attends to (diffusers' `negative_image_embeds`)."""
    param = next(adapter.projection.parameters())
    zero = torch.zeros((1, adapter.encoder.config.projection_dim), device=param.device, dtype=param.dtype)
    return adapter.projection(zero)  # type: ignore[no-any-return]
