"""TAEHV's trained weights (madebyollin/taehv, the file for Wan 2.1's latents: `taew2_1.pth`) in
livediff's streaming `TinyVideoAutoencoder`.

What the file holds, as TAEHV's `TAEHV` module names it: `encoder.N.*` and `decoder.N.*`, N the
layer's index in two `nn.Sequential`s. The encoder is conv 3->64, ReLU, then three stages of
(TPool, a stride-2 conv without bias, three MemBlocks), the first two pooling 2 frames into 1, the
third 1 into 1, then conv 64->16; the decoder is Clamp, conv 16->256, ReLU, then three stages of
(three MemBlocks, 2x upsample, TGrow, a conv without bias to the next width) at widths 256, 128, 64
growing 1, 2, 2 frames from one, then ReLU and conv 64->3. A MemBlock's convolutions are
`N.conv.0/2/4` (no skip weights: all its blocks keep their width), a TPool's or TGrow's 1x1
convolution `N.conv.weight`. livediff's layers are the same at the same indices (`_encoder`,
`_decoder` in `livediff.models.tae`); its per-frame layers are wrapped in `Framewise`, whose inner
module adds `.module.` to the name: `encoder.0.weight` is livediff's `encoder.0.module.weight`.
A TGrow weight stored with more output channels than its stage grows (a stage trained to grow time
and run without) keeps its last ones, the outputs of the last frame, as TAEHV's own loader does.

Values: pixels in [0, 1] (TAEHV's convention, and the engine's); TAEHV's latents are the latents
the diffusion model itself takes, no shift or scale (TAEHV's README; its Diffusers example wraps it
with `latents_mean` 0 and `latents_std` 1). For Wan that is the VAE's mean normalised by the VAE
config's `latents_mean` / `latents_std`, which is what `WanStreamingVae` hands the transformer too:
so the trained autoencoder's latents go to and come from the transformer as they are (no conversion
at this boundary; `TinyVideoAutoencoder.encode` / `decode`).

Time: TAEHV groups frames 4 by 4 from a clip's first and drops the decoder's first 3 output frames.
The streaming autoencoder precedes a stream's first chunk with 3 copies of its first frame (so the
first chunk of 1 + 4k frames gives 1 + k latents, as Wan's VAE) and drops the decoder's first 3:
that is TAEHV run on the stream with its first frame held 3 frames longer, the output 3 frames
behind the input, as TAEHV's own streaming is (its latent j needs input frame 4j + 3 and gives
frames up to 4j).

Files: `.safetensors`, or a pickled `.pth` / `.pt` read with `torch.load(weights_only=True)` (tensors
only: a file that would run code is refused). Every failure is one `ModelLoadError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from livediff.errors import ModelLoadError
from livediff.models.hub import (
    HubKind,
    first_line,
    hub_file,
    hub_spelling,
    layout_mismatch,
    read_weights,
    split_hub_file,
)
from livediff.models.tae import TAEHV_SHAPE, Framewise, TGrow, TinyVideoAutoencoder

log = logging.getLogger(__name__)

FLAG = "--video-autoencoder-weights"
WEIGHTS_CHOICES = ("auto", "random")
"""The named values of `--video-autoencoder-weights`; anything else is a file or a hub file."""
HUB_DEFAULT = "madebyollin/taehv"
HUB_DEFAULT_FILE = "taew2_1.pth"
"""TAEHV's file for Wan 2.1's latent space, read from a hub id given without `:FILE`."""
SUFFIXES = (".pth", ".pt", ".safetensors", ".sft")
TAEHV_HUB = HubKind("TAEHV weights repository", (), f"run with `{FLAG} random` (the autoencoder at random weights)")


def taehv_source(ref_is_builtin: bool, weights: str) -> str | None:
    """What `--video-autoencoder-weights weights` loads for a model: None for random weights
    (`random`, or `auto` for a built-in), TAEHV's Wan 2.1 file on the hub (`auto` for a real
    checkpoint), else `weights` itself (a file or a hub file)."""
    if weights == "random" or (weights == "auto" and ref_is_builtin):
        return None
    if weights == "auto":
        return f"{HUB_DEFAULT}:{HUB_DEFAULT_FILE}"
    return weights


def locate(source: str) -> Path:
    """The local path of `source`: an existing file, or a hub file `owner/name:FILE` (`owner/name`
    alone: `taew2_1.pth`) from the Hugging Face cache, else downloaded once (`livediff.models.hub`)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise ModelLoadError(f"{FLAG} {source}: expected a {', '.join(SUFFIXES)} file")
        return path
    if path.suffix.lower() in SUFFIXES and ":" not in source:
        raise ModelLoadError(f"{FLAG} {source}: no such file{hub_spelling(source)}")
    written = split_hub_file(source)
    if written is None:
        raise ModelLoadError(
            f"{FLAG} {source!r} is not auto, random, an existing file, nor a hub file "
            f"(owner/name or owner/name:FILE, e.g. {HUB_DEFAULT}:{HUB_DEFAULT_FILE})"
        )
    repo, file = written[0], written[1] or HUB_DEFAULT_FILE
    if Path(file).suffix.lower() not in SUFFIXES:
        raise ModelLoadError(f"{FLAG} {source}: expected a {', '.join(SUFFIXES)} file in the repository")
    try:
        return hub_file(repo, file, TAEHV_HUB)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{FLAG} {source}: {exc}") from exc


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or pickled (`weights_only`) file, by name, on the CPU."""
    state: Any
    try:
        state = read_weights(path)
    except Exception as exc:  # noqa: BLE001 - pickle, safetensors and torch raise many kinds; one line names it
        raise ModelLoadError(
            f"{FLAG} {path} could not be read as weights ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):  # fmt: skip
        raise ModelLoadError(f"{FLAG} {path}: expected a state dict (tensors by name), got {type(state).__name__}")
    return state


def our_name(name: str, ae: TinyVideoAutoencoder) -> str:
    """livediff's name of TAEHV's parameter `name` (`encoder.0.weight` -> `encoder.0.module.weight`)."""
    half, index, rest = (name.split(".", 2) + ["", ""])[:3]
    layers = getattr(ae, half, None) if half in ("encoder", "decoder") else None
    if isinstance(layers, nn.ModuleList) and index.isdigit() and int(index) < len(layers):
        if isinstance(layers[int(index)], Framewise):
            return f"{half}.{index}.module.{rest}"
    return name


def to_ours(state: dict[str, torch.Tensor], ae: TinyVideoAutoencoder, where: str) -> dict[str, torch.Tensor]:
    """TAEHV's state dict in livediff's names, checked against `ae` key by key and shape by shape:
    `ModelLoadError` naming `where`, how many keys are missing, unexpected or of another shape, and a few."""
    expected = ae.state_dict()
    mapped = {our_name(k, ae): v for k, v in state.items()}
    for index, layer in enumerate(ae.decoder):
        key = f"decoder.{index}.conv.weight"
        value, want = mapped.get(key), expected.get(key)
        if isinstance(layer, TGrow) and value is not None and want is not None and value.ndim == want.ndim \
                and value.shape[0] > want.shape[0] and value.shape[1:] == want.shape[1:]:  # fmt: skip
            mapped[key] = value[-want.shape[0] :]  # the last frame's outputs (a stage that no longer grows time)
    problems = layout_mismatch(mapped, expected, 3)
    if problems:
        raise ModelLoadError(
            f"{FLAG} {where}: not TAEHV's layout for Wan 2.1 latents at widths encoder {TAEHV_SHAPE['encoder']}, "
            f"decoder {'/'.join(map(str, TAEHV_SHAPE['decoder']))} (the {HUB_DEFAULT} file {HUB_DEFAULT_FILE}): "
            f"keys {problems}"
        )
    return mapped


def load_taehv(source: str) -> TinyVideoAutoencoder:
    """A `TinyVideoAutoencoder` of TAEHV's widths (`TAEHV_SHAPE`) holding the weights of `source`
    (a file or a hub file, `locate`), every tensor checked (`to_ours`); on the CPU in float32."""
    path = locate(source)
    where = source if Path(source).expanduser() == path else f"{source} ({path})"
    ae = TinyVideoAutoencoder(**TAEHV_SHAPE)
    ours = to_ours(read_state(path), ae, where)
    ae.load_state_dict({k: v.to(torch.float32) for k, v in ours.items()}, strict=True)
    log.info("video autoencoder: TAEHV's weights from %s (%d tensors)", where, len(ours))
    return ae
