"""Hub ids and local folders of model files, shared by every loader (SD models, ControlNets, depth
and video models, adapters and weight files): a hub repository's local snapshot (from the Hugging
Face cache, else downloaded once) with one-line errors saying what to do, one file of a repository
(`owner/name:path/in/repo`), a weights file's content read safely, and a local folder's content
fingerprint."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livediff.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubKind:
    """What a hub id names, for the messages about it: its noun, its built-ins and the way out."""

    noun: str
    builtins: tuple[str, ...]
    fallback: str
    """How to run without it, e.g. "run with `--model tiny` (built in, no download)"."""


def how_to_get(ref: str, why: str, kind: HubKind, file: str = "") -> str:
    """A one-line answer for a model (or one `file` of a repository) that is not here: what was
    looked at, `why` it was not fetched, the way out."""
    builtin = f"a built-in ({', '.join(kind.builtins)}), " if kind.builtins else ""
    what = (
        f"{file} of {kind.noun} {ref!r} is not" if file else f"{kind.noun} {ref!r} is not {builtin}a local folder, nor"
    )
    download = f"{ref} {file}" if file else ref
    return (
        f"{what} in the Hugging Face cache, and {why}. Download it with `hf download {download}` (on a machine "
        f"with internet, then point HF_HOME at that cache), or {kind.fallback}."
    )


def snapshot(repo_id: str, allow_patterns: list[str] | None, kind: HubKind, file: str = "") -> Path:
    """The local snapshot of a hub repository: from the cache, else downloaded once; `ModelLoadError`
    saying why not and what to do (in `kind`'s words) when it cannot be had. `file`: the one file
    wanted of it (`hub_file`), for the messages."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True))
    except HFValidationError as exc:
        raise ModelLoadError(f"{repo_id!r} is not a valid {kind.noun} id: {exc}") from exc
    except Exception:  # noqa: BLE001 - not in the cache, whatever the reason: try the hub
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(how_to_get(repo_id, "HF_HUB_OFFLINE is set, so the hub was not asked", kind, file))
    log.info("%s is not in the Hugging Face cache: downloading it", f"{file} of {repo_id}" if file else repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError as exc:
        why = "it is gated on the hub: accept its terms on huggingface.co, then `hf auth login`"
        raise ModelLoadError(how_to_get(repo_id, why, kind, file)) from exc
    except RepositoryNotFoundError as exc:
        why = f"the hub has no such {kind.noun} (or it is private: `hf auth login` first)"
        raise ModelLoadError(how_to_get(repo_id, why, kind, file)) from exc
    except Exception as exc:  # noqa: BLE001 - network, auth, disk: answered the same way, with the cause
        why = f"it could not be downloaded ({type(exc).__name__}: {first_line(exc)})"
        raise ModelLoadError(how_to_get(repo_id, why, kind, file)) from exc


def split_hub_file(source: str) -> tuple[str, str] | None:
    """`owner/name:path/in/repo` -> (`owner/name`, `path/in/repo`; "" when only `owner/name` is
    written); None when `source` is not written so."""
    repo, _, file = source.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        return None
    return repo, file


def hub_spelling(source: str) -> str:
    """For a file not found: "; as a hub file: owner/name:path" when `source` reads like a hub file
    written with a slash (`owner/name/path/file.pt`), else ""."""
    parts = source.split("/")
    if ":" in source or source.startswith(("/", ".", "~")) or len(parts) < 3 or not all(parts):
        return ""
    return f"; as a hub file: {parts[0]}/{parts[1]}:{'/'.join(parts[2:])}"


def hub_file(repo_id: str, file: str, kind: HubKind, also: tuple[str, ...] = ()) -> Path:
    """`file` of a hub repository (with the files matching the patterns in `also`): from the cache,
    else fetched alone; `ModelLoadError` as `snapshot`'s, or when the repository has no such file."""
    found = snapshot(repo_id, [file, *also], kind, file) / file
    if not found.is_file():  # a cached snapshot may hold other files of the repository only
        raise ModelLoadError(
            f"{kind.noun} {repo_id} has no {file} (or only its other files are in the Hugging Face cache: "
            f"`hf download {repo_id} {file}`)"
        )
    return found


def read_weights(path: Path) -> Any:
    """What a weights file holds, on the CPU: a `.safetensors` (or `.sft`) file's tensors by name, else
    a pickle read by `torch.load(weights_only=True)`: tensors and plain containers only, no code runs
    (memory-mapped when in torch's zip format, so a large file is not held twice). Raises the readers'
    own errors (callers name the file and flag in one line)."""
    import torch

    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def layout_mismatch(found: Mapping[str, Any], expected: Mapping[str, Any], shown: int = 4) -> str:
    """How a state dict `found` differs from a model's `expected` one (tensors by name; `expected`'s
    may be on the meta device), for a one-line error: "N missing (a, b, ...); N unexpected (...); N of
    another shape (name (found shape) for (expected shape), ...)", each part only when there is one;
    "" when every name is there at its shape."""

    def few(names: list[str]) -> str:
        return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if misshapen:
        described = [f"{k} {tuple(found[k].shape)} for {tuple(expected[k].shape)}" for k in misshapen]
        parts.append(f"{len(misshapen)} of another shape ({few(described)})")
    return "; ".join(parts)


def file_revision(path: Path, prefix: str, extra: str = "") -> str:
    """A large file's revision by name, size and mtime (hashing gigabytes per start is too slow), with
    `extra` (e.g. its config's `fingerprint`): "{prefix}-{16 hex digits}"."""
    stat = path.stat()
    text = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}" + (f":{extra}" if extra else "")
    return f"{prefix}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def fingerprint(folder: Path) -> str:
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
