"""The engine cache: compiled artifacts (ONNX files, OpenVINO and TensorRT engines) keyed by all that shapes them.

Layout under `settings.engines_dir`, one readable folder per model and one folder per artifact:

    engines/stabilityai-sd-turbo/unet-512x512-fp16-3f2a9c1d0b7e4a12/
        model.onnx        (+ model.onnx.data: weights over 2 GB live beside the graph)
        key.json          (the key's fields: what this artifact was built from)

An artifact is a folder, not a file, because an ONNX graph and its external weights must appear
together: the folder is built under a temporary name and renamed into place, so a reader sees a
complete artifact or none, and two processes building the same key never corrupt each other.

Faults end cleanly:

* a build killed mid-way (SIGKILL, a crash) leaves its staging folder `.<artifact>-XXXX`; each
  records its builder (`.owner`: pid and host), and the first build of a process sweeps those
  whose builder is gone (and those with no owner, older than `STALE_STAGING_S`);
* `files.json` records the size of the built file: a file that no longer has it (truncated by a
  full disk or a copy stopped half way) is rebuilt, with a warning naming it; a folder whose
  `key.json` does not match its key is named with the command that clears it;
* a write that fails for space (ENOSPC, EDQUOT) names the file, the folder and `--engines-dir`;
* `stop_builds()` (SIGTERM while a server starts) makes the next build raise `BuildStopped`: the
  network being built finishes, the artifacts that finished stay, nothing else starts.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from livediff.errors import LivediffError

log = logging.getLogger(__name__)

COMPONENTS = ("vae_encoder", "unet", "vae_decoder")
"""The three networks of the loop, in the order a frame meets them."""
CONTROLNET = "controlnet"
"""A ControlNet (`livediff.backends.control_residuals.ControlNetResiduals`): built when a stream first names it."""
DEPTH = "depth"
"""The depth estimator of the `depth` control image (`livediff.backends.modules.DepthNetwork`): built on first use."""
KNOWN_COMPONENTS = (*COMPONENTS, CONTROLNET, DEPTH)
SIDECAR = "key.json"
FILES = "files.json"
"""Beside `key.json`: the built file's size in bytes, `{filename: size}` (checked on every lookup)."""
OWNER = ".owner"
"""In a staging folder: `{"pid": ..., "host": ...}` of the process building it."""
STALE_STAGING_S = 3600.0
"""A staging folder with no owner record, untouched this long, is from a build that died."""
FLAG = "--engines-dir"

swept_roots: set[Path] = set()
"""Engine folders swept of dead builds' staging folders by this process (once each)."""
_stopping = threading.Event()


class BuildStopped(LivediffError):
    """A build was not started because the process is stopping (`stop_builds`)."""


def stop_builds() -> None:
    """From now on, `get_or_build` builds nothing (the build running now finishes): for SIGTERM."""
    _stopping.set()


def resume_builds() -> None:
    """Undo `stop_builds` (tests; a process that stops does not resume)."""
    _stopping.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_staging(root: Path) -> list[Path]:
    """Remove the staging folders under `root` (`<model>/.<artifact>-XXXX`) whose builder is gone: a
    process of this host that no longer runs, or no owner record and untouched `STALE_STAGING_S`.
    Returns the folders removed."""
    removed = []
    host = os.uname().nodename
    for folder in root.glob("*/.*-*"):
        if not folder.is_dir():
            continue
        try:
            owner = json.loads((folder / OWNER).read_text())
            dead = owner.get("host") == host and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):  # no owner record (or a torn one)
            try:
                dead = time.time() - folder.stat().st_mtime > STALE_STAGING_S
            except OSError:
                continue
        if dead:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d staging folder(s) of builds that died: %s", len(removed), ", ".join(map(str, removed)))
    return removed


_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class EngineKey:
    """Everything an artifact depends on; any change names a different artifact."""

    model: str
    """The model as the user named it (hub id, local folder, built-in name); for a ControlNet or a
    depth estimator, that network."""
    revision: str
    """Hub commit, `builtin-vN`, or a local folder's fingerprint: new weights, new artifact."""
    component: str
    """One of `KNOWN_COMPONENTS`."""
    height: int
    width: int
    batch: str
    """`dynamic` (one ONNX file for every batch size) or a TensorRT profile `min-opt-max`."""
    precision: str
    """Tensor dtype of the artifact's inputs and weights: `fp32`, `fp16`, `bf16`."""
    runtime: str
    """Whatever produced it, with versions: `onnx-opset18-torch2.13.0-diffusers0.42.0`, `tensorrt-10.9.0`."""
    device: str
    """GPU compute capability (`sm89`) or `cpu`: TensorRT engines only run on the GPU they were built for."""
    extras: str = ""
    """The UNet's optional extra inputs (`UNetExtras.tag`, e.g. `bank-v1`); empty for the plain graph,
    and then left out of the fields, so that plain artifacts keep the names they had before."""

    def __post_init__(self) -> None:
        if self.component not in KNOWN_COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(KNOWN_COMPONENTS)}, got {self.component!r}")
        if self.extras and self.component != "unet":
            raise ValueError(f"only the unet takes extra inputs, not the {self.component}")

    def fields(self) -> dict[str, str | int]:
        fields = dataclasses.asdict(self)
        if not self.extras:
            del fields["extras"]
        return fields

    @property
    def digest(self) -> str:
        """16 hex digits of SHA-256 over the fields: stable across runs, machines and Python versions."""
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        component = f"{self.component}+{self.extras}" if self.extras else self.component
        return f"{component}-{self.height}x{self.width}-{self.precision}-{self.digest}"


@dataclass(frozen=True)
class Artifact:
    path: Path
    """The artifact's main file (`model.onnx`, `model.plan`)."""
    built: bool
    """True when this call built it, False when an earlier build was reused."""


def slugify(ref: str) -> str:
    """A folder name for a model reference: `stabilityai/sd-turbo` -> `stabilityai-sd-turbo`."""
    slug = re.sub(r"[^a-z0-9._]+", "-", ref.lower()).strip("-.")
    return slug[-80:].strip("-.") or "model"


def precision_tag(dtype: torch.dtype) -> str:
    try:
        return _PRECISIONS[dtype]
    except KeyError:
        raise ValueError(f"no precision tag for {dtype}") from None


def device_tag(device: torch.device) -> str:
    """`cpu`, or the CUDA device's compute capability (`sm89`)."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def damaged(path: Path, exc: BaseException) -> BaseException:
    """What to raise when a runtime cannot load the artifact file `path`: for a committed artifact
    (a folder with `key.json`), a `LivediffError` naming the file, `--engines-dir` and the `rm -rf`
    that clears it (it is then rebuilt at the next start); else `exc` itself (a build's own file)."""
    folder = path.parent
    if not (folder / SIDECAR).is_file():
        return exc
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return LivediffError(
        f"cannot load the engine {path} ({reason}): it is damaged, or was built by another runtime "
        f"version; clear it with: rm -rf {folder} (under {FLAG} {folder.parent.parent}), and it is "
        "rebuilt at the next start"
    )


class EngineCache:
    """Artifacts in `root`, looked up by key; each is built once and reused after."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, key: EngineKey) -> Path:
        return self.root / slugify(key.model) / key.name

    def lookup(self, key: EngineKey, filename: str) -> Path | None:
        """The artifact's file when it was built before, else None."""
        folder = self.folder(key)
        path = folder / filename
        if not path.is_file():
            return None
        try:
            stored = json.loads((folder / SIDECAR).read_text())
        except (OSError, ValueError):
            stored = None
        if stored != key.fields():
            raise LivediffError(
                f"engine cache entry {folder} does not match its key (a hash collision, or an edited or "
                f"damaged folder under {FLAG} {self.root}); clear it with: rm -rf {folder}"
            )
        try:
            sizes = json.loads((folder / FILES).read_text())
        except (OSError, ValueError):  # built before sizes were recorded
            return path
        size = path.stat().st_size
        if isinstance(sizes, dict) and sizes.get(filename) not in (None, size):
            log.warning(
                "engine %s is %d bytes, %s when built (truncated or damaged): rebuilding it (%s %s)",
                path,
                size,
                sizes.get(filename),
                FLAG,
                self.root,
            )
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return path

    def get_or_build(self, key: EngineKey, filename: str, build: Callable[[Path], None]) -> Artifact:
        """The cached artifact, or a new one: `build(path)` writes `path` (and any files beside it).

        `build` writes into a private staging folder; only a build that returns (its checks passed)
        is renamed into place. When another process got there first, its artifact is kept.
        """
        found = self.lookup(key, filename)
        if found is not None:
            return Artifact(found, built=False)
        if _stopping.is_set():
            raise BuildStopped(f"stopping: {key.name} was not built")
        root = self.root.resolve()
        if root not in swept_roots:
            swept_roots.add(root)
            sweep_staging(root)
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key.name}-", dir=folder.parent))
        try:
            try:
                (staging / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
                build(staging / filename)
                if not (staging / filename).is_file():
                    raise RuntimeError(f"building {key.name} wrote no {filename}")
                (staging / SIDECAR).write_text(json.dumps(key.fields(), indent=2, sort_keys=True) + "\n")
                (staging / FILES).write_text(json.dumps({filename: (staging / filename).stat().st_size}) + "\n")
                (staging / OWNER).unlink()
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise LivediffError(
                    f"no space left on the device writing {filename} of {key.name} in {folder.parent} "
                    f"({FLAG} {self.root}): free space there, or point {FLAG} at a disk with room"
                ) from exc
            try:
                staging.rename(folder)
            except OSError:  # another process committed the same key first: keep theirs
                if self.lookup(key, filename) is None:
                    raise
                return Artifact(folder / filename, built=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Artifact(folder / filename, built=True)
