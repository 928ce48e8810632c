"""What the engine asks of a backend: run the three networks of the loop on device tensors."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar

import torch

R = TypeVar("R")


class Stages(Protocol):
    """Runs the stages of one engine step, in the order the step meets them.

    `run(name, fn, *args)` returns `fn(*args)`, computed now (`EAGER`) or replayed from a recording
    of the same stage (`livediff.backends.cuda_graph`). A recording's outputs are its own buffers:
    valid until the next step, so the engine copies out whatever it keeps across steps.
    """

    def run(self, name: str, fn: Callable[..., R], *args: Any) -> R: ...


class EagerStages:
    """Every stage computed when it is asked for."""

    def run(self, name: str, fn: Callable[..., R], *args: Any) -> R:
        return fn(*args)


EAGER = EagerStages()


class Backend(Protocol):
    """Runs the UNet and the VAE halves. All tensors live on the engine's device.

    Implementations: `TorchBackend` (eager or torch.compile), `OnnxBackend` (ONNX Runtime),
    `OpenVinoBackend` (CPU), `TensorRTBackend` (CUDA). They are interchangeable: same inputs, same
    outputs, within tolerance.
    """

    name: str
    channels_last: bool
    """Whether image inputs should be channels-last (NHWC in memory): True where the kernels prefer it."""
    torch_threads: int | None
    """torch's CPU threads for the engine's own ops in a step (None: torch's setting). A backend
    with a CPU thread pool of its own sets 1, so that torch's idle OpenMP workers, spinning after
    each small op, do not take the cores its pool is about to use."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, 4, H/8, W/8) latents in diffusion scale."""
        ...

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Noisy latents, (N,) float timesteps, (N, tokens, dim) embeddings -> the UNet's prediction."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, H/8, W/8) latents -> (N, 3, H, W) images in [-1, 1]."""
        ...

    def stages(self, layout: Hashable | None) -> Stages:
        """How the engine runs the stages of a step of `layout` (what fixes its shapes and its
        order of work; None for a step that cannot be recorded): `EAGER` except where a backend
        records whole stages (`cuda-graph`)."""
        ...


Runner = Callable[..., torch.Tensor]
"""One compiled network: torch tensors in, a torch tensor out (in the graph's dtype)."""


class CompiledBackend:
    """A backend of three compiled networks (encoder, UNet, decoder, as in `COMPONENTS`), their
    outputs cast to the engine's dtype (a float32 graph serves a bfloat16 engine on the CPU)."""

    channels_last = False

    def __init__(self, name: str, runners: Sequence[Runner], dtype: torch.dtype, torch_threads: int | None) -> None:
        self.name = name
        self._encode, self._unet, self._decode = runners
        self.dtype = dtype
        self.torch_threads = torch_threads

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images).to(self.dtype)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet(latents, timesteps, embeds).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents).to(self.dtype)

    def stages(self, layout: Hashable | None) -> Stages:
        return EAGER
