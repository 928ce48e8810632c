"""Built-in models, made in code with random weights: no download, ever.

`tiny` is a small Stable-Diffusion-shaped model for tests and CPU runs. `sd-turbo-random` has the
real SD-Turbo architecture (UNet of SD 2.1, OpenCLIP-H-sized text encoder, TAESD) so speed can be
measured on any GPU without the weights. Each is written once with `save_pretrained` into a cache
folder and then loaded from there by the same code that loads real models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

BUILDER_VERSION = 1
"""Bump when a builder changes, so cached folders and compiled engines are rebuilt."""

SEED = 0


TINY_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)
"""The tiny model's UNet (also the architecture of the built-in `tiny` ControlNet)."""
SD21_UNET: dict[str, Any] = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
"""SD-Turbo's UNet, Stable Diffusion 2.1's (also the architecture of the `sd-turbo-random` ControlNet)."""


def cache_root() -> Path:
    return Path(os.environ.get("LIVEDIFF_CACHE", Path.home() / ".cache" / "livediff"))


def _scheduler() -> EulerDiscreteScheduler:
    # The noise schedule of Stable Diffusion 2.1, with SD-Turbo's trailing spacing.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )


def _write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over single bytes (no merges): every prompt maps to distinct ids."""
    # CLIP's byte-to-unicode table: printable bytes map to themselves, others to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


@torch.no_grad()
def rescale_output(layer: torch.nn.Conv2d, run: Callable[[], None], mean: float, std: float) -> None:
    """Set `layer`'s weight and bias so its output over `run()` has the given per-channel mean and std
    (how the built-in random models get the output scales of trained ones)."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: seen.append(output))
    run()
    handle.remove()
    out = torch.cat(seen).transpose(0, 1).flatten(1)  # (channels, values)
    scale = std / out.std(dim=1).clamp_min(1e-6)
    layer.weight.mul_(scale[:, None, None, None])
    assert layer.bias is not None, "rescale_output needs a layer with a bias"
    layer.bias.copy_((layer.bias - out.mean(dim=1)) * scale + mean)


@torch.no_grad()
def _calibrate_tiny(unet: UNet2DConditionModel, vae: AutoencoderTiny, text_encoder: CLIPTextModel) -> None:
    """Give the random tiny model the output scales of a trained one, so its outputs respond to input.

    Straight from random init, the VAE decoder saturates (every image near black), latents are ~0
    and the prompt barely moves the UNet; tests could not tell a prompt change from none. Each
    network's last layer is rescaled to real-model statistics on random inputs, and cross-attention
    is strengthened so the prompt visibly steers the output.
    """
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    latents = torch.randn(4, 4, 8, 8)
    ids = torch.randint(0, text_encoder.config.vocab_size - 2, (4, 77))
    embeds = text_encoder(ids, return_dict=False)[0]
    rescale_output(vae.encoder.layers[-1], lambda: vae.encoder(images), mean=0.0, std=1.0)
    rescale_output(vae.decoder.layers[-1], lambda: vae.decoder(latents), mean=0.5, std=0.2)  # -> [-1, 1] as 2x-1
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight.mul_(8.0)
    timesteps = torch.full((4,), 500.0)
    rescale_output(unet.conv_out, lambda: unet(latents, timesteps, embeds), mean=0.0, std=1.0)


def _tiny(folder: Path) -> None:
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    text_config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    text_encoder = CLIPTextModel(text_config)
    _calibrate_tiny(unet, vae, text_encoder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")


def _sd_turbo_random(folder: Path) -> None:
    UNet2DConditionModel(**SD21_UNET).save_pretrained(folder / "unet")
    AutoencoderTiny().save_pretrained(folder / "vae")
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        projection_dim=1024,
        max_position_embeddings=77,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny": _tiny, "sd-turbo-random": _sd_turbo_random}


def builtin_dir(name: str) -> Path:
    """The folder of built-in model `name`, built on first use (atomically, so racing is safe)."""
    return build_once(cache_root() / "models" / f"{name}-v{BUILDER_VERSION}", "model_index.json",
                      lambda staging: _build_model(name, staging))  # fmt: skip


def _build_model(name: str, staging: Path) -> None:
    torch.manual_seed(SEED)
    BUILDERS[name](staging)
    _scheduler().save_pretrained(staging / "scheduler")
    _write_tokenizer(staging / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderTiny"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2))


def build_once(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build(staging)` the first time (complete once `marker` exists in it).

    The build writes into a private staging folder that is renamed into place, so a reader sees a
    complete folder or none, and processes racing to build it keep the first that finished.
    """
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(staging)
        if not (staging / marker).exists():
            raise RuntimeError(f"building {folder.name} wrote no {marker}")
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not (folder / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
