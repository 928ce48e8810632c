"""The `cuda-graph` backend's CUDA-free parts, on the CPU: which layouts are recorded, static buffers,
per-stream tensors copied in, the engine's flow through recorded stages, and its errors off CUDA.

A CUDA graph cannot be captured here. `host_replay` stands in for the capture: a replay recomputes
the stage from its static inputs and writes the results into the recorded outputs, which is what
a graph replay does to its buffers. The same checks against real graphs are in test_cuda.py (GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from livediff.backends import EAGER, resolve_backend
from livediff.backends.cuda_graph import (
    CudaGraphBackend,
    GraphCaptureError,
    RecordedStages,
    StepGraphs,
    flatten,
    require_cuda,
)
from livediff.backends.unet_extras import unet_extras
from livediff.cli import main
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import BackendUnavailable
from livediff.synthetic import SyntheticCamera

SIZE = 64
STAGES = ["preprocess", "encode", "unet", "decode", "postprocess"]


class HostReplay:
    """Records a stage without a GPU; counts recordings and replays."""

    def __init__(self) -> None:
        self.recorded = 0
        self.replayed = 0

    def __call__(self, run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        self.recorded += 1
        outputs = run()

        def replay() -> None:
            self.replayed += 1
            for static, fresh in zip(flatten(outputs), flatten(run())):
                if isinstance(static, torch.Tensor):
                    static.copy_(fresh)

        return outputs, replay


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE).frames(8)]


def engines(tiny_parts, **settings: Any) -> tuple[StreamEngine, StreamEngine, HostReplay]:  # type: ignore[no-untyped-def]
    """An eager engine and one whose backend records its stages (same model, same settings)."""
    config = EngineSettings(model="tiny", height=SIZE, width=SIZE, **settings)
    eager, recorded = StreamEngine(config, parts=tiny_parts), StreamEngine(config, parts=tiny_parts)
    recorder = HostReplay()
    recorded.backend = CudaGraphBackend(tiny_parts, capture=recorder, extras=unet_extras(config, tiny_parts))
    return eager, recorded, recorder


def run_both(eager: StreamEngine, recorded: StreamEngine, params: list[StreamParams], frames: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    """The same streams through both engines, a frame at a time; every output must be identical."""
    pairs = [(eager.open_stream(p), recorded.open_stream(p)) for p in params]
    for frame in frames:
        expected = eager.step([(a, frame) for a, _ in pairs])
        got = recorded.step([(b, frame) for _, b in pairs])
        for want, have in zip(expected.outputs, got.outputs):
            assert torch.equal(want, have)
        assert set(got.timings_ms) == set(STAGES)
    return pairs


def test_each_batch_size_is_recorded_once_and_replayed_with_identical_frames(tiny_parts, frames) -> None:
    eager, recorded, recorder = engines(tiny_parts)
    params = [StreamParams(prompt="a red fox", seed=1), StreamParams(prompt="a city", strength=0.7, seed=2),
              StreamParams(prompt="rain", strength=0.3, seed=3), StreamParams(prompt="snow", seed=4)]  # fmt: skip
    for size in (1, 2, 4):
        run_both(eager, recorded, params[:size], frames[:3])
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    assert sorted(layout[0] for layout in graphs.layouts) == [1, 2, 4]  # one layout per batch size
    for stages in graphs.layouts.values():
        assert stages.names == STAGES
    assert recorder.recorded == 3 * len(STAGES)  # first step eager, second recorded, then replays
    assert recorder.replayed == 3 * 2 * len(STAGES)


def test_per_stream_tensors_are_copied_in_so_a_param_change_after_recording_takes_effect(tiny_parts, frames) -> None:
    eager, recorded, recorder = engines(tiny_parts)
    pairs = run_both(eager, recorded, [StreamParams(prompt="a red fox"), StreamParams(seed=9)], frames[:3])
    changed = StreamParams(prompt="a city at night", strength=0.8, seed=5)
    for engine, stream in zip((eager, recorded), pairs[1]):
        engine.update(stream, changed)
    before = recorder.recorded
    for frame in frames[3:6]:
        expected = eager.step([(a, frame) for a, _ in pairs])
        got = recorded.step([(b, frame) for _, b in pairs])
        assert all(torch.equal(w, h) for w, h in zip(expected.outputs, got.outputs))
    assert recorder.recorded == before  # same layout: replayed, not recorded again


def test_outputs_are_copies_that_the_next_replay_leaves_alone(tiny_parts, frames) -> None:
    _, recorded, _ = engines(tiny_parts)
    stream = recorded.open_stream()
    outputs = [recorded.step([(stream, frame)]).outputs[0] for frame in frames[:4]]
    kept = [out.clone() for out in outputs]
    recorded.step([(stream, frames[5])])
    assert all(torch.equal(a, b) for a, b in zip(outputs, kept))
    assert not torch.equal(outputs[2], outputs[3])  # moving frames: replays really recompute


@pytest.mark.parametrize("steps", [2, 3])
def test_stream_batch_records_its_pipeline_and_matches_eager(tiny_parts, frames, steps: int) -> None:
    eager, recorded, _ = engines(tiny_parts, stream_batch=True)
    params = StreamParams(steps=steps, strength=0.9)
    first = [(eager.open_stream(params), recorded.open_stream(params))]
    for index, frame in enumerate(frames[:6]):
        if index == 2:  # a stream joins later: its first frame is its own layout, run eagerly
            first.append((eager.open_stream(params.replace(seed=7)), recorded.open_stream(params.replace(seed=7))))
        expected = eager.step([(a, frame) for a, _ in first])
        got = recorded.step([(b, frame) for _, b in first])
        assert all(torch.equal(w, h) for w, h in zip(expected.outputs, got.outputs))
    for a, b in first:  # the pending latents are the stream's own, not a stage buffer
        assert torch.equal(a.pending, b.pending)
        assert all(b.pending.data_ptr() != t.data_ptr() for t in _buffers(recorded))


def test_guided_and_unguided_streams_batch_through_recorded_stages(tiny_parts, frames) -> None:
    eager, recorded, _ = engines(tiny_parts)
    guided = StreamParams(prompt="a red fox", negative_prompt="blurry", guidance=4.0)
    run_both(eager, recorded, [StreamParams(prompt="a red fox"), guided], frames[:3])
    assert [layout[2] for layout in recorded.backend.graphs.layouts] == [True]  # type: ignore[attr-defined]


def test_a_step_mixing_step_counts_runs_eagerly(tiny_parts, frames) -> None:
    eager, recorded, recorder = engines(tiny_parts)
    run_both(eager, recorded, [StreamParams(steps=1), StreamParams(steps=3, strength=0.9)], frames[:3])
    assert recorder.recorded == 0 and not recorded.backend.graphs.layouts  # type: ignore[attr-defined]


@pytest.mark.timeout(900)  # 1-3 min each on 2 idle cores; a loaded machine took longer than the default 300 s
@pytest.mark.parametrize("stream_batch", [False, True])
def test_feature_bank_and_motion_aware_steps_replay_with_the_torch_backends_frames(
    tiny_parts, frames, stream_batch: bool
) -> None:
    """The bank's earlier keys and values enter the `unet` stage as tensors sized by each row's bank
    size (part of the layout), and the keys and values it returns are stored into the rings after
    it: bank steps are recorded once and replayed, frames identical to eager torch's, the rings too.
    Motion-aware strength moves a stream's timesteps frame by frame, but they enter the step as
    schedule coefficients (tensors): its steps are recorded once and replayed with each frame's
    timesteps."""
    eager, recorded, recorder = engines(tiny_parts, feature_bank=True, stream_batch=stream_batch)
    banked = StreamParams(prompt="a red fox", steps=2, strength=0.8, seed=1, temporal_bank=2)
    moving = StreamParams(prompt="a city", steps=2, seed=2, motion_strength=(0.3, 0.7))
    plain = StreamParams(prompt="rain", steps=2, strength=0.8, seed=3)
    pairs = run_both(eager, recorded, [banked, plain], frames[:4])
    layouts = recorded.backend.graphs.layouts  # type: ignore[attr-defined]
    assert len(layouts) == 1 and recorder.recorded == len(STAGES)  # under Stream Batch frame 1 is a layout met once
    (layout,) = layouts
    assert layout[4] == (2, 0)  # each row's bank size
    bank = pairs[0][1].bank
    assert bank is not None and bank.filled((0, 0)) == 2  # the bank did take part: two frames kept per slot
    assert all(torch.equal(a, b) for a, b in zip(pairs[0][0].bank.rings[(1, 0)].kv, bank.rings[(1, 0)].kv))

    still = frames[0]
    moving_pair = (eager.open_stream(moving), recorded.open_stream(moving))
    strengths = []
    for frame in [still, still, frames[3], frames[3], frames[3]]:  # a change, then still: the strength moves
        want = eager.step([(moving_pair[0], frame)]).outputs[0]
        assert torch.equal(want, recorded.step([(moving_pair[1], frame)]).outputs[0])
        strengths.append(moving_pair[1].strength)
    assert len(set(strengths[2:])) >= 2  # timesteps changed while the layout replayed (steps 3 to 5)
    assert len(layouts) == 2 and recorder.recorded == 2 * len(STAGES)
    run_both(eager, recorded, [banked, moving, plain], frames[4:7])
    assert len(layouts) == 3 and recorder.recorded == 3 * len(STAGES)  # a bank in a three-stream step: recorded


@pytest.mark.timeout(900)  # 1-3 min each on 2 idle cores; a loaded machine took longer than the default 300 s
def test_a_bank_filling_up_and_param_changes_replay_the_recording_of_their_layout(tiny_parts, frames) -> None:
    """A bank of 3 is recorded at its stream's second frame (1 frame kept), then fills to 3 while the
    recording replays; prompt, strength, weight and seed changes (a new seed empties the bank: a new
    ring of the same size) replay it too, every frame equal to eager torch's. Only another bank size
    is another layout."""
    eager, recorded, recorder = engines(tiny_parts, feature_bank=True)
    params = StreamParams(prompt="a red fox", seed=1, temporal_bank=3, temporal_weight=1.5)
    pair = (eager.open_stream(params), recorded.open_stream(params))
    fills = []

    def step(frame: torch.Tensor) -> None:
        want = eager.step([(pair[0], frame)]).outputs[0]
        assert torch.equal(want, recorded.step([(pair[1], frame)]).outputs[0])
        assert pair[1].bank is not None
        fills.append(pair[1].bank.filled((0, 0)))

    for frame in frames[:4]:
        step(frame)
    assert fills == [1, 2, 3, 3] and recorder.recorded == len(STAGES)  # recorded at frame 2, replayed as it filled
    replayed = recorder.replayed
    changes = [params.replace(prompt="a city"), params.replace(strength=0.7), params.replace(temporal_weight=0.5),
               params.replace(seed=7)]  # fmt: skip
    for change, frame in zip(changes, frames[4:]):
        for engine, stream in zip((eager, recorded), pair):
            engine.update(stream, change)
        step(frame)
    assert fills[-1] == 1  # the new seed's frame started an empty bank
    assert recorder.recorded == len(STAGES) and recorder.replayed == replayed + len(changes) * len(STAGES)
    for engine, stream in zip((eager, recorded), pair):
        engine.update(stream, params.replace(seed=7, temporal_bank=1))
    for frame in frames[:2]:
        step(frame)
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    assert sorted(layout[4] for layout in graphs.layouts) == [(1,), (3,)] and recorder.recorded == 2 * len(STAGES)


def _buffers(engine: StreamEngine) -> list[torch.Tensor]:
    graphs: StepGraphs = engine.backend.graphs  # type: ignore[attr-defined]
    return [t for stages in graphs.layouts.values() for t in stages._buffers]


# -- the bookkeeping alone ---------------------------------------------------------------------------


def test_a_layout_is_recorded_the_second_time_and_at_most_max_layouts_are_kept(caplog) -> None:
    graphs = StepGraphs(HostReplay(), eager_runs=1, max_layouts=2)
    assert graphs.stages(None) is EAGER
    assert graphs.stages("a") is EAGER
    a = graphs.stages("a")
    assert isinstance(a, RecordedStages) and graphs.stages("a") is a
    graphs.stages("b")
    assert isinstance(graphs.stages("b"), RecordedStages)
    with caplog.at_level(logging.WARNING, logger="livediff.backends.cuda_graph"):
        graphs.stages("c")
        assert graphs.stages("c") is EAGER and graphs.stages("c") is EAGER
    assert len(graphs.layouts) == 2
    assert sum("further ones run eagerly" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="eager_runs"):
        StepGraphs(HostReplay(), eager_runs=-1)


def test_a_stage_takes_the_previous_stage_output_as_is_and_copies_other_inputs() -> None:
    stages = RecordedStages("layout", HostReplay())
    x, y = torch.arange(4.0), torch.ones(4)
    doubled = stages.run("double", lambda t: t * 2, x)
    summed = stages.run("add", lambda a, b: a + b, doubled, y)
    assert torch.equal(summed, torch.tensor([1.0, 3.0, 5.0, 7.0]))
    add = stages._recordings["add"]
    assert add.inputs[0] is doubled and add.inputs[1] is not y  # y was copied into a static buffer
    y.fill_(10.0)  # the caller's tensor changing does not reach the recording until passed again
    stages.run("double", lambda t: t * 2, torch.full((4,), 3.0))
    again = stages.run("add", None, doubled, torch.zeros(4))  # type: ignore[arg-type]  # replays: fn unused
    assert again is summed and torch.equal(again, torch.full((4,), 6.0))


def test_replaying_with_another_shape_or_a_changed_argument_is_refused() -> None:
    stages = RecordedStages(("layout", 1), HostReplay())
    stages.run("scale", lambda t, k: t * k, torch.ones(3), 2.0)
    with pytest.raises(ValueError, match=r"stage 'scale' of layout \('layout', 1\) was recorded with input 0 as "
                                         r"torch.float32 \(3,\), got torch.float32 \(4,\)"):  # fmt: skip
        stages.run("scale", None, torch.ones(4), 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input 1 = 2.0, got 3.0"):
        stages.run("scale", None, torch.ones(3), 3.0)  # type: ignore[arg-type]


def test_a_failed_recording_names_the_stage_and_layout() -> None:
    def refuse(run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(GraphCaptureError, match="stage 'unet' of layout 4 could not be recorded: operation not"):
        RecordedStages(4, refuse).run("unet", lambda t: t, torch.ones(1))


# -- off CUDA ---------------------------------------------------------------------------------------


def test_cuda_graph_is_refused_off_cuda_before_any_model_is_loaded() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(BackendUnavailable, match="cuda-graph backend needs the engine on a CUDA GPU"):
        resolve_backend("cuda-graph", cpu)
    with pytest.raises(BackendUnavailable, match="its device is cpu"):
        require_cuda(cpu)
    with pytest.raises(BackendUnavailable, match="cuda-graph"):  # a model that does not exist is never looked up
        StreamEngine(EngineSettings(model="no/such-model", device="cpu", backend="cuda-graph"))


def test_cli_names_the_backend_off_cuda(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    for argv in (["bench", "--model", "tiny", "--size", "64", "--frames", "1", "--backend", "torch,cuda-graph"],
                 ["serve", "--model", "tiny", "--backend", "cuda-graph", "--port", "0"]):  # fmt: skip
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("livediff: error: cuda-graph backend needs the engine on a CUDA GPU")
        assert "\n" not in err


def test_steps_with_a_controlnet_are_recorded_with_the_torch_backends_frames(tiny_parts, frames) -> None:
    """Which ControlNets run on which rows is part of the layout, their images and scales are tensors
    copied in: such steps are recorded like the others (their ControlNets then timed within `unet`)."""
    from livediff.config import ControlParams

    eager, recorded, recorder = engines(tiny_parts, controlnets=(("edges", "tiny"),))
    controlled = StreamParams(prompt="a red fox", seed=1, controlnet=(ControlParams("edges", scale=0.8),))
    for engine in (eager, recorded):
        for future in engine.control_loads(controlled).values():
            future.result(timeout=120)
    pairs = [(eager.open_stream(p), recorded.open_stream(p)) for p in (controlled, StreamParams(seed=3))]
    for index, frame in enumerate(frames[:3]):
        expected = eager.step([(a, frame) for a, _ in pairs])
        got = recorded.step([(b, frame) for _, b in pairs])
        assert all(torch.equal(want, have) for want, have in zip(expected.outputs, got.outputs))
        assert "canny" in got.timings_ms and ("controlnet" in got.timings_ms) == (index == 0)  # eager first
    assert recorder.recorded == len(STAGES) and len(recorded.backend.graphs.layouts) == 1  # type: ignore[attr-defined]
    run_both(eager, recorded, [StreamParams(seed=3), StreamParams(seed=4)], frames[:3])
    assert recorder.recorded == 2 * len(STAGES)  # without the ControlNet: another layout
