"""Load the parts of a Stable-Diffusion-style model from a hub id, a local folder or a built-in name."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch
from diffusers import AutoModel, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from livediff.errors import ModelLoadError
from livediff.models.builtin import BUILDER_VERSION, BUILDERS, builtin_dir
from livediff.models.hub import HubKind, fingerprint, snapshot
from livediff.models.parts import ModelParts
from livediff.models.single_file import is_single_file, load_single_file, locate_single_file

if TYPE_CHECKING:
    from livediff.config import EngineSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_TAESD = "madebyollin/taesd"
_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


def resolve_auto(ref: str, device: torch.device) -> str:
    """`auto` means the real default model on CUDA and `tiny` elsewhere."""
    if ref != "auto":
        return ref
    picked = DEFAULT_MODEL if device.type == "cuda" else "tiny"
    log.info("--model auto picked %s (device %s)", picked, device)
    return picked


def load_model(
    ref: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae: str = "taesd",
    lcm_lora: str = "",
    model_config: str = "",
) -> ModelParts:
    """Load `ref` (hub id, local diffusers folder, single-file `.safetensors` checkpoint, `tiny`,
    `sd-turbo-random` or `auto`).

    `vae` is `taesd` (AutoencoderTiny: the model's own when it ships one, else madebyollin/taesd),
    `full` (the model's own VAE) or another id/folder. `lcm_lora`: an LCM-LoRA source fused into
    the UNet, with the LCM scheduler (`livediff.models.lcm_lora`); empty for none. `model_config`:
    the diffusers config (folder or hub id) of a single-file `ref` (`livediff.models.single_file`);
    empty: its family's.
    """
    device = torch.device(device)
    ref = resolve_auto(ref, device)
    if model_config and not is_single_file(ref):
        raise ModelLoadError(f"--model-config {model_config} describes a single-file --model; {ref} is not one")
    if is_single_file(ref):
        parts = _load_single_file(ref, model_config, dtype, vae)
    else:
        parts = _load_folder(ref, dtype, vae)
    if lcm_lora:
        from livediff.models.lcm_lora import fuse_lcm_lora

        scheduler, tag = fuse_lcm_lora(parts.unet, parts.scheduler, lcm_lora)  # on the host, in the load dtype
        parts = dataclasses.replace(parts, scheduler=scheduler, revision=parts.revision + tag, lcm_lora=lcm_lora)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return parts


def load_engine_model(settings: EngineSettings, device: torch.device | str, dtype: torch.dtype) -> ModelParts:
    """`load_model` with the engine settings' model, VAE, LCM-LoRA and single-file config."""
    return load_model(settings.model, device, dtype, vae=settings.vae, lcm_lora=settings.lcm_lora,
                      model_config=settings.model_config)  # fmt: skip


def _load_single_file(ref: str, config: str, dtype: torch.dtype, vae: str) -> ModelParts:
    """The parts of a single-file checkpoint (`livediff.models.single_file`), on the host in `dtype`."""
    checkpoint = locate_single_file(ref, config)
    log.info("loading single-file model %s (%s, config %s)", ref, checkpoint.family, checkpoint.config)
    own_vae = None if vae == "full" else load_vae(checkpoint.config_dir, vae, dtype)
    pipe = load_single_file(checkpoint, dtype, own_vae)
    return ModelParts(ref=str(checkpoint.path), revision=checkpoint.revision, unet=pipe.unet, vae=pipe.vae,
                      text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                      vae_ref=vae)  # fmt: skip


def _load_folder(ref: str, dtype: torch.dtype, vae: str) -> ModelParts:
    """The parts of a diffusers folder, hub id or built-in, on the host in `dtype`."""
    folder, revision = _locate(ref)
    log.info("loading model %s (%s)", ref, revision)
    try:
        return ModelParts(
            ref=ref,
            revision=revision,
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            vae=load_vae(folder, vae, dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            scheduler=_load_scheduler(folder),
            vae_ref=vae,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {ref!r} at {folder} could not be loaded: {exc}") from exc


MODEL = HubKind("model", tuple(BUILDERS), "run with `--model tiny` (built in, no download)")


def _locate(ref: str) -> tuple[Path, str]:
    """The local folder holding `ref` and its revision, downloading hub models if needed."""
    if ref in BUILDERS:
        return builtin_dir(ref), f"builtin-v{BUILDER_VERSION}"
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no unet/ inside)")
        return path, fingerprint(path)
    if path.suffix or ref.count("/") != 1:
        raise ModelLoadError(
            f"model {ref!r} is not a built-in ({', '.join(BUILDERS)}), an existing folder, nor a hub id "
            "(owner/name, e.g. stabilityai/sd-turbo); run with `--model tiny` (built in, no download)"
        )
    extensions = ("json", "txt", "safetensors")
    patterns = ["model_index.json"] + [f"{c}/*.{ext}" for c in (*_COMPONENTS, "vae") for ext in extensions]
    folder = snapshot(ref, patterns, MODEL)
    return folder, folder.name  # the hub cache stores snapshots under their commit hash


def load_vae(folder: Path, vae: str, dtype: torch.dtype) -> torch.nn.Module:
    """The VAE `vae` names (`taesd`, `full`, an id/folder) for the model in `folder`, in `dtype`."""
    own = folder / "vae" / "config.json"
    own_class = json.loads(own.read_text()).get("_class_name") if own.exists() else None
    if vae == "full" or (vae == "taesd" and own_class == "AutoencoderTiny"):
        if own_class is None:
            raise ModelLoadError(f"{folder} has no vae/ folder; use --vae taesd")
        return AutoModel.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype)
    source = DEFAULT_TAESD if vae == "taesd" else vae
    vae_folder = Path(source) if Path(source).is_dir() else snapshot(source, None, MODEL)
    return AutoModel.from_pretrained(str(vae_folder), torch_dtype=dtype)


def _load_scheduler(folder: Path) -> SchedulerMixin:
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)
