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

import torch
from diffusers import AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

BUILDER_VERSION = 1
"""Bump when a builder changes, so cached folders and compiled engines are rebuilt."""

SEED = 0


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


def _tiny(folder: Path) -> None:
    UNet2DConditionModel(
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
    ).save_pretrained(folder / "unet")
    AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).save_pretrained(folder / "vae")
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
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")


def _sd_turbo_random(folder: Path) -> None:
    UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ).save_pretrained(folder / "unet")
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
    folder = cache_root() / "models" / f"{name}-v{BUILDER_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
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
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
