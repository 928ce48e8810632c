"""`--backend auto` on CUDA from measurements: the fastest fast-path variant that matched eager torch.

The GPU kit's `variants` steps (`python -m livediff.bench_variants`) time every variant (`torch`,
`cuda-graph`, `cuda-graph-compiled`, `cuda-graph-compiled-fp8`, `cuda-graph-fused-norm`) on one
GPU and check each one's frames against eager torch's (PSNR >= `PSNR_MATCH_DB`). Each run appends
what it measured to `<engines_dir>/backend-choice.json` (`record`), keyed by the GPU's name, the
torch version and the engine dtype; the kit copies `engines/` to its `$OUT`, so a deployment gets
the file with its compile cache (or copies it by hand).

`measured_choice` reads it when `auto` is resolved on CUDA: among the measurements of this GPU and
torch version (the newest first; one of the default float16 before others), the fastest variant at
batch 1 that matched (ties broken at the largest batch measured) and that can run here (float8
needs its GPU and torchao). No file, no measurement of this GPU and torch, or nothing that matched:
None, and `auto` takes `cuda-graph` (the measured default of 2026-11-30). Nothing is measured at
start-up: timing four variants, two of them compiled, would take minutes of every start.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from livediff.config import BACKENDS

log = logging.getLogger(__name__)

CHOICE_FILE = "backend-choice.json"
PSNR_MATCH_DB = 40.0
"""A variant matches eager torch when every output frame is within this PSNR of torch's (issue 26)."""
KEEP = 32
"""Measurements kept in the file (the oldest go)."""


@dataclass(frozen=True)
class Choice:
    """What `auto` picks from a measurement, and the sentence that says why."""

    variant: str
    why: str


def best_variant(rows: list[dict[str, Any]]) -> str | None:
    """The fastest variant at batch 1 (ties broken at the largest batch) among those that matched
    eager torch (and torch itself), from `bench_variants` rows (`variant`, `batches`, `parity`)."""
    eligible = [r for r in rows if r["variant"] == "torch" or (r.get("parity") or {}).get("matches")]
    eligible = [r for r in eligible if "1" in r.get("batches", {})]
    if not eligible:
        return None
    largest = max(eligible[0]["batches"], key=int)

    def key(r: dict[str, Any]) -> tuple[float, float]:
        return r["batches"]["1"]["ms_per_frame"], r["batches"].get(largest, r["batches"]["1"])["ms_per_frame"]

    return str(min(eligible, key=key)["variant"])


def measurement(report: dict[str, Any], gpu: str, torch_version: str) -> dict[str, Any]:
    """One entry of the choice file from a `bench_variants` report: per variant its ms per frame by
    batch size and whether it matched, and the best by `best_variant`."""
    variants = {
        r["variant"]: {
            "ms_per_frame": {b: v["ms_per_frame"] for b, v in r["batches"].items()},
            "matches": r["variant"] == "torch" or bool((r.get("parity") or {}).get("matches")),
            "psnr_db": (r.get("parity") or {}).get("psnr_db"),
        }
        for r in report["variants"]
    }
    return {
        "gpu": gpu, "torch": torch_version, "dtype": report["dtype"], "model": report["model"],
        "size": report["size"], "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "psnr_bound_db": PSNR_MATCH_DB, "variants": variants, "best": best_variant(report["variants"]),
    }  # fmt: skip


def record(engines_dir: Path, entry: dict[str, Any]) -> Path:
    """Append `entry` (`measurement`) to `<engines_dir>/backend-choice.json`; returns the file's path."""
    path = engines_dir / CHOICE_FILE
    entries = read(path)
    entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"measurements": entries[-KEEP:]}, indent=1))
    tmp.replace(path)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    """The measurements in a choice file; [] when it is missing or unreadable (said in the log)."""
    try:
        data = json.loads(path.read_text())
        entries = data["measurements"]
        if not isinstance(entries, list):
            raise TypeError("measurements is not a list")
        return [e for e in entries if isinstance(e, dict)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: not read (%s); --backend auto does without it", path, exc)
        return []


def pick(entries: list[dict[str, Any]], gpu: str, torch_version: str, runnable: Any = None) -> Choice | None:
    """The choice for `gpu` and `torch_version` from `entries` (see the module docstring);
    `runnable(variant) -> bool` says which variants can run here (None: all)."""
    mine = [(i, e) for i, e in enumerate(entries) if e.get("gpu") == gpu and e.get("torch") == torch_version]
    # float16 (the engine's default on CUDA) first, then the newest (later in the file when measured the same second)
    mine.sort(key=lambda ie: (ie[1].get("dtype") == "float16", str(ie[1].get("measured_at", "")), ie[0]), reverse=True)
    for _, entry in mine:
        rows = [
            {"variant": name, "batches": {b: {"ms_per_frame": ms} for b, ms in v.get("ms_per_frame", {}).items()},
             "parity": {"matches": bool(v.get("matches"))}}
            for name, v in entry.get("variants", {}).items()
            if name in BACKENDS and (runnable is None or runnable(name))  # `+autotune` rows are no backend
        ]  # fmt: skip
        best = best_variant(rows)
        if best is None:
            continue
        v = entry["variants"][best]
        psnr = v.get("psnr_db")
        return Choice(best, f"the fastest matching variant at batch 1 ({v['ms_per_frame'].get('1')} ms a frame"
                            f"{'' if psnr is None else f', PSNR {psnr} dB against eager torch'}) measured on {gpu}, "
                            f"{entry.get('dtype')}, {entry.get('size')}, {entry.get('measured_at')}")  # fmt: skip
    return None


def measured_choice(engines_dir: Path | None, device: torch.device) -> Choice | None:
    """`pick` over `<engines_dir>/backend-choice.json` for this CUDA device; None off CUDA, without
    the file, or without a measurement of this GPU and torch version."""
    if engines_dir is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    entries = read(engines_dir / CHOICE_FILE)
    if not entries:
        return None
    from livediff.backends.fp8 import fp8_unavailable

    def runnable(variant: str) -> bool:
        return variant != "cuda-graph-compiled-fp8" or fp8_unavailable(device) is None

    return pick(entries, torch.cuda.get_device_name(device), torch.__version__, runnable)
