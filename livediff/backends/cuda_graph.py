"""`--backend cuda-graph`: the engine's whole step replayed from CUDA graphs, one set per layout.

The networks are the torch backend's (eager modules in the engine's dtype, channels-last on
CUDA); what changes is how a step runs. A step launches about a thousand small kernels for
SD-Turbo at 512x512; eagerly, the host's time to launch them is a large part of a frame. Here
each stage of the step (preprocess, VAE encode, noising and the denoising steps, VAE decode,
postprocess) is recorded once as a CUDA graph (`torch.cuda.CUDAGraph`) over static buffers, and
every later step of the same layout replays the five graphs: one launch per stage.

A layout is what fixes a step's shapes and order of work (the engine's `_layout`: batch size,
step count, guidance, the Stream Batch pipeline's state); each has its own graphs, recorded the
second time it is seen (the first runs eagerly, so one-off layouts cost no recording), at most
`max_layouts` of them. Per-stream tensors (prompt embeddings, schedule coefficients, noise,
Stream Batch latents) are copied into the static inputs before each replay, so streams with
different params batch as they do eagerly. A stage's outputs are static buffers, overwritten by
the next replay: the engine copies out what it keeps. Nothing inside a replay waits for the
host; the step's one synchronisation stays its final copy of the frames to the host.

Steps with ControlNets, with motion-aware strength and with the feature bank are recorded like any
other: which ControlNets run on which rows at which denoising step, and each row's bank size, are
part of the layout, and their images, their scales, a stream's timesteps (schedule coefficients)
and the bank's earlier keys and values with their slot biases are tensors copied in. The bank is
gathered from each stream's rings before the step's `unet` stage and the keys and values the stage
returns are stored into the rings after it (`livediff.engine.temporal`: indexed on the host, copies
on the device), so the recorded graph reads and writes the same static buffers whichever streams
fill the rows and however full their banks are. The bank's UNet call is the torch backend's
(`extras`, `livediff.backends.unet_extras`), recorded like the plain one. Steps with LoRA rows
are recorded too: which rows apply a LoRA and how many each applies are part of the layout, the
rows' slots and scales are device tensors copied in (`livediff.backends.multi_lora.LoRARows`), so
a LoRA switch or rescale replays. Steps mixing step counts run eagerly; the others still replay.

`cuda-graph-compiled` (`livediff.backends.compiled_graph`) records inductor-compiled networks
through the same `StepGraphs`.

All graphs share one memory pool. That is safe because graphs never run concurrently (one
worker thread, one CUDA stream) and nothing reads a stage's outputs after the next step starts.

`--backend auto` picks this backend on CUDA: the GPU check (`scripts/gpu-check`) on an H200 found
it 4.2x eager torch at batch 1 and 1.4x at batch 4 (512x512, SD-Turbo's architecture, float16),
its frames identical to eager torch's. The check says again, on each run, whether that still holds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch

from livediff.backends.base import EAGER, Stages
from livediff.backends.torch_backend import TorchBackend
from livediff.backends.unet_extras import NO_EXTRAS, UNetExtras
from livediff.errors import BackendUnavailable, LivediffError
from livediff.models import ModelParts

log = logging.getLogger(__name__)

R = TypeVar("R")

Capture = Callable[[Callable[[], Any]], tuple[Any, Callable[[], None]]]
"""Records `run` (one stage over its static inputs) and returns (its outputs, a replay function).
After a replay the outputs hold what `run()` computes from the static inputs' current values."""

NAME = "cuda-graph"


class GraphCaptureError(LivediffError):
    """A stage could not be recorded as a CUDA graph (an op that synchronises or allocates host memory)."""


def require_cuda(device: torch.device, name: str = NAME) -> None:
    """Raises BackendUnavailable unless `device` is a CUDA device (checked before a model is loaded);
    `name`: the backend's, for the message."""
    if device.type != "cuda":
        raise BackendUnavailable(
            f"{name} backend needs the engine on a CUDA GPU (its device is {device}); "
            "use --backend torch or auto on this host"
        )


def cuda_capture(device: torch.device, warmup: int = 2) -> Capture:
    """The CUDA recorder: a stage is run `warmup` times on a side stream (lazy initialisation,
    cuBLAS workspaces), then captured on that stream into a graph of the shared memory pool."""
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device)

    def capture(run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        current = torch.cuda.current_stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (frame conversion) may pin host memory while this one records
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            outputs = run()
        return outputs, graph.replay

    return capture


def flatten(value: Any) -> list[Any]:
    """The leaves of `value` in order: tensors and other values inside tuples, lists and dataclasses."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten(item)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value) for leaf in flatten(getattr(value, f.name))]
    return [value]


def unflatten(template: Any, leaves: Iterator[Any]) -> Any:
    """`template` rebuilt with its leaves taken in order from `leaves` (the inverse of `flatten`)."""
    if isinstance(template, (tuple, list)):
        return type(template)(unflatten(item, leaves) for item in template)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        changes = {f.name: unflatten(getattr(template, f.name), leaves) for f in dataclasses.fields(template)}
        return dataclasses.replace(template, **changes)
    return next(leaves)


class _Recording:
    """One recorded stage: its static input leaves, its outputs and how to replay it."""

    def __init__(
        self, name: str, layout: Hashable, inputs: list[Any], outputs: Any, replay: Callable[[], None]
    ) -> None:
        self.name = name
        self.layout = layout
        self.inputs = inputs
        self.outputs = outputs
        self.replay = replay

    def load(self, leaves: list[Any]) -> None:
        """Copy this step's input leaves into the static inputs (leaves that are already they stay)."""
        if len(leaves) != len(self.inputs):
            raise self._mismatch(f"{len(self.inputs)} inputs", f"{len(leaves)}")
        for index, (static, leaf) in enumerate(zip(self.inputs, leaves)):
            if isinstance(static, torch.Tensor):
                if leaf is static:
                    continue
                if not isinstance(leaf, torch.Tensor) or (leaf.shape, leaf.dtype) != (static.shape, static.dtype):
                    got = f"{leaf.dtype} {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)
                    raise self._mismatch(f"input {index} as {static.dtype} {tuple(static.shape)}", got)
                static.copy_(leaf)
            elif leaf != static:
                raise self._mismatch(f"input {index} = {static!r}", repr(leaf))

    def _mismatch(self, recorded: str, got: str) -> ValueError:
        return ValueError(
            f"stage {self.name!r} of layout {self.layout!r} was recorded with {recorded}, got {got}: "
            "the layout must fix every shape and every non-tensor argument"
        )


class RecordedStages:
    """The stages of one layout: each recorded the first time it runs here, replayed after."""

    def __init__(self, layout: Hashable, capture: Capture) -> None:
        self.layout = layout
        self._capture = capture
        self._recordings: dict[str, _Recording] = {}
        self._buffers: list[torch.Tensor] = []
        """Every static tensor of this layout: an input that is one of them needs no copy."""

    @property
    def names(self) -> list[str]:
        """The stages recorded so far, in the order they were recorded."""
        return list(self._recordings)

    def run(self, name: str, fn: Callable[..., R], *args: Any) -> R:
        leaves = flatten(args)
        recording = self._recordings.get(name)
        if recording is None:
            recording = self._recordings[name] = self._record(name, fn, args, leaves)
        else:
            recording.load(leaves)
        recording.replay()
        return recording.outputs  # type: ignore[no-any-return]

    def _record(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], leaves: list[Any]) -> _Recording:
        inputs = [self._static(leaf) for leaf in leaves]

        def run() -> Any:
            return fn(*unflatten(args, iter(inputs)))

        try:
            outputs, replay = self._capture(run)
        except RuntimeError as exc:
            raise GraphCaptureError(f"stage {name!r} of layout {self.layout!r} could not be recorded: {exc}") from exc
        self._buffers.extend(leaf for leaf in flatten(outputs) if isinstance(leaf, torch.Tensor))
        log.debug("%s: recorded stage %s of layout %s", NAME, name, self.layout)
        return _Recording(name, self.layout, inputs, outputs, replay)

    def _static(self, leaf: Any) -> Any:
        """A static input for `leaf`: a previous stage's output as it is, a copy of any other tensor."""
        if not isinstance(leaf, torch.Tensor) or any(leaf is buffer for buffer in self._buffers):
            return leaf
        static = leaf.clone()  # keeps the memory format (channels-last stays channels-last)
        self._buffers.append(static)
        return static


class StepGraphs:
    """The recorded stages of every layout an engine has met: the CUDA-free bookkeeping of the backend.

    A layout runs eagerly the first `eager_runs` times it is seen, then is recorded; at most
    `max_layouts` are kept (layouts beyond run eagerly, said once in the log). `capture` records a
    stage (`cuda_capture` on a GPU).
    """

    def __init__(self, capture: Capture, eager_runs: int = 1, max_layouts: int = 16) -> None:
        if eager_runs < 0 or max_layouts < 1:
            raise ValueError(f"eager_runs must be >= 0 and max_layouts >= 1, got {eager_runs} and {max_layouts}")
        self.capture = capture
        self.eager_runs = eager_runs
        self.max_layouts = max_layouts
        self.layouts: dict[Hashable, RecordedStages] = {}
        self._seen: OrderedDict[Hashable, int] = OrderedDict()
        self._said_full = False

    def stages(self, layout: Hashable | None) -> Stages:
        """The recorded stages of `layout`, or `EAGER` (not recordable, not seen often enough, or no room)."""
        if layout is None:
            return EAGER
        recorded = self.layouts.get(layout)
        if recorded is not None:
            return recorded
        seen = self._seen.pop(layout, 0) + 1
        if seen <= self.eager_runs:
            self._seen[layout] = seen
            while len(self._seen) > 1024:  # layouts met once (a stream's first Stream Batch frame) are forgotten
                self._seen.popitem(last=False)
            return EAGER
        if len(self.layouts) >= self.max_layouts:
            if not self._said_full:
                log.warning("%s: %d layouts recorded; further ones run eagerly", NAME, self.max_layouts)
                self._said_full = True
            return EAGER
        recorded = self.layouts[layout] = RecordedStages(layout, self.capture)
        return recorded


class CudaGraphBackend(TorchBackend):
    """The torch backend's networks, with each layout's step stages replayed from CUDA graphs.

    `capture` defaults to `cuda_capture` on the model's device (which must be CUDA); another
    recorder lets the bookkeeping run where there is no GPU (the tests).
    """

    def __init__(self, parts: ModelParts, capture: Capture | None = None, max_layouts: int = 16,
                 extras: UNetExtras = NO_EXTRAS) -> None:  # fmt: skip
        """`extras`: the optional UNet inputs (the feature bank, ControlNet residuals, LoRAs), as
        `TorchBackend` takes them; steps with LoRA rows are recorded too (the module docstring says how)."""
        if capture is None:
            require_cuda(parts.device)
            capture = cuda_capture(parts.device)
        super().__init__(parts, extras=extras)
        self.name = NAME
        self.graphs = StepGraphs(capture, max_layouts=max_layouts)

    def stages(self, layout: Hashable | None) -> Stages:
        return self.graphs.stages(layout)
