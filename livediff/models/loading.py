"""Load the parts of a Stable-Diffusion-style model from a hub id, a local folder or a built-in name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import torch
from diffusers import AutoModel, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from livediff.errors import ModelLoadError
from livediff.models.builtin import BUILDER_VERSION, BUILDERS, builtin_dir

if TYPE_CHECKING:
    from livediff.models.controlnet import ControlNetParts
    from livediff.models.depth import DepthParts

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_TAESD = "madebyollin/taesd"
_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ModelParts:
    """What the engine needs from a model, on its device and in its dtype."""

    ref: str
    """The name the user gave (hub id, folder or built-in name)."""
    revision: str
    """Hub commit, `builtin-vN`, or a fingerprint of a local folder's files."""
    unet: UNet2DConditionModel
    vae: torch.nn.Module
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin
    vae_ref: str
    controlnet: ControlNetParts | None = None
    """Set on the copy of the parts that builds a ControlNet's graph (`with_controlnet`), else None."""
    depth: DepthParts | None = None
    """Set on the copy of the parts that builds the depth estimator's graph (`with_depth`), else None."""

    def with_controlnet(self, controlnet: ControlNetParts) -> ModelParts:
        """These parts with `controlnet`: what the backends export and key the `controlnet` component from."""
        return dataclasses.replace(self, controlnet=controlnet)

    def with_depth(self, depth: DepthParts) -> ModelParts:
        """These parts with `depth`: what the backends export and key the `depth` component from."""
        return dataclasses.replace(self, depth=depth)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def resolve_auto(ref: str, device: torch.device) -> str:
    """`auto` means the real default model on CUDA and `tiny` elsewhere."""
    if ref != "auto":
        return ref
    picked = DEFAULT_MODEL if device.type == "cuda" else "tiny"
    log.info("--model auto picked %s (device %s)", picked, device)
    return picked


def load_model(
    ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, vae: str = "taesd"
) -> ModelParts:
    """Load `ref` (hub id, local diffusers folder, `tiny`, `sd-turbo-random` or `auto`).

    `vae` is `taesd` (AutoencoderTiny: the model's own when it ships one, else madebyollin/taesd),
    `full` (the model's own VAE) or another id/folder.
    """
    device = torch.device(device)
    ref = resolve_auto(ref, device)
    folder, revision = _locate(ref)
    log.info("loading model %s (%s)", ref, revision)
    try:
        parts = ModelParts(
            ref=ref,
            revision=revision,
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            vae=_load_vae(folder, vae, dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            scheduler=_load_scheduler(folder),
            vae_ref=vae,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {ref!r} at {folder} could not be loaded: {exc}") from exc
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return parts


@dataclass(frozen=True)
class HubKind:
    """What a hub id names, for the messages about it: its noun, its built-ins and the way out."""

    noun: str
    builtins: tuple[str, ...]
    fallback: str
    """How to run without it, e.g. "run with `--model tiny` (built in, no download)"."""


MODEL = HubKind("model", tuple(BUILDERS), "run with `--model tiny` (built in, no download)")


def _how_to_get(ref: str, why: str, kind: HubKind = MODEL) -> str:
    """A one-line answer for a model that is not here: what was looked at, `why` it was not fetched, the way out."""
    return (
        f"{kind.noun} {ref!r} is not a built-in ({', '.join(kind.builtins)}), a local folder, nor in the "
        f"Hugging Face cache, and {why}. Download it with `hf download {ref}` (on a machine with internet, "
        f"then point HF_HOME at that cache), or {kind.fallback}."
    )


def _locate(ref: str) -> tuple[Path, str]:
    """The local folder holding `ref` and its revision, downloading hub models if needed."""
    if ref in BUILDERS:
        return builtin_dir(ref), f"builtin-v{BUILDER_VERSION}"
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no unet/ inside)")
        return path, _fingerprint(path)
    if path.suffix or ref.count("/") != 1:
        raise ModelLoadError(
            f"model {ref!r} is not a built-in ({', '.join(BUILDERS)}), an existing folder, nor a hub id "
            "(owner/name, e.g. stabilityai/sd-turbo); run with `--model tiny` (built in, no download)"
        )
    extensions = ("json", "txt", "safetensors")
    patterns = ["model_index.json"] + [f"{c}/*.{ext}" for c in (*_COMPONENTS, "vae") for ext in extensions]
    folder = _snapshot(ref, patterns)
    return folder, folder.name  # the hub cache stores snapshots under their commit hash


def _snapshot(repo_id: str, allow_patterns: list[str] | None = None, kind: HubKind = MODEL) -> Path:
    """The local snapshot of a hub repository: from the cache, else downloaded once; `ModelLoadError`
    saying why not and what to do (in `kind`'s words) when it cannot be had."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except HFValidationError as exc:
        raise ModelLoadError(f"{repo_id!r} is not a valid {kind.noun} id: {exc}") from exc
    except Exception:  # noqa: BLE001 - not in the cache, whatever the reason: try the hub
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(_how_to_get(repo_id, "HF_HUB_OFFLINE is set, so the hub was not asked", kind))
    log.info("%s is not in the Hugging Face cache: downloading it", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError as exc:
        why = "it is gated on the hub: accept its terms on huggingface.co, then `hf auth login`"
        raise ModelLoadError(_how_to_get(repo_id, why, kind)) from exc
    except RepositoryNotFoundError as exc:
        why = f"the hub has no such {kind.noun} (or it is private: `hf auth login` first)"
        raise ModelLoadError(_how_to_get(repo_id, why, kind)) from exc
    except Exception as exc:  # noqa: BLE001 - network, auth, disk: answered the same way, with the cause
        why = f"it could not be downloaded ({type(exc).__name__}: {_first_line(exc)})"
        raise ModelLoadError(_how_to_get(repo_id, why, kind)) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fingerprint(folder: Path) -> str:
    """Configs hashed by content, weights by name, size and mtime (hashing gigabytes per start is too slow)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        if file.suffix in (".json", ".txt"):
            digest.update(file.read_bytes())
        else:
            stat = file.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "sha256-" + digest.hexdigest()[:16]


def _load_vae(folder: Path, vae: str, dtype: torch.dtype) -> torch.nn.Module:
    own = folder / "vae" / "config.json"
    own_class = json.loads(own.read_text()).get("_class_name") if own.exists() else None
    if vae == "full" or (vae == "taesd" and own_class == "AutoencoderTiny"):
        if own_class is None:
            raise ModelLoadError(f"{folder} has no vae/ folder; use --vae taesd")
        return AutoModel.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype)
    source = DEFAULT_TAESD if vae == "taesd" else vae
    vae_folder = Path(source) if Path(source).is_dir() else _snapshot(source)
    return AutoModel.from_pretrained(str(vae_folder), torch_dtype=dtype)


def _load_scheduler(folder: Path) -> SchedulerMixin:
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)
