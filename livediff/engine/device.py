"""Device and dtype choice from the settings' `auto` values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from livediff.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available on this host")
    return device


def resolve_dtype(name: str, device: torch.device, backend: str = "torch") -> torch.dtype:
    """`auto`: float16 on CUDA; on the CPU bfloat16 for OpenVINO where the CPU has bf16 instructions
    (twice float32's speed there), float32 otherwise."""
    if name != "auto":
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cuda":
        return torch.float16
    if backend == "openvino":
        from livediff.backends.openvino_backend import cpu_has_bf16, require_openvino

        if cpu_has_bf16(require_openvino(device)):
            return torch.bfloat16
    return torch.float32


def resolve_video_dtype(name: str, device: torch.device) -> torch.dtype:
    """A video model's dtype. `auto`: bfloat16 on CUDA (what Wan is trained and run in) and on a CPU
    with native bf16 instructions (`cpu_has_native_bf16`: there `tiny-video`'s chunk takes about half
    float32's time, docs/video-models.md), float32 on other CPUs (where bf16 is emulated, slower)."""
    if name != "auto":
        return resolve_dtype(name, device)
    return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU computes bfloat16 natively (the `avx512_bf16` or `amx_bf16` flag of
    `cpuinfo`); False where that file is missing (then nothing is assumed)."""
    try:
        with open(cpuinfo) as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` for the block, and back after (None: unchanged)."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
