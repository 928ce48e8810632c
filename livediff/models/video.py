"""Causal video models: the built-ins (`tiny-video`, `wan-1.3b-random`) and real causal Wan checkpoints.

A video model is a causal Wan transformer (`livediff.models.wan`), an autoencoder that turns chunks
of camera frames into latent frames and back, and a text encoder that turns a prompt into the
transformer's text states. The built-ins are made in code at random weights: `tiny-video` small
enough for a CPU, `wan-1.3b-random` Wan 2.1 1.3B's architecture with a text encoder stand-in of
UMT5-XXL's output shape (512 tokens x 4096), for speed runs with no download.

Real checkpoints: a local folder or a hub id laid out as diffusers' Wan 2.1 T2V repositories
(`transformer/` a `WanTransformer3DModel`, `text_encoder/` UMT5, `tokenizer/`; the autoencoder is
`vae/`, Wan's VAE in streaming form (`livediff.models.wan_vae`), when the checkpoint has one, else
the TAEHV-shaped one with TAEHV's trained weights, `livediff.models.taehv_weights`). The causal
weights come either from that folder's `transformer/` (a causal checkpoint converted to diffusers'
layout) or, as StreamDiffusionV2, CausVid and Self-Forcing publish them, from one file in Wan's
original layout named by `weights` (`--video-weights`, `livediff.models.wan_weights`) with a base
Wan 2.1 T2V folder or hub id (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) for the transformer's
configuration, UMT5, tokenizer and VAE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from livediff.errors import ConfigError, ModelLoadError
from livediff.models.tae import TAEHV_SHAPE, TINY_SHAPE, TinyVideoAutoencoder, build_autoencoder
from livediff.models.taehv_weights import WEIGHTS_CHOICES, load_taehv, taehv_source
from livediff.models.wan import TINY_VIDEO, WAN_1_3B, CausalWan, build_transformer
from livediff.models.wan_vae import TINY_WAN_VAE, WAN_2_1_VAE, WanStreamingVae, build_wan_vae
from livediff.models.wan_weights import WeightsFile, describe, load_original_transformer, locate_weights

log = logging.getLogger(__name__)

VIDEO_BUILTINS = ("tiny-video", "wan-1.3b-random")
"""Built-in causal video models (random weights, no download)."""
VIDEO_BUILDER_VERSION = 1
VIDEO_AUTOENCODERS = ("auto", "tae", "wan-vae")
"""`--video-autoencoder`: the streaming autoencoder of a video model (`load_video_model`)."""


class ByteTextEncoder(nn.Module):
    """A text encoder stand-in: a prompt's UTF-8 bytes looked up in a random table, zero-padded to
    `tokens` (Wan pads its UMT5 states with zeros to 512 tokens). Gives the real encoder's output
    shape, and different prompts different states, without its weights."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.table = nn.Embedding(256, dim)

    def forward(self, prompt: str) -> torch.Tensor:
        """(1, tokens, dim) for `prompt` (truncated to `tokens` bytes)."""
        ids = list(prompt.encode("utf-8"))[: self.tokens]
        out = torch.zeros((1, self.tokens, self.table.embedding_dim), device=self.table.weight.device,
                          dtype=self.table.weight.dtype)  # fmt: skip
        if ids:
            out[0, : len(ids)] = self.table(torch.tensor(ids, device=self.table.weight.device))
        return out


@dataclass
class VideoParts:
    """What the video engine needs of a model, on its device and in its dtype."""

    ref: str
    revision: str
    transformer: CausalWan
    autoencoder: TinyVideoAutoencoder | WanStreamingVae
    """The streaming autoencoder: the TAEHV-shaped one (`tae`) or Wan 2.1's VAE (`wan-vae`)."""
    encode_prompt: Callable[[str], torch.Tensor]
    """prompt -> (1, text tokens, text_dim) text states."""
    autoencoder_weights: str = "random"
    """Where the `tae` autoencoder's weights came from: `random`, or the TAEHV file (its source);
    empty for `wan-vae` (a checkpoint's own `vae/`)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def autoencoder_name(self) -> str:
        """`tae` (the TAEHV-shaped one) or `wan-vae` (Wan 2.1's VAE in streaming form)."""
        return self.autoencoder.name


def is_video_model(ref: str, weights: str = "") -> bool:
    """Whether `ref` names a causal video model: a built-in, a folder whose transformer is Wan's, or
    any base model given causal `weights` (`--video-weights`: only a video model takes them)."""
    if ref in VIDEO_BUILTINS or weights:
        return True
    config = Path(ref).expanduser() / "transformer" / "config.json"
    try:
        return json.loads(config.read_text()).get("_class_name") == "WanTransformer3DModel"
    except (OSError, ValueError):
        return False


def load_video_model(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     autoencoder: str = "auto", weights: str = "",
                     autoencoder_weights: str = "auto") -> VideoParts:  # fmt: skip
    """Load `ref`: `tiny-video`, `wan-1.3b-random`, or a diffusers-layout causal Wan folder or hub id.

    `weights` (`--video-weights`): a file of causal transformer weights in Wan's original layout (a
    local path or a hub file `owner/name:path/in/repo.pt`, `livediff.models.wan_weights`) loaded into
    a transformer of `ref`'s configuration in place of `ref`'s own `transformer/` weights (which are
    then not fetched); `ref` supplies the rest (for a built-in, its configuration and stand-ins).

    `autoencoder` (one of `VIDEO_AUTOENCODERS`): `tae`, the TAEHV-shaped one; `wan-vae`, Wan 2.1's
    VAE in streaming form (a folder's or hub id's `vae/`; for a built-in, at random weights: Wan 2.1's
    shape for `wan-1.3b-random`, a few channels wide for `tiny-video`); `auto`, `wan-vae` for a
    checkpoint with a `vae/`, else `tae`. `ConfigError` for another name; `ModelLoadError` naming the
    file and what was expected when a folder has another layout.

    `autoencoder_weights` (`--video-autoencoder-weights`, `livediff.models.taehv_weights`) for `tae`:
    `auto`, TAEHV's trained Wan 2.1 file from the hub for a real checkpoint and random weights for a
    built-in; `random`; or a file or hub file (`owner/name:FILE`), which also makes `auto` pick `tae`."""
    if autoencoder not in VIDEO_AUTOENCODERS:
        raise ConfigError(f"video_autoencoder must be one of {', '.join(VIDEO_AUTOENCODERS)}, got {autoencoder!r}")
    device = torch.device(device)
    tae_source = taehv_source(ref in VIDEO_BUILTINS, autoencoder_weights)
    if autoencoder == "auto" and autoencoder_weights not in WEIGHTS_CHOICES:
        autoencoder = "tae"  # TAEHV weights named: the TAE runs
    elif autoencoder == "wan-vae" and autoencoder_weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"--video-autoencoder-weights {autoencoder_weights} is for the tae autoencoder; "
                          "--video-autoencoder wan-vae takes none (drop one of the two)")  # fmt: skip
    # TAEHV's file, where the tae is sure to run, is read and checked before a local checkpoint's
    # gigabytes load (after its layout's own check: is_video_model)
    folder = Path(ref).expanduser()
    sure = autoencoder == "tae" or (autoencoder == "auto" and folder.is_dir() and not (folder / "vae").exists())
    early = sure and (ref in VIDEO_BUILTINS or is_video_model(ref, weights))
    trained = load_taehv(tae_source) if tae_source is not None and early else None
    vae_module: Any = None
    if ref in VIDEO_BUILTINS:
        tiny = ref == "tiny-video"
        config = TINY_VIDEO if tiny else WAN_1_3B
        revision = f"builtin-v{VIDEO_BUILDER_VERSION}"
        if weights:
            file = locate_weights(weights)
            transformer: Any = load_original_transformer(config, file, dtype, describe(ref, config))
            revision += f"+{file.revision}"
        else:
            transformer = build_transformer(config)
        if autoencoder == "wan-vae":
            vae_module = build_wan_vae(TINY_WAN_VAE if tiny else WAN_2_1_VAE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            text: nn.Module = ByteTextEncoder(16 if tiny else 512, config["text_dim"])
        encode: Callable[[str], torch.Tensor] = text
        shape = TINY_SHAPE if tiny else TAEHV_SHAPE
    else:
        transformer, text, encode, revision, vae_module = _load_folder(ref, dtype, autoencoder, weights)
        shape = TAEHV_SHAPE
    modules = [transformer, text]
    chosen: TinyVideoAutoencoder | WanStreamingVae
    if vae_module is not None:
        modules.append(vae_module)
        chosen = WanStreamingVae(vae_module)
    else:
        if trained is None:
            trained = build_autoencoder(shape) if tae_source is None else load_taehv(tae_source)
        tae = trained
        modules.append(tae)
        chosen = tae
        if ref not in VIDEO_BUILTINS and tae_source is None:
            log.warning("video model %s: the TAEHV-shaped autoencoder runs at random weights", ref)
    for module in modules:
        module.to(device).eval().requires_grad_(False)
        if dtype != torch.float32:  # diffusers then warns that it would keep a few modules in float32
            module.to(dtype)
    tae_weights = "" if vae_module is not None else tae_source or "random"
    return VideoParts(ref, revision, CausalWan(transformer), chosen, encode, tae_weights)


def _load_folder(ref: str, dtype: torch.dtype, autoencoder: str,
                 weights: str = "") -> tuple[Any, nn.Module, Callable[[str], torch.Tensor], str, Any]:  # fmt: skip
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from livediff.models.hub import HubKind, fingerprint, snapshot

    path = Path(ref).expanduser()
    base = f" (the base of --video-weights {weights}: a Wan 2.1 T2V folder or hub id)" if weights else ""
    file: WeightsFile | None = None
    if weights:  # checked before the base's gigabytes are fetched
        file = locate_weights(weights)
    if path.is_dir():
        folder, revision = path, fingerprint(path)
    elif weights and (path.suffix or ref.count("/") != 1):
        raise ModelLoadError(
            f"--video-weights needs --model set to a Wan 2.1 T2V base, a folder or hub id in diffusers' layout "
            f"(Wan-AI/Wan2.1-T2V-1.3B-Diffusers for 1.3B weights), or to a built-in video model "
            f"({', '.join(VIDEO_BUILTINS)}); {ref!r} is neither"
        )
    elif path.suffix or ref.count("/") != 1:
        raise ModelLoadError(
            f"video model {ref!r} is not a built-in ({', '.join(VIDEO_BUILTINS)}), an existing folder, nor a "
            "hub id (owner/name); run with `--model tiny-video` (built in, no download)"
        )
    else:
        kind = HubKind("video model", VIDEO_BUILTINS, "run with `--model tiny-video` (built in, no download)")
        extensions = ("json", "safetensors", "model", "txt")
        parts = ("text_encoder", "tokenizer") + (("vae",) if autoencoder != "tae" else ())
        patterns = [f"{c}/*.{e}" for c in parts for e in extensions]
        patterns += ["transformer/*.json"] if file else [f"transformer/*.{e}" for e in extensions]
        folder = snapshot(ref, patterns, kind)
        revision = folder.name
    if file is not None:
        revision = f"{revision}+{file.revision}"
    config = folder / "transformer" / "config.json"
    try:
        settings = json.loads(config.read_text())
        found = settings.get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config}: expected a WanTransformer3DModel config{base} ({exc})") from exc
    if found != "WanTransformer3DModel":
        raise ModelLoadError(f"{config}: expected _class_name WanTransformer3DModel (a causal Wan 2.1){base}, "
                             f"got {found!r}")  # fmt: skip
    vae_config = folder / "vae" / "config.json"
    use_vae = autoencoder == "wan-vae" or (autoencoder == "auto" and vae_config.exists())
    if use_vae:  # its layout checked before any weights load
        try:
            found = json.loads(vae_config.read_text()).get("_class_name")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{vae_config}: expected an AutoencoderKLWan config for --video-autoencoder "
                                 f"wan-vae ({exc})") from exc  # fmt: skip
        if found != "AutoencoderKLWan":
            raise ModelLoadError(f"{vae_config}: expected _class_name AutoencoderKLWan, got {found!r}")
    if file is not None:
        transformer = load_original_transformer(settings, file, dtype, describe(ref, settings))
    try:
        if file is None:
            transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"video model {ref!r} at {folder} could not be loaded: {exc}") from exc
    if int(transformer.config.patch_size[0]) != 1:
        raise ModelLoadError(f"{config}: expected patch_size (1, 2, 2), got {transformer.config.patch_size}")
    vae = None
    if use_vae:
        try:
            vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"video model {ref!r}: its vae/ at {folder} could not be loaded: {exc}") from exc

    def encode(prompt: str, max_tokens: int = 512) -> torch.Tensor:
        """UMT5 states of `prompt`, zeroed past its tokens and padded to 512 (Wan's text pipeline)."""
        ids = tokenizer([prompt], padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(text.device)
        states = text(ids.input_ids.to(text.device), mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)

    return transformer, text, encode, revision, vae
