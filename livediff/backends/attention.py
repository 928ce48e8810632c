"""Which scaled-dot-product-attention kernel a backend's networks use: measured at warm-up, per shape.

torch's `scaled_dot_product_attention` has several kernels (FlashAttention-2, cuDNN's fused
attention, memory-efficient attention after Rabe & Staats / xFormers, and the plain math one) and
picks one by a fixed order and what each supports. Which is fastest depends on the shape (tokens,
heads, head size), the dtype and the GPU. Here, at warm-up:

1. `attention_calls` runs a network once and lists its attention calls: each shape and how often
   it comes (a `TorchFunctionMode` sees every call; nothing is patched);
2. `measure` runs each shape under each kernel that is available (`sdpa_kernel`), keeps those
   whose output matches the math kernel's (largest difference within `MATCH_ATOL` in float16,
   scaled for other dtypes) and times them;
3. `choose` orders the kernels by their time summed over the calls (each call's shape timed once,
   weighted by how often it comes); a kernel that cannot take some shape is passed over there and
   the next in the order runs that call, as torch does. `SdpaChoice.context()` applies the order
   (`sdpa_kernel(order, set_priority=True)`) around a network call, and `describe()` is what the
   engine's description records.

On the CPU only the math kernel and (where built) flash's CPU kernel exist; the same code chooses
among what runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""The kernels measured, by the name the description uses."""
MATCH_ATOL = 2e-2
"""Largest absolute difference from the math kernel's output (inputs ~N(0, 1)) for a kernel to count
as matching; half-precision kernels accumulate in float32 but round their output."""

Shape = tuple[tuple[int, ...], tuple[int, ...], str, bool]
"""(query shape, key shape, dtype name, whether a mask is given) of one attention call."""


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[Shape] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls[(tuple(q.shape), tuple(k.shape), str(q.dtype).removeprefix("torch."), mask is not None)] += 1
        return func(*args, **kwargs)


def attention_calls(run: Callable[[], Any]) -> Counter[Shape]:
    """Each attention shape `run()` (one network call) meets, with how often it meets it."""
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        run()
    return recorder.calls


@dataclass
class SdpaChoice:
    """The measured kernels and the order the networks run attention in."""

    order: list[str] = field(default_factory=list)
    """Kernel names, fastest first; empty: torch's own order."""
    ms: dict[str, float] = field(default_factory=dict)
    """Per kernel: ms summed over the calls it takes (only kernels that took every shape)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Per kernel that took some shape not: why (unsupported, or its output did not match)."""

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Attention within runs in `order` (each call by the first kernel that takes it)."""
        if not self.order:
            yield
            return
        with sdpa_kernel([KERNELS[name] for name in self.order], set_priority=True):
            yield

    def describe(self) -> dict[str, Any]:
        return {"order": self.order, "ms": {k: round(v, 3) for k, v in self.ms.items()}, "refused": self.refused}


def _inputs(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q_shape, k_shape, dtype_name, masked = shape
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(q_shape, generator=generator).to(device, dtype)
    k = torch.randn(k_shape, generator=generator).to(device, dtype)
    v = torch.randn(k_shape, generator=generator).to(device, dtype)
    mask = torch.zeros((*q_shape[:-1], k_shape[-2]), device=device, dtype=dtype) if masked else None
    return q, k, v, mask


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) * 1000.0 / repeats


def measure(calls: Counter[Shape], device: torch.device, kernels: list[str] | None = None,
            repeats: int = 5) -> dict[str, dict[Shape, float | str]]:  # fmt: skip
    """Per kernel, per shape: ms per call, or why the kernel was not usable there (a string)."""
    results: dict[str, dict[Shape, float | str]] = {}
    with torch.inference_mode():
        for shape in calls:
            q, k, v, mask = _inputs(shape, device)
            with sdpa_kernel(SDPBackend.MATH):
                reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()
            tolerance = MATCH_ATOL * (1.0 if q.dtype in (torch.float16, torch.float32) else 4.0)
            for name in kernels or list(KERNELS):
                with sdpa_kernel(KERNELS[name]):
                    try:
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    except RuntimeError as exc:  # this kernel does not take this shape, dtype or device
                        results.setdefault(name, {})[shape] = f"unsupported: {str(exc).splitlines()[0][:120]}"
                        continue
                    diff = float((out.float() - reference).abs().max())
                    if diff > tolerance:
                        results.setdefault(name, {})[shape] = f"differs from math by {diff:.3g}"
                        continue

                    def call(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v,
                             mask: torch.Tensor | None = mask) -> torch.Tensor:  # fmt: skip
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                    results.setdefault(name, {})[shape] = _time_ms(call, device, repeats)
    return results


def choose(calls: Counter[Shape], measured: dict[str, dict[Shape, float | str]]) -> SdpaChoice:
    """The kernels ordered by time summed over `calls` (each shape's time x its count); a kernel
    that refused a shape is ordered by the shapes it took, after every kernel that took them all."""
    choice = SdpaChoice()
    complete: list[tuple[float, str]] = []
    partial: list[tuple[float, str]] = []
    for name, per_shape in measured.items():
        took = {shape: ms for shape, ms in per_shape.items() if isinstance(ms, float)}
        if not took:
            choice.refused[name] = str(next(iter(per_shape.values()), "not measured"))
            continue
        total = sum(ms * calls[shape] for shape, ms in took.items())
        if len(took) == len(calls):
            choice.ms[name] = total
            complete.append((total, name))
        else:
            refusals = [reason for reason in per_shape.values() if isinstance(reason, str)]
            choice.refused[name] = f"{len(refusals)} of {len(calls)} shapes: {refusals[0]}"
            partial.append((total, name))
    choice.order = [name for _, name in sorted(complete)] + [name for _, name in sorted(partial)]
    return choice


def choose_for(run: Callable[[], Any], device: torch.device, kernels: list[str] | None = None) -> SdpaChoice:
    """`attention_calls`, `measure` and `choose` in one: the order for the network `run()` calls."""
    calls = attention_calls(run)
    if not calls:
        return SdpaChoice()
    choice = choose(calls, measure(calls, device, kernels))
    log.info("attention: %d shapes, %d calls; kernels fastest first: %s (ms per step: %s)", len(calls),
             sum(calls.values()), ", ".join(choice.order) or "torch's order",
             ", ".join(f"{k} {v:.2f}" for k, v in choice.ms.items()))  # fmt: skip
    return choice
