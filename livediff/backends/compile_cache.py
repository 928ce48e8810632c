"""torch.compile's cache in the engine cache: a restart or a second replica loads the kernels a first
run compiled instead of compiling them again (inductor's FX graphs, autotuning results, Triton kernels).

torch keeps what it compiled in its own caches; `torch.compiler.save_cache_artifacts()` hands them
over as one blob and `torch.compiler.load_cache_artifacts(blob)` fills the caches of a fresh process
before anything compiles. The blob lives in `engines/` beside the other engines, one folder per key:

    engines/stabilityai-sd-turbo/inductor-512x512-fp16-<digest>/artifacts.bin  (+ key.json)

keyed by all that shapes the kernels: the model and its revision, the frame size, the dtype, the
backend variant and its options, the UNet's extra inputs, torch's and Triton's versions and the
device's name (a kernel autotuned on one GPU is not the best on another). A blob is written whole
under a temporary name and renamed into place, so a reader sees a complete blob or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from livediff.backends.cache import SIDECAR, precision_tag, slugify

log = logging.getLogger(__name__)

FILENAME = "artifacts.bin"


def triton_version() -> str:
    """Triton's version, or `none` (no Triton: the CPU, where inductor writes C++)."""
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "none"


def device_name(device: torch.device) -> str:
    """The GPU's name (`NVIDIA H100 80GB HBM3`), or the device type off CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass(frozen=True)
class CompileKey:
    """Everything compiled kernels depend on; any change names another blob."""

    model: str
    revision: str
    height: int
    width: int
    precision: str
    variant: str
    """The backend and its inductor options (`CompileOptions.tag`)."""
    extras: str
    """The UNet's extra inputs (`UNetExtras.tag`); empty for the plain UNet."""
    torch_version: str
    triton_version: str
    device: str

    @classmethod
    def of(cls, model: str, revision: str, height: int, width: int, dtype: torch.dtype, device: torch.device,
           variant: str, extras: str = "") -> CompileKey:  # fmt: skip
        return cls(model, revision, height, width, precision_tag(dtype), variant, extras, torch.__version__,
                   triton_version(), device_name(device))  # fmt: skip

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"inductor-{self.height}x{self.width}-{self.precision}-{self.digest}"


class CompileCache:
    """The blob of one key in `root` (`EngineSettings.engines_dir`): loaded before compiling, saved after."""

    def __init__(self, root: Path, key: CompileKey) -> None:
        self.key = key
        self.folder = Path(root) / slugify(key.model) / key.name
        self.path = self.folder / FILENAME
        self.loaded = False
        """Whether `load` found a blob and handed it to torch."""

    def load(self) -> bool:
        """Hand a saved blob to torch (before anything compiles); True when there was one."""
        if not self.path.is_file():
            log.info("compile cache: none yet for %s (the first warm-up compiles: minutes on a GPU)", self.key.name)
            return False
        stored = json.loads((self.folder / SIDECAR).read_text())
        if stored != asdict(self.key):
            raise RuntimeError(f"compile cache {self.folder} does not match its key (an edited folder); delete it")
        start = time.perf_counter()
        torch.compiler.load_cache_artifacts(self.path.read_bytes())
        self.loaded = True
        log.info("compile cache: loaded %s (%.1f MB) in %.1f s", self.path, self.path.stat().st_size / 1e6,
                 time.perf_counter() - start)  # fmt: skip
        return True

    def save(self) -> Path | None:
        """Write what this process compiled so far (replacing an older blob); the path, or None when
        torch had nothing to save."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        blob, _info = saved
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / SIDECAR).write_text(json.dumps(asdict(self.key), indent=2, sort_keys=True) + "\n")
        handle, staging = tempfile.mkstemp(prefix=f".{FILENAME}-", dir=self.folder)
        with os.fdopen(handle, "wb") as out:
            out.write(blob)
        os.replace(staging, self.path)
        log.info("compile cache: saved %s (%.1f MB)", self.path, len(blob) / 1e6)
        return self.path
