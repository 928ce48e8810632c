"""What only a CUDA GPU can show: the CUDA paths of the engine, and each backend that runs there
against eager torch. Every test here is marked `gpu` and skips without CUDA; `scripts/gpu-check`
runs them first (`pytest -m gpu`). The tiny model in float16 keeps them to seconds.

Tolerances are in levels of 255 of the output frames. Replaying CUDA graphs runs the eager
kernels, so `cuda-graph` must match eager torch to a level or two; `torch.compile` fuses and
reorders float16 arithmetic, so it is held to a looser bound.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from livediff.backends.cuda_graph import CudaGraphBackend, RecordedStages, cuda_capture
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.device import resolve_dtype
from livediff.models import ModelParts, load_model
from livediff.synthetic import SyntheticCamera

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZE = 128
PROMPTS = ["a red fox", "a city at night", "rain on glass", "a watercolor harbour"]


@pytest.fixture(scope="module")
def parts() -> ModelParts:
    return load_model("tiny", "cuda", torch.float16)


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE).frames(6)]


def make(parts: ModelParts, backend: str = "torch", **settings: Any) -> StreamEngine:
    return StreamEngine(
        EngineSettings(model="tiny", device="cuda", height=SIZE, width=SIZE, backend=backend, **settings), parts=parts
    )


def levels(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(max, mean) absolute difference of two uint8 frames, in levels of 255."""
    diff = (a.int() - b.int()).abs()
    return int(diff.max()), float(diff.float().mean())


def compare(reference: StreamEngine, other: StreamEngine, params: list[StreamParams], frames: list[torch.Tensor],
            max_abs: int, mean_abs: float) -> None:  # fmt: skip
    """The same streams through both engines, frame by frame; every output within the bounds."""
    pairs = [(reference.open_stream(p), other.open_stream(p)) for p in params]
    for index, frame in enumerate(frames):
        want = reference.step([(a, frame) for a, _ in pairs]).outputs
        got = other.step([(b, frame) for _, b in pairs]).outputs
        for stream, (w, g) in enumerate(zip(want, got)):
            largest, mean = levels(w, g)
            assert largest <= max_abs and mean <= mean_abs, (
                f"{other.backend.name} frame {index} stream {stream}: max {largest}, mean {mean:.3f} levels"
            )


def test_auto_runs_cuda_graph_in_float16_channels_last() -> None:
    engine = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE, backend="auto"))
    assert engine.device.type == "cuda" and engine.dtype == torch.float16
    assert resolve_dtype("auto", engine.device, "cuda-graph") == torch.float16
    assert engine.backend.name == "cuda-graph" and engine.backend.channels_last
    weight = next(p for p in engine.parts.unet.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_frames_go_through_one_pinned_staging_buffer_and_come_back_on_the_host(parts, frames) -> None:
    engine = make(parts, max_batch=3)
    staging = engine._staging_cpu
    assert staging is not None and staging.is_pinned() and tuple(staging.shape) == (3, SIZE, SIZE, 3)
    streams = [engine.open_stream(StreamParams(prompt=p)) for p in PROMPTS[:3]]
    result = engine.step([(s, frames[i]) for i, s in enumerate(streams)])
    for i, out in enumerate(result.outputs):
        assert out.device.type == "cpu" and out.dtype == torch.uint8 and tuple(out.shape) == (SIZE, SIZE, 3)
        assert out.data_ptr() != staging.data_ptr()
        assert levels(out, frames[i])[1] > 5  # transformed, not the input
    assert torch.equal(staging[1], frames[1])  # the staging buffer holds what was sent
    assert set(result.timings_ms) == {"preprocess", "encode", "unet", "decode", "postprocess"}


def test_bfloat16_runs_near_float16(parts, frames) -> None:
    bf16 = StreamEngine(EngineSettings(model="tiny", device="cuda", dtype="bfloat16", height=SIZE, width=SIZE))
    assert bf16.dtype == torch.bfloat16
    half = make(parts)
    a = bf16.step([(bf16.open_stream(), frames[0])]).outputs[0]
    b = half.step([(half.open_stream(), frames[0])]).outputs[0]
    assert levels(a, b)[1] < 4.0


def test_a_batched_step_gives_each_stream_its_single_frame_output(parts, frames) -> None:
    engine = make(parts)
    params = [StreamParams(prompt=p, seed=i, strength=0.4 + 0.1 * i) for i, p in enumerate(PROMPTS)]
    batched = engine.step([(engine.open_stream(p), frames[2]) for p in params]).outputs
    for p, out in zip(params, batched):
        alone = engine.step([(engine.open_stream(p), frames[2])]).outputs[0]
        assert levels(out, alone)[1] < 0.5


@pytest.mark.parametrize("size", [1, 2, 4])
def test_cuda_graph_matches_eager_torch(parts, frames, size: int) -> None:
    params = [StreamParams(prompt=p, seed=i, strength=0.4 + 0.1 * i) for i, p in enumerate(PROMPTS[:size])]
    graphed = make(parts, backend="cuda-graph")
    compare(make(parts), graphed, params, frames[:4], max_abs=2, mean_abs=0.05)
    assert isinstance(graphed.backend, CudaGraphBackend)
    assert [layout[0] for layout in graphed.backend.graphs.layouts] == [size]


def test_cuda_graph_stream_batch_and_guidance_match_eager_torch(parts, frames) -> None:
    two = StreamParams(steps=2, strength=0.8)
    compare(make(parts, stream_batch=True), make(parts, "cuda-graph", stream_batch=True), [two, two.replace(seed=3)],
            frames, max_abs=2, mean_abs=0.05)  # fmt: skip
    guided = StreamParams(prompt="a red fox", negative_prompt="blurry", guidance=3.0)
    compare(make(parts), make(parts, "cuda-graph"), [guided, StreamParams()], frames[:4], max_abs=2, mean_abs=0.05)


def test_cuda_graph_records_each_batch_size_up_to_max_batch(parts, frames) -> None:
    engine = make(parts, backend="cuda-graph", max_batch=4)
    streams = [engine.open_stream(StreamParams(prompt=p)) for p in PROMPTS]
    for size in (1, 2, 3, 4, 1, 2, 3, 4, 4):
        engine.step([(s, frames[size]) for s in streams[:size]])
    graphs = engine.backend.graphs  # type: ignore[attr-defined]
    assert sorted(layout[0] for layout in graphs.layouts) == [1, 2, 3, 4]
    assert all(stages.names == ["preprocess", "encode", "unet", "decode", "postprocess"]
               for stages in graphs.layouts.values())  # fmt: skip


def test_a_replay_never_waits_for_the_host() -> None:
    stages = RecordedStages("layout", cuda_capture(torch.device("cuda")))
    x = torch.randn(64, 64, device="cuda")
    first = stages.run("square", lambda t: t @ t, x)
    expected = (x @ x).clone()
    y = torch.randn(64, 64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        again = stages.run("square", None, y)  # type: ignore[arg-type]  # copy in + replay
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert again is first
    torch.testing.assert_close(again, y @ y)
    assert not torch.equal(again, expected)


@pytest.mark.slow
def test_torch_compile_matches_eager_torch(parts, frames) -> None:
    compiled = StreamEngine(
        EngineSettings(model="tiny", device="cuda", height=SIZE, width=SIZE, compile=True), parts=parts
    )
    assert compiled.backend.name == "torch.compile"
    compare(make(parts), compiled, [StreamParams(prompt="a red fox")], frames[:3], max_abs=24, mean_abs=1.5)
