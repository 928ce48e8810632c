"""Stream Batch over a video stream's denoising steps: what each stream carries between calls.

StreamDiffusion's Stream Batch (Kodaira et al., "StreamDiffusion: A Pipeline-level Solution for
Real-time Interactive Generation", 2023, arXiv 2312.12491) runs the denoising steps of successive
inputs in one batch: the newest input at its first step beside the one before it at its second,
and so on, so that each new input costs one model call at any step count. StreamDiffusionV2 (Feng
et al. 2025, arXiv 2511.07399) does the same over the chunks of a causal video model. Here a
stream's chunks in flight form a queue (`StreamPipeline`): each engine step adds the new chunk at
its first step and moves every chunk in flight one step on, all in one transformer call (beside
every other stream's rows); a chunk whose steps are done leaves when every older chunk has left
(its frames are decoded then), and its context pass (the clean latents at timestep 0, which write
its keys and values into the cache) runs as a row of the next call, where the stream's newer
chunks attend to those keys in the same layer (`livediff.models.wan.Row.extra`).

What a chunk sees: at every step, the keys and values of the stream's chunks that finished before
that call. With one step that is every earlier chunk, as without Stream Batch (the outputs are the
same, and a chunk costs one call instead of two). With `steps` S > 1, chunk j's step k (from 0)
sees chunks up to j + k - S: its last step sees every earlier chunk, its first step misses the
S - 1 chunks just before it (still in flight). Its frames come out S - 1 engine steps after it went
in (a chunk of 4 frames is 133 ms at 30 fps).

All of it lives in the stream's own `StreamPipeline` (in `VideoStream`), never on a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkInFlight:
    """One chunk between its first and its last denoising step (then until its context pass)."""

    x: torch.Tensor
    """(C, F, h, w): the latents its next step takes (noisy), or, once done, the clean prediction."""
    timesteps: tuple[int, ...]
    """Its denoising timesteps, fixed when it entered (a change of `steps` applies to new chunks)."""
    sigmas: tuple[float, ...]
    positions: torch.Tensor
    """(F,) its absolute frame positions (moved by a RoPE refresh while it is in flight)."""
    noise: list[torch.Tensor]
    """(C, F, h, w) each: the fresh noise of its steps after the first, drawn when it entered (after
    its first noise, from the stream's generator: the order of the chunk-by-chunk engine's draws,
    whatever else is in flight)."""
    step: int = 0
    """The index of its next step in `timesteps`."""

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @property
    def latent_frames(self) -> int:
        return int(self.x.shape[1])


@dataclass
class StreamPipeline:
    """A stream's chunks in flight (oldest first) and those done, waiting for their context pass."""

    in_flight: list[ChunkInFlight] = field(default_factory=list)
    finished: list[ChunkInFlight] = field(default_factory=list)

    def shift(self, offset: int) -> None:
        """A RoPE refresh moved the stream's positions down by `offset`: so do its chunks'."""
        if offset:
            for chunk in (*self.in_flight, *self.finished):
                chunk.positions = chunk.positions - offset

    def leave(self) -> list[ChunkInFlight]:
        """The done chunks at the front of the queue (in order): they leave for decoding and wait for
        their context pass in `finished`."""
        out = []
        while self.in_flight and self.in_flight[0].done:
            out.append(self.in_flight.pop(0))
        self.finished.extend(out)
        return out

    def clear(self) -> None:
        """A reset: the chunks in flight are dropped (their frames never come)."""
        self.in_flight.clear()
        self.finished.clear()

    @property
    def depth(self) -> int:
        """Chunks in flight or waiting for their context pass."""
        return len(self.in_flight) + len(self.finished)
