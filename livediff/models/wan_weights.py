"""Causal Wan transformer weights in Wan's original layout: one file, as the causal video systems ship them.

StreamDiffusionV2 (`jerryfeng/StreamDiffusionV2`, `wan_causal_dmd_v2v/model.pt`), CausVid and
Self-Forcing (`self_forcing_dmd.pt`) publish their distilled causal Wan 2.1 transformer as a torch
pickle of their training wrapper's state: the transformer's tensors in Wan's own key layout
(`blocks.0.self_attn.q.weight`, `blocks.0.ffn.0.weight`, `blocks.0.modulation`, `head.head.weight`,
the names of Wan 2.1's `wan/modules/model.py`), prefixed `model.` by the wrapper that holds the
transformer as its `model`, under a top-level `generator_ema` (the EMA weights) and/or `generator`
key; Self-Forcing's EMA keys also carry FSDP's `_fsdp_wrapped_module.` segments. The text encoder
and VAE are Wan 2.1 T2V's, unchanged.

Steps, as `load_original_transformer` runs them:
1. `locate_weights`: a local file, or a hub file `owner/name:path/in/repo.pt` (only that file is
   fetched, through `livediff.models.hub.hub_file`); `.pt`/`.pth`/`.bin` pickles are read with
   `torch.load(weights_only=True)` (`hub.read_weights`: tensors and plain containers only, no code
   runs), `.safetensors` too;
2. `original_state`: the transformer's tensors, unwrapped (`generator_ema`, else `generator`, else
   `state_dict`) and with the wrappers' prefixes removed;
3. diffusers' own converter (`convert_wan_transformer_to_diffusers`) renames them to
   `WanTransformer3DModel`'s layout; every name and shape is checked against a model of the base's
   configuration before anything loads (strict: no missing and no unexpected key);
4. the tensors are assigned into that model, cast to the run's dtype.

Each failure is one `ModelLoadError` line naming `--video-weights`, the file and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.errors import ModelLoadError
from livediff.models.hub import (
    HubKind,
    file_revision,
    first_line,
    hub_file,
    hub_spelling,
    layout_mismatch,
    read_weights,
    split_hub_file,
)

FLAG = "--video-weights"
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".sft")
"""What a weights file ends with: a torch pickle (read with `weights_only=True`) or safetensors."""
WRAPPER_KEYS = ("generator_ema", "generator", "state_dict")
"""Top-level keys a training checkpoint holds the transformer under, in the order taken: the EMA
weights are the ones Self-Forcing's published inference runs (`--use_ema`)."""
PREFIXES = ("model.diffusion_model.", "model.", "diffusion_model.")
"""A prefix every key shares, dropped: the wrapper's `model.` (StreamDiffusionV2, CausVid, Self-Forcing)
or a single-file pipeline's `model.diffusion_model.`."""
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Module-path segments that FSDP, activation checkpointing and `torch.compile` insert; dropped."""
HUB_FILE = HubKind("repository", (), f"give {FLAG} a local file")
SHOWN = 4
"""Names shown per kind of mismatch in an error."""


@dataclass(frozen=True)
class WeightsFile:
    """A located weights file: `source` as the user wrote it, `path` its local copy."""

    source: str
    path: Path

    @property
    def revision(self) -> str:
        return file_revision(self.path, "weights")


def locate_weights(source: str) -> WeightsFile:
    """Step 1: `source` is a local file, or a hub file `owner/name:path/in/repo.pt` (fetched alone
    into the Hugging Face cache). `ModelLoadError` naming the flag for a missing file, an unread
    suffix or a hub file that cannot be had."""
    path = Path(source).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise ModelLoadError(f"{FLAG} {source}: expected a {', '.join(SUFFIXES)} file of Wan transformer weights")
    if path.is_file():
        return WeightsFile(source, path)
    written = split_hub_file(source)
    if written is None or not written[1] or path.is_absolute() or source.startswith((".", "~")):
        raise ModelLoadError(f"{FLAG} {source}: no such file (a hub file is written owner/name:path/in/repo.pt"
                             f"{hub_spelling(source)})")  # fmt: skip
    try:
        return WeightsFile(source, hub_file(*written, HUB_FILE))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{FLAG} {source}: {exc}") from exc


def original_state(file: WeightsFile) -> dict[str, torch.Tensor]:
    """Step 2: the file's transformer tensors in Wan's original names (`blocks.0.self_attn.q.weight`).

    A pickle is read with `torch.load(weights_only=True, map_location="cpu")` (memory-mapped when
    it is torch's zip format, so a 1.3B file is not held twice); the transformer is taken from
    `generator_ema`, `generator` or `state_dict` when the file nests it (`WRAPPER_KEYS`), and the
    prefixes and segments its training wrappers add are dropped."""
    where = f"{FLAG} {file.source}"
    try:
        loaded = read_weights(file.path)
    except Exception as exc:  # noqa: BLE001 - torch, pickle and safetensors raise many kinds; one line names it
        raise ModelLoadError(f"{where} could not be read: {type(exc).__name__}: {first_line(exc)}") from exc
    state = loaded
    while isinstance(state, Mapping):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    if not tensors:
        found = ", ".join(map(str, list(loaded)[:SHOWN])) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ModelLoadError(f"{where} holds no tensors (looked under {', '.join(WRAPPER_KEYS)} and at the top; "
                             f"found {found or 'nothing'})")  # fmt: skip
    for segment in WRAPPER_SEGMENTS:
        tensors = {k.replace(segment, ""): v for k, v in tensors.items()}
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            break
    return tensors


def to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Step 3's renaming: Wan's original names to `WanTransformer3DModel`'s, by diffusers' own
    converter (`diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return dict(convert_wan_transformer_to_diffusers(dict(state)))


def check_layout(converted: Mapping[str, torch.Tensor], expected: Mapping[str, Any], file: WeightsFile,
                 described: str) -> None:  # fmt: skip
    """Step 3's check: `converted` (diffusers' names) has exactly `expected`'s keys at their shapes
    (`expected`: a model's `state_dict()`, its tensors possibly on the meta device). `ModelLoadError`
    naming the file, `described` (the configuration it was checked against) and the first few
    missing, unexpected and misshapen names with their counts."""
    problems = layout_mismatch(converted, expected, SHOWN)
    if not problems:
        return
    raise ModelLoadError(
        f"{FLAG} {file.source} is not a causal Wan transformer of {described} in Wan's original layout "
        f"(blocks.N.self_attn.q.weight, ...): {problems} (keys named as diffusers' "
        "WanTransformer3DModel after conversion)"
    )


def load_original_transformer(config: Mapping[str, Any], file: WeightsFile, dtype: torch.dtype,
                              described: str) -> Any:  # fmt: skip
    """A `WanTransformer3DModel` of `config` (its `transformer/config.json`, or a built-in's) holding
    `file`'s weights, on the host in `dtype` (steps 2-4). `described` names the configuration in
    errors (e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (30 layers, width 1536)").

    The model is made with its parameters on the meta device (no random initialisation of 1.4 B
    weights; buffers such as the rotary tables are made for real) and the file's tensors assigned
    in with strict key checking. `ModelLoadError` for any mismatch (`check_layout`)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    converted = to_diffusers(original_state(file))
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with init_empty_weights(include_buffers=False):
            model = WanTransformer3DModel.from_config(settings)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{FLAG} {file.source}: the transformer config of {described} could not be used: "
                             f"{first_line(exc)}") from exc  # fmt: skip
    check_layout(converted, model.state_dict(), file, described)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.to(dtype)


def describe(name: str, config: Mapping[str, Any]) -> str:
    """`name` with the sizes of its transformer `config`, for errors: "NAME (30 layers, width 1536)"."""
    width = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    return f"{name} ({config.get('num_layers')} layers, width {width})"
