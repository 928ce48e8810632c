"""LCM-LoRA: make an SD 1.5-family checkpoint a few-step model by fusing a latent-consistency LoRA
into its UNet and sampling with the LCM scheduler (Luo et al., "LCM-LoRA: A Universal Stable-Diffusion
Acceleration Module", arXiv:2311.05556).

The LoRA is fused, not served per stream: a consistency-distilled UNet needs the LCM scheduler's
boundary condition (`c_skip`, `c_out`, `livediff.engine.schedule`) for every row, and that schedule
belongs to the engine, so a stream without the LoRA would be sampled wrongly. Fused, it costs nothing
per frame (the weights are the model's own), every backend exports and records it like any UNet, and
the per-stream LoRAs (`--lora`) still stack on top of it. Its scale is fixed at 1 (the scale it was
distilled at).

Steps, as `fuse_lcm_lora` runs them:
1. read the LoRA with the per-stream LoRAs' rules and conversion (`livediff.models.lora.diffusers_state`:
   a `.safetensors` file in diffusers' or kohya's keys, a folder, a hub id, or the built-in random
   `tiny` / `random:RANK` for tests);
2. inject it with PEFT (diffusers' `load_lora_adapter`), merge it into the base weights (`fuse_lora`,
   with diffusers' check for non-finite weights) and take PEFT's layers out (`unload_lora`), leaving
   the plain modules with the fused weights;
3. switch the scheduler to `LCMScheduler` built from the model's own scheduler config (its betas and
   prediction type), and mark the revision with the LoRA's content digest, so compiled engines of
   the plain and the fused model never share a cache entry.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from diffusers import LCMScheduler, SchedulerMixin

from livediff.errors import ModelLoadError

log = logging.getLogger(__name__)

ADAPTER = "livediff_lcm"
"""PEFT's name for the LoRA while it is being fused."""


def fuse_lcm_lora(unet: Any, scheduler: SchedulerMixin, source: str) -> tuple[SchedulerMixin, str]:
    """Fuse the LCM-LoRA `source` into `unet` (in place: the same object, its weights changed);
    the LCM scheduler built from `scheduler`'s config and the tag the model's revision gets
    (`+lcm-lora=<digest>`).

    `ModelLoadError` in one line naming `--lcm-lora`, the source and why: not found, not a LoRA,
    no UNet layer, or made for another model family (a shape that does not fit this UNet).
    """
    from livediff.models.lora import diffusers_state

    try:
        unet_keys, alphas = diffusers_state("lcm-lora", source, unet)
        digest = state_digest(unet_keys)
        fused = _fuse(unet, unet_keys, alphas)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--lcm-lora {source}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors, diffusers and PEFT raise many kinds; one line names it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"--lcm-lora {source} could not be loaded: {type(exc).__name__}: {first}") from exc
    if not fused:
        raise ModelLoadError(f"--lcm-lora {source} has no layer of this model's UNet (a LoRA for another model?)")
    log.info("LCM-LoRA %s fused into %d UNet layers; scheduler LCMScheduler", source, fused)
    return LCMScheduler.from_config(scheduler.config), f"+lcm-lora={digest}"


def _fuse(unet: Any, unet_keys: dict[str, torch.Tensor], alphas: dict[str, float] | None) -> int:
    """Merge the LoRA into `unet`'s weights with PEFT; the number of layers it changed. On any failure
    the UNet's PEFT layers are taken out again (the weights are merged only once all were injected)."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.lora import LoraLayer

    try:
        unet.load_lora_adapter(unet_keys, prefix="unet", network_alphas=alphas, adapter_name=ADAPTER)
        layers = sum(1 for m in unet.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A)
        if layers:
            unet.fuse_lora(lora_scale=1.0, safe_fusing=True, adapter_names=[ADAPTER])
        return layers
    finally:
        recurse_remove_peft_layers(unet)  # fused layers keep their merged base weights
        if hasattr(unet, "peft_config"):
            del unet.peft_config
        unet._hf_peft_config_loaded = False


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A 12-hex-digit SHA-256 of a state dict's keys and tensor bytes: the fused model's revision tag."""
    sha = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        sha.update(key.encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:12]
