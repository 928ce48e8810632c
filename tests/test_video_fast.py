"""The video engine's fast path: the transformer step recorded per layout and replayed (CUDA graphs,
with the CPU stand-in recorder here), or compiled; both equal eager, and a param change in a known
layout records or compiles nothing new. The CUDA test skips without CUDA."""

from __future__ import annotations

import pytest
import torch

from livediff.bench_variants import host_capture
from livediff.config import EngineSettings, StreamParams
from livediff.engine.video import VideoEngine
from livediff.engine.video_fast import VideoBackend, compiled_step
from livediff.models.video import VideoParts, load_video_model
from livediff.models.wan import Row

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 64


@pytest.fixture(scope="module")
def parts() -> VideoParts:
    return load_video_model("tiny-video")


def camera(chunks: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator) for _ in range(n)]
            for n in [5] + [4] * (chunks - 1)]  # fmt: skip


def engine_with(parts: VideoParts, backend: VideoBackend | None) -> VideoEngine:
    engine = VideoEngine(EngineSettings(model="tiny-video", height=SIZE, width=SIZE), parts)
    if backend is not None:  # (the CUDA recorder cannot run here: the same step through the CPU stand-in)
        engine.backend, engine.fast = backend, backend.forward
    return engine


def run(engine: VideoEngine, params: StreamParams, chunks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    stream = engine.open_stream(params)
    return [frame for chunk in chunks for frame in engine.step([(stream, chunk)]).outputs[0]]


def test_the_recorded_step_equals_eager_and_a_param_change_records_nothing_new(parts) -> None:
    backend = VideoBackend.build(parts.transformer, "cuda-graph", False, torch.device("cpu"), capture=host_capture)
    graphed, eager = engine_with(parts, backend), engine_with(parts, None)
    video = camera(7, seed=1)
    params = StreamParams(prompt="a red fox", steps=2, strength=0.7, seed=3)
    got, want = run(graphed, params, video), run(eager, params, video)
    assert len(got) == len(want) == 5 + 4 * 5
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert backend.graphed is not None
    recorded = backend.graphed.recorded
    assert 2 <= recorded <= 8  # the layouts of a stream's first chunks and of a full cache, each once
    # another prompt, strength, seed and frames through the same layouts: replays only
    other = StreamParams(prompt="ink", steps=2, strength=0.9, seed=8)
    got = run(graphed, other, camera(7, seed=2))
    assert backend.graphed.recorded == recorded
    assert all(torch.equal(a, b) for a, b in zip(got, run(eager, other, camera(7, seed=2))))


@pytest.mark.slow  # reason: inductor compiles the step on a CPU (tens of seconds)
def test_the_compiled_step_equals_eager_and_does_not_recompile_for_new_values(parts) -> None:
    import torch._dynamo.utils

    model, engine = parts.transformer, engine_with(parts, None)
    streams = [engine.open_stream(StreamParams(prompt=p, seed=i)) for i, p in enumerate(("a red fox", "ink"))]
    frames = camera(3, seed=4)
    for stream in streams:
        for chunk in frames:
            engine.step([(stream, chunk)])
    forward = compiled_step(model.dense_forward, graphs=False)

    def call(stream_index: int, t: float, seed: int) -> tuple[tuple[torch.Tensor, list], tuple[torch.Tensor, list]]:
        stream = streams[stream_index]
        layers = [stream.cache.seen(i) for i in range(model.layers)]
        row = Row(stream.cross, tuple(k for k, _ in layers), tuple(v for _, v in layers), torch.tensor([9]))
        latents = torch.randn((1, 16, 1, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
        timesteps = torch.tensor([t])
        with torch.inference_mode():
            return (model.forward_chunk(latents, timesteps, [row], keep=True, dense=forward),
                    model.forward_chunk(latents, timesteps, [row], keep=True))  # fmt: skip

    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (flow, kept), (flow_e, kept_e) = call(0, 700.0, 1)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert compiled >= 1
    assert torch.allclose(flow, flow_e, atol=1e-4) and torch.allclose(kept[0][0], kept_e[0][0], atol=1e-4)
    # another stream (prompt, cache content), timestep and latents in the same layout: no recompile
    (flow, _), (flow_e, _) = call(1, 300.0, 2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == compiled
    assert torch.allclose(flow, flow_e, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_auto_replays_cuda_graphs_and_equals_eager() -> None:
    cuda = load_video_model("tiny-video", "cuda", torch.float32)
    settings = EngineSettings(model="tiny-video", height=SIZE, width=SIZE, device="cuda", dtype="float32")
    fast = VideoEngine(settings.replace(backend="auto"), cuda)
    eager = VideoEngine(settings.replace(backend="torch"), cuda)
    assert fast.backend.name == "cuda-graph" and eager.backend.name == "torch"
    params = StreamParams(steps=2, strength=0.7)
    got, want = run(fast, params, camera(6, seed=5)), run(eager, params, camera(6, seed=5))
    assert len(got) == len(want) and all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(got, want))
    assert fast.backend.graphed is not None and fast.backend.graphed.recorded >= 2
