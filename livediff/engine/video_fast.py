"""The video engine's fast path: the transformer step replayed from CUDA graphs, or compiled.

A video model's transformer call takes Python rows (per stream: its cache, extra rows, positions,
prompt keys and values), which `CausalWan.dense_inputs` turns into tensors of one layout (batch
rows, latent frames, latent size, cached tokens, extra rows, whether a mask is needed);
`CausalWan.dense_forward` runs on those tensors alone. Two ways to run it faster, per layout:

- `cuda-graph` (`GraphedStep`): the first call of a layout records `dense_forward` (eager torch's
  kernels) into a CUDA graph over static input buffers; every later call of that layout copies its
  tensors into those buffers and replays the graph: one launch for a step's hundreds of kernels (what
  the image engine's `cuda-graph` backend does for the UNet, `livediff.backends.cuda_graph`, whose
  recorder this uses). The outputs live in the graphs' shared memory pool, overwritten by the next
  replay: they are copied out before the call returns.
- `cuda-graph-compiled` and `torch.compile` (`compiled_step`): `torch.compile` with static shapes;
  each new layout compiles once and is kept; on CUDA with mode `reduce-overhead` (inductor's own
  CUDA-graph trees).

Either way a call of a known layout with other values (another prompt, strength, timestep, seed,
positions, cache content) reuses what the layout recorded or compiled. `--backend auto` picks
`cuda-graph` on CUDA (`livediff.engine.video.resolve_video_backend`), eager torch elsewhere.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from livediff.backends.cuda_graph import Capture, cuda_capture, flatten, unflatten
from livediff.models.wan import CausalWan

log = logging.getLogger(__name__)

LAYOUTS_KEPT = 64
"""Layouts a fast path keeps (recorded graphs; for `torch.compile`, torch's dynamo cache is raised
to this: its default, 8, would send a server with many mixes of sessions back to eager)."""

DenseForward = Callable[..., tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...]]]


def layout_of(inputs: tuple[Any, ...], keep: bool) -> tuple[Hashable, ...]:
    """What fixes a `dense_forward` call's shapes: every input tensor's shape and dtype (None where
    an input is None, the mask when no row needs one), and `keep`."""
    leaves = flatten(inputs)
    return (keep, *((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in leaves))


class GraphedStep:
    """`dense_forward` recorded once per layout through `capture` and replayed after (least recently
    used layouts past `max_layouts` dropped)."""

    def __init__(self, run: DenseForward, capture: Capture, max_layouts: int = LAYOUTS_KEPT) -> None:
        self.run = run
        self.capture = capture
        self.max_layouts = max_layouts
        self.recordings: OrderedDict[Hashable, tuple[list[Any], Any, Callable[[], None]]] = OrderedDict()
        self.recorded = 0
        """Recordings made so far (a layout seen again is not recorded again)."""

    def __call__(self, *inputs: Any, keep: bool = False) -> tuple[torch.Tensor, tuple[Any, ...]]:
        layout = layout_of(inputs, keep)
        leaves = flatten(inputs)
        recording = self.recordings.get(layout)
        if recording is None:
            static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            template = unflatten(inputs, iter(static))
            outputs, replay = self.capture(lambda: self.run(*template, keep=keep))
            recording = (static, outputs, replay)
            self.recordings[layout] = recording
            self.recorded += 1
            log.info("video cuda-graph: recorded the transformer step for a new layout (%d kept)",
                     len(self.recordings))  # fmt: skip
            while len(self.recordings) > self.max_layouts:
                self.recordings.popitem(last=False)
        else:
            self.recordings.move_to_end(layout)
            for buffer, leaf in zip(recording[0], leaves):
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(leaf)
        static, outputs, replay = recording
        replay()
        flow, kept = outputs
        return flow.clone(), tuple((k.clone(), v.clone()) for k, v in kept)


def compiled_step(run: DenseForward, graphs: bool) -> DenseForward:
    """`run` through `torch.compile` with static shapes (mode `reduce-overhead` when `graphs`)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, LAYOUTS_KEPT)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, LAYOUTS_KEPT * 4
    )
    compiled: Callable[..., Any] = torch.compile(run, dynamic=False, mode="reduce-overhead" if graphs else None)

    def forward(*inputs: Any, keep: bool = False) -> tuple[torch.Tensor, tuple[Any, ...]]:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        flow, kept = compiled(*inputs, keep=keep)
        if graphs:  # inductor's graph pool is reused by the next replay: hand out copies
            return flow.clone(), tuple((k.clone(), v.clone()) for k, v in kept)
        return flow, kept

    return forward


@dataclass
class VideoBackend:
    """What runs a video model's transformer step: `forward` is None for torch eager, else the fast
    path (`CausalWan.forward_chunk(dense=...)`)."""

    name: str
    forward: DenseForward | None = None
    graphed: GraphedStep | None = field(default=None, repr=False)

    @classmethod
    def build(cls, model: CausalWan, name: str, compile: bool, device: torch.device,
              capture: Capture | None = None) -> VideoBackend:  # fmt: skip
        """`name` from `resolve_video_backend`: `torch` (eager, or compiled when `compile`),
        `cuda-graph` (recorded per layout; `capture` stands in for CUDA's recorder in tests) or
        `cuda-graph-compiled` (inductor with its CUDA graphs)."""
        if name == "cuda-graph":
            graphed = GraphedStep(model.dense_forward, capture or cuda_capture(device))
            return cls(name, graphed, graphed)
        if name == "cuda-graph-compiled":
            return cls(name, compiled_step(model.dense_forward, graphs=True))
        if compile:
            return cls("torch.compile", compiled_step(model.dense_forward, graphs=False))
        return cls("torch")

    def describe(self) -> dict[str, Any]:
        """For `/readyz` (`backend_detail`)."""
        detail: dict[str, Any] = {"fast_path": self.forward is not None}
        if self.graphed is not None:
            detail["layouts_recorded"] = len(self.graphed.recordings)
        return detail
