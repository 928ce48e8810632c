"""Single-file checkpoints: one `.safetensors` file holding a whole Stable Diffusion model in the
original (LDM) layout, as community models are shared (`model.diffusion_model.*` for the UNet,
`cond_stage_model.*` for the text encoder, `first_stage_model.*` for the VAE).

Steps, as `load_single_file` runs them:
1. check the file without reading its weights: it exists, it is a `.safetensors` file (a pickled
   `.ckpt` can run code when read, so it is refused), it holds an SD UNet, and diffusers' own
   model-type inference (`infer_diffusers_model_type`, run on the tensors' shapes) calls it SD 1.x
   (`v1`) or SD 2.x (`v2`: SD 2.1, SD-Turbo);
2. find the diffusers config that describes it: `--model-config` (a diffusers folder or hub id),
   else the family's (`DEFAULT_CONFIGS`); only its config and tokenizer files are fetched;
3. convert and load the UNet and text encoder with diffusers' `StableDiffusionPipeline.from_single_file`
   (the VAE too with `--vae full`; with `taesd` or another VAE that one is loaded instead).

Each failure is one `ModelLoadError` line naming `--model`, the file and why.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from livediff.errors import ModelLoadError
from livediff.models.hub import HubKind, file_revision, fingerprint, first_line, snapshot

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
"""What a `--model` that names one file ends with; only `.safetensors` (and `.sft`) is read."""
UNET_PREFIX = "model.diffusion_model."
DEFAULT_CONFIGS = {"v1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "v2": "stabilityai/sd-turbo"}
"""The diffusers config of each family diffusers' inference names. SD 2.x files default to SD-Turbo's
(512 px, epsilon prediction, trailing timesteps); a 768-px v-prediction SD 2.1 file needs
`--model-config stabilityai/stable-diffusion-2-1`."""
FAMILIES = {"v1": "SD 1.x", "v2": "SD 2.x"}
CONFIG = HubKind("model config", (), "give --model-config a local diffusers folder of the same family")


def is_single_file(ref: str) -> bool:
    """Whether `--model ref` names one checkpoint file (by its suffix), not a folder, hub id or built-in."""
    return Path(ref).suffix.lower() in SUFFIXES


def checkpoint_family(path: Path) -> str:
    """`v1` or `v2` for an SD single file at `path`, read from its header and tensor shapes only.

    `ModelLoadError` (one line) for a file that is missing, not safetensors, or not an SD 1.x/2.x model.
    """
    from safetensors import SafetensorError, safe_open

    where = f"--model {path}"
    if not path.is_file():
        raise ModelLoadError(f"{where}: no such file")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelLoadError(
            f"{where}: only .safetensors single files are read (a {path.suffix} is a pickle, which can run code "
            "when loaded); convert it to .safetensors (causal Wan weights, such as StreamDiffusionV2's model.pt, "
            "go in --video-weights with a Wan 2.1 base as --model)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = _Shapes(handle)
            if not any(key.startswith(UNET_PREFIX) for key in shapes):
                if any("lora" in key for key in shapes):
                    raise ModelLoadError(f"{where} is a LoRA, not a model: load it with --lora NAME={path}")
                from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

                if any(key.endswith(name) for key in shapes for name in CHECKPOINT_KEY_NAMES["wan"]):
                    raise ModelLoadError(f"{where} holds Wan transformer weights: give them as --video-weights "
                                         f"{path} with a Wan 2.1 T2V base as --model "
                                         "(Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")  # fmt: skip
                raise ModelLoadError(
                    f"{where} holds no Stable Diffusion UNet (no {UNET_PREFIX}* tensors); single files of "
                    f"{' and '.join(FAMILIES.values())} (SD-Turbo) models are read"
                )
            from diffusers.loaders.single_file_utils import infer_diffusers_model_type

            family = str(infer_diffusers_model_type(shapes))
    except SafetensorError as exc:
        raise ModelLoadError(f"{where} is not a safetensors file ({first_line(exc)})") from exc
    except (KeyError, AttributeError, IndexError) as exc:
        raise ModelLoadError(f"{where}: cannot tell which model it is ({type(exc).__name__}: {exc})") from exc
    if family not in FAMILIES:
        raise ModelLoadError(
            f"{where} is a {family!r} checkpoint (diffusers' name for it); single files of "
            f"{' and '.join(FAMILIES.values())} (SD-Turbo) models are read"
        )
    return family


@dataclass(frozen=True)
class SingleFile:
    """A checked single-file checkpoint and the diffusers config that describes it (steps 1-2)."""

    path: Path
    family: str
    """`v1` or `v2` (diffusers' names)."""
    config: str
    """What `--model-config` named, or the family's default."""
    config_dir: Path
    """Its local folder."""

    @property
    def revision(self) -> str:
        """The file by name, size and mtime (hashing gigabytes per start is too slow) and its config's fingerprint."""
        return file_revision(self.path, "file", fingerprint(self.config_dir))


def locate_single_file(ref: str, config: str) -> SingleFile:
    """Steps 1-2 for `--model ref` with `--model-config config` (empty: the family's, `DEFAULT_CONFIGS`)."""
    path = Path(ref).expanduser()
    family = checkpoint_family(path)
    source = config or DEFAULT_CONFIGS[family]
    return SingleFile(path, family, source, _config_dir(source, path, family))


def load_single_file(checkpoint: SingleFile, dtype: torch.dtype, vae: torch.nn.Module | None) -> Any:
    """Step 3: diffusers' `StableDiffusionPipeline` of `checkpoint` on the host in `dtype` (its
    `unet`, `text_encoder`, `tokenizer`, `scheduler`, `vae`); `vae` replaces the file's own (None: the
    file's, converted). `ModelLoadError` in one line naming the file and why."""
    from diffusers import StableDiffusionPipeline

    path, family, source = checkpoint.path, checkpoint.family, checkpoint.config
    extra: dict[str, Any] = {} if vae is None else {"vae": vae}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(checkpoint.config_dir), torch_dtype=dtype, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - diffusers, safetensors and torch raise many kinds; one line names it
        raise ModelLoadError(
            f"--model {path} ({FAMILIES[family]}, config {source}) could not be loaded: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return pipe


def _config_dir(source: str, path: Path, family: str) -> Path:
    """The local folder of the diffusers config `source` (a folder, or a hub id's config files only)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
            raise ModelLoadError(f"--model-config {source}: not a diffusers model folder (no model_index.json, unet/)")
        return folder
    try:
        return snapshot(source, ["model_index.json", "*/*.json", "*/*.txt"], CONFIG)
    except ModelLoadError as exc:
        raise ModelLoadError(f"--model {path} ({FAMILIES[family]}) needs the diffusers config {source}: {exc}") from exc


class _Shapes(Mapping[str, Any]):
    """A safetensors file's tensors as their shapes only: what diffusers' model-type inference reads
    (`key in checkpoint`, `checkpoint[key].shape`), without reading gigabytes of weights."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.names = set(handle.keys())

    def __getitem__(self, key: str) -> SimpleNamespace:
        if key not in self.names:
            raise KeyError(key)
        return SimpleNamespace(shape=torch.Size(self.handle.get_slice(key).get_shape()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
