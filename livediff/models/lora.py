"""Load LoRAs (low-rank adapters, Hu et al. 2021, arXiv:2106.09685) for the engine's UNet.

A LoRA adds `scale * up @ down` to a layer's weight: `down` (rank, in) and `up` (out, rank) for a
linear layer; for a convolution `down` is a (rank, in, kh, kw) kernel and `up` a 1x1 one. What is
read here is each UNet layer's pair with the LoRA's own scaling (alpha / rank) folded into `up`:
the engine never merges it into the weights (each stream picks its LoRAs and their scales; see
`livediff.backends.multi_lora`).

Sources: a `.safetensors` file, a folder holding one, a hub id (owner/name), or a built-in random
LoRA (`tiny`: rank 4; `random:RANK`) for tests and benchmarks. The file formats (diffusers/PEFT
keys, kohya's `lora_unet_*` keys with their alphas) are converted by diffusers' own LoRA loading:
the state dict goes through `StableDiffusionLoraLoaderMixin.lora_state_dict` and is injected into
the UNet by `load_lora_adapter` (PEFT), read back per layer, and the UNet is restored. Text-encoder
layers of a LoRA are left out (prompt embeddings are shared by all streams).
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.errors import ModelLoadError
from livediff.models.hub import HubKind, snapshot

log = logging.getLogger(__name__)

BUILTIN_RANK = {"tiny": 4}
"""Built-in random LoRAs and their ranks; `random:RANK` names any rank."""
RANDOM = re.compile(r"random:(\d{1,3})")
MAX_RANK = 256
TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|conv1|conv2|time_emb_proj)$"
)
"""The UNet layers a built-in random LoRA adapts: attention, feed-forward, the transformer's
projections and the resnets' convolutions (kohya's LoCon targets)."""
LORA = HubKind("LoRA", tuple(BUILTIN_RANK) + ("random:RANK",), "start without this LoRA")


@dataclass(frozen=True)
class LoRALayer:
    """One UNet layer's low-rank pair."""

    down: torch.Tensor
    """(rank, in) for a linear layer, (rank, in, kh, kw) for a convolution."""
    up: torch.Tensor
    """(out, rank), the LoRA's scaling (alpha / rank) folded in."""


@dataclass(frozen=True)
class LoRAWeights:
    """A LoRA read for one UNet: its layers by module path (`down_blocks.1.attentions.0.proj_in`)."""

    name: str
    source: str
    layers: dict[str, LoRALayer]

    @property
    def rank(self) -> int:
        """The largest rank of its layers."""
        return max(layer.down.shape[0] for layer in self.layers.values())


def builtin_rank(source: str) -> int | None:
    """The rank of a built-in random LoRA `source`, None when it names none."""
    if source in BUILTIN_RANK:
        return BUILTIN_RANK[source]
    match = RANDOM.fullmatch(source)
    return int(match.group(1)) if match else None


def load_lora(name: str, source: str, unet: Any) -> LoRAWeights:
    """The LoRA `source` for `unet`, on the UNet's device and in its dtype.

    `ModelLoadError` in one line naming the source and why: not found, not a LoRA, or made for
    another model (no layer of this UNet, or a shape that does not fit).
    """
    try:
        layers = _read_layers(*diffusers_state(name, source, unet), unet, name)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, diffusers and PEFT raise many kinds; one line names it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"LoRA {name}={source} could not be loaded: {type(exc).__name__}: {first}") from exc
    if not layers:
        raise ModelLoadError(f"LoRA {name}={source} has no layer of this model's UNet (a LoRA for another model?)")
    lora = LoRAWeights(name, source, layers)
    log.info("LoRA %s (%s): %d layers, rank %d", name, source, len(layers), lora.rank)
    return lora


def _locate(source: str) -> Path:
    """The `.safetensors` file of `source`: the file itself, the one in a folder, or a hub id's."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"LoRA {source}: only .safetensors files are read (no pickled checkpoints)")
        return path
    if not path.is_dir():
        if path.suffix or source.count("/") != 1:
            raise ModelLoadError(
                f"LoRA {source!r} is not a built-in ({', '.join(LORA.builtins)}), a .safetensors file, a folder, "
                "nor a hub id (owner/name)"
            )
        path = snapshot(source, ["*.safetensors"], kind=LORA)
    files = sorted(path.rglob("*.safetensors"))
    preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
    if preferred:
        return preferred[0]
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ModelLoadError(
            f"LoRA {source}: a folder needs pytorch_lora_weights.safetensors or exactly one .safetensors file "
            f"(found {found}); name the file"
        )
    return files[0]


def diffusers_state(name: str, source: str, unet: Any) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """The UNet part of the LoRA `source` in diffusers' keys (`unet.<path>.lora_A.weight` ...) and
    its network alphas (kohya), converted by diffusers' `lora_state_dict`: what PEFT injects.
    Raises whatever reading the file raises (`load_lora` says it in one line)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    rank = builtin_rank(source)
    if rank is not None:
        if not 1 <= rank <= MAX_RANK:
            raise ModelLoadError(f"LoRA {name}={source}: the rank must be 1..{MAX_RANK}")
        state: dict[str, torch.Tensor] | str = random_lora(unet, rank, seed=zlib.crc32(name.encode()))
    else:
        state = str(_locate(source))
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state)
    unet_keys = {k: v for k, v in state_dict.items() if not k.startswith(("text_encoder", "lora_te"))}
    if not unet_keys:
        raise ModelLoadError(f"LoRA {name}={source} has no UNet layers (text-encoder LoRAs are not served)")
    if not any(k.startswith("unet.") for k in unet_keys):
        unet_keys = {f"unet.{k}": v for k, v in unet_keys.items()}
    if alphas:
        alphas = {k: v for k, v in alphas.items() if not k.startswith(("text_encoder", "lora_te"))}
    return unet_keys, alphas or None


def _read_layers(unet_keys: dict[str, torch.Tensor], alphas: dict[str, float] | None, unet: Any,
                 name: str) -> dict[str, LoRALayer]:  # fmt: skip
    """Inject with PEFT (diffusers' `load_lora_adapter`), read each layer's pair, restore the UNet."""
    from peft.tuners.lora import LoraLayer

    adapter = f"livediff_{zlib.crc32(name.encode()):08x}"
    layers: dict[str, LoRALayer] = {}
    try:
        unet.load_lora_adapter(unet_keys, prefix="unet", network_alphas=alphas, adapter_name=adapter)
        for path, module in unet.named_modules():
            if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
                continue
            down = module.lora_A[adapter].weight.detach()  # type: ignore[operator]
            up = module.lora_B[adapter].weight.detach()  # type: ignore[operator]
            up = up.reshape(up.shape[0], up.shape[1]) * module.scaling[adapter]
            layers[path] = LoRALayer(down=down.clone(), up=up.clone())
    finally:
        _restore(unet)
    return layers


def _restore(unet: Any) -> None:
    """Take PEFT's layers out of `unet`: its modules and weights as before the LoRA was read."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(unet)
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False


def random_lora(unet: Any, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA of `rank` for `unet` as a diffusers state dict (`unet.<path>.lora_A.weight`,
    `lora_B.weight`) over the `TARGETS` layers: what the built-ins load through the same conversion
    as a file. Weights sized so that rank-4 changes the tiny model's output visibly."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        if not TARGETS.search(path) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if isinstance(module, torch.nn.Linear):
            down_shape: tuple[int, ...] = (rank, module.in_features)
            up_shape: tuple[int, ...] = (module.out_features, rank)
        else:
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        fan_in = int(torch.tensor(down_shape[1:]).prod())
        down = torch.randn(down_shape, generator=generator) / fan_in**0.5
        up = torch.randn(up_shape, generator=generator) * (0.5 / rank**0.5)
        state[f"unet.{path}.lora_A.weight"] = down
        state[f"unet.{path}.lora_B.weight"] = up
    return state
