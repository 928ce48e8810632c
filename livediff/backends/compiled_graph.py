"""`--backend cuda-graph-compiled`: inductor's kernels (`torch.compile`) inside the whole-step CUDA graphs.

`cuda-graph` removes the host's launch cost of a step but keeps eager torch's kernels: hundreds of
small ones (GroupNorm, SiLU, adds, layout copies) that a compiler fuses. Here the UNet, the VAE
halves, the UNet with extra inputs and the ControlNets are compiled by inductor (no dynamic shapes:
one compiled graph per input shape, i.e. per batch layout; channels-last on CUDA; `OPTIONS`), and
the compiled callables run inside the same per-layout recordings as `cuda-graph`'s
(`livediff.backends.cuda_graph`): a layout's first step runs eagerly, which is when inductor
compiles its shapes (progress lines say which network and shape, and how long), its second step
records the compiled kernels into CUDA graphs, and later steps replay them. Inductor's own CUDA
graphs are off (`triton.cudagraphs`): the step's graphs hold everything.

What inductor compiled is kept in the engine cache (`livediff.backends.compile_cache`), loaded
before the first compile and saved after warm-up: a restart or a second replica on the same GPU,
torch and Triton compiles from cache in seconds instead of minutes.

Attention: at construction the UNet's attention shapes are measured under each SDPA kernel
(`livediff.backends.attention`) and the fastest that matches runs (its order recorded in
`describe()`, which the engine's description shows).

The recording bookkeeping is `StepGraphs`, the same as `cuda-graph`'s: with another `capture` (the
tests' host replay) the whole backend, compile and recording, runs on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from livediff.backends.attention import SdpaChoice, choose_for
from livediff.backends.compile_cache import CompileCache, CompileKey
from livediff.backends.cuda_graph import Capture, CudaGraphBackend
from livediff.backends.multi_lora import MultiLoRA
from livediff.backends.unet_extras import NO_EXTRAS, UNetExtras
from livediff.models import ModelParts

log = logging.getLogger(__name__)

NAME = "cuda-graph-compiled"

OPTIONS_CUDA: dict[str, Any] = {
    "triton.cudagraphs": False,  # the step's own CUDA graphs hold the kernels
    "conv_1x1_as_mm": True,  # a diffusion UNet's many 1x1 convolutions as matrix products
    "epilogue_fusion": True,
    "shape_padding": True,
}
"""inductor's options on CUDA by default: compiles in a minute or two for SD-Turbo's UNet."""
OPTIONS_AUTOTUNE: dict[str, Any] = {
    "max_autotune": True,  # autotuned GEMM and convolution templates (max-autotune-no-cudagraphs with the above)
    "coordinate_descent_tuning": True,  # then each Triton kernel's block sizes tuned further
}
"""Added for the autotuned variant (`bench_variants --autotune`): minutes more to compile, measured
by the GPU kit before any default takes them."""
OPTIONS_CPU: dict[str, Any] = {}
"""On the CPU inductor's defaults (autotuning there costs minutes and the CPU variant is for tests)."""


def inductor_options(device: torch.device) -> dict[str, Any]:
    return dict(OPTIONS_CUDA if device.type == "cuda" else OPTIONS_CPU)


def options_tag(options: Mapping[str, Any]) -> str:
    """The options as the compile cache's key records them."""
    return NAME + "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


class _Announced:
    """A compiled callable that says when a call meets a shape not compiled before, and how long it took."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.seen: set[tuple[Any, ...]] = set()
        self.compile_s: dict[str, float] = {}
        """Seconds of each first call (compile and one run), by the shapes' text."""

    def __call__(self, *args: Any) -> Any:
        signature = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
        if signature in self.seen:
            return self.fn(*args)
        shapes = " ".join(str(list(s)) for s in signature if isinstance(s, tuple))
        log.info("torch.compile: compiling %s for %s ...", self.name, shapes)
        start = time.perf_counter()
        out = self.fn(*args)
        self.seen.add(signature)
        self.compile_s[shapes] = time.perf_counter() - start
        log.info("torch.compile: %s for %s ready in %.1f s", self.name, shapes, self.compile_s[shapes])
        return out


def compile_module(module: Callable[..., Any], name: str, device: torch.device,
                   options: Mapping[str, Any] | None = None) -> _Announced:  # fmt: skip
    """`module` through inductor with no dynamic shapes and `options` (default `inductor_options`)."""
    opts = dict(inductor_options(device) if options is None else options)
    compiled = torch.compile(module, backend="inductor", dynamic=False, fullgraph=False, options=opts or None)
    return _Announced(name, compiled)


class CompiledGraphBackend(CudaGraphBackend):
    """`cuda-graph` with inductor-compiled networks inside the recorded stages."""

    def __init__(self, parts: ModelParts, capture: Capture | None = None, max_layouts: int = 16,
                 extras: UNetExtras = NO_EXTRAS, engines_dir: Path | None = None,
                 options: Mapping[str, Any] | None = None, measure_attention: bool = True,
                 size: tuple[int, int] = (512, 512), tag: str = "") -> None:  # fmt: skip
        """`engines_dir`: where the compile cache lives (None: no cache); `options`: inductor's
        (default `inductor_options`); `size`: the engine's (height, width), for the cache key and
        the attention shapes; `tag`: what else the cache key must tell apart (`fp8`: a UNet whose
        linear layers are float8 compiles to other kernels)."""
        super().__init__(parts, capture=capture, max_layouts=max_layouts, extras=extras)
        self.name = NAME
        device = parts.device
        self.options = dict(inductor_options(device) if options is None else options)
        self.cache: CompileCache | None = None
        if engines_dir is not None:
            key = CompileKey.of(parts.ref, parts.revision, size[0], size[1], parts.dtype, device,
                                options_tag(self.options) + (f"+{tag}" if tag else ""), extras.tag)  # fmt: skip
            self.cache = CompileCache(engines_dir, key)
            self.cache.load()
        self.sdpa = self._measure_attention(parts, size) if measure_attention else SdpaChoice()
        # the networks' calls become compiled callables (the torch backend types them as modules)
        self._encode = compile_module(self._encode, "vae_encoder", device, self.options)  # type: ignore[assignment]
        self._unet = compile_module(self._unet, "unet", device, self.options)  # type: ignore[assignment]
        self._decode = compile_module(self._decode, "vae_decoder", device, self.options)  # type: ignore[assignment]
        # The UNet call with LoRA rows stays eager inside the recorded step: inductor's compile of it
        # gave frames far from eager torch's on the CPU (12.7 dB on a LoRA row), cause not yet found.
        if self._extras_call is not None and not any(isinstance(f, MultiLoRA) for f in extras.features):
            self._extras_call = compile_module(self._extras_call, f"unet+{extras.tag}", device, self.options)

    def _measure_attention(self, parts: ModelParts, size: tuple[int, int]) -> SdpaChoice:
        """The SDPA order for the UNet at batch 1 (`livediff.backends.attention`)."""
        config = parts.unet.config
        latents = torch.zeros((1, config.in_channels, size[0] // 8, size[1] // 8), device=parts.device,
                              dtype=parts.dtype)  # fmt: skip
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        timesteps = torch.full((1,), 500.0, device=parts.device)
        embeds = torch.zeros((1, 77, config.cross_attention_dim), device=parts.device, dtype=parts.dtype)
        unet = self._unet
        return choose_for(lambda: unet(latents, timesteps, embeds), parts.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self.sdpa.context():
            return self._encode(images)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        with self.sdpa.context():
            return self._unet(latents, timesteps, embeds)

    def unet_with(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                  values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        with self.sdpa.context():
            return super().unet_with(latents, timesteps, embeds, values)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.sdpa.context():
            return self._decode(latents)

    def warmed(self) -> None:
        """After warm-up: save what inductor compiled into the compile cache (when there is one)."""
        if self.cache is not None:
            self.cache.save()

    def compile_seconds(self) -> dict[str, dict[str, float]]:
        """Seconds of each network's first call per shape (compile, or load from cache, and one run)."""
        networks = [self._encode, self._unet, self._decode, self._extras_call]
        return {n.name: dict(n.compile_s) for n in networks if isinstance(n, _Announced)}

    def describe(self) -> dict[str, Any]:
        """What the engine's description records of this backend: attention kernels, cache, options."""
        return {
            "attention": self.sdpa.describe(),
            "compile_cache": None if self.cache is None else {"path": str(self.cache.path),
                                                              "loaded": self.cache.loaded},
            "inductor_options": self.options,
        }  # fmt: skip
