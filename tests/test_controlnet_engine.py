"""ControlNet conditioning in the engine: per stream, batched across streams with different ControlNets,
scales or none, switched live, loaded off the frame path; on torch and on the compiled backends."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from livediff.backends import create_controlnet
from livediff.config import ControlParams, EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.stream import Stream
from livediff.errors import ConfigError
from livediff.models import ModelParts
from livediff.synthetic import SyntheticCamera

SIZE = 64
CONTROLNETS = (("edges", "tiny"), ("other", "tiny"))


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE, seed=3).frames(3)]


def _settings(**changes: Any) -> EngineSettings:
    return EngineSettings(model="tiny", height=SIZE, width=SIZE, controlnets=CONTROLNETS, depth_model="tiny",
                          **changes)  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny_parts: ModelParts) -> StreamEngine:
    engine = StreamEngine(_settings(), tiny_parts)
    ready(engine, StreamParams(controlnet=(ControlParams("edges", "depth"), ControlParams("other"))))
    return engine


def ready(engine: StreamEngine, params: StreamParams) -> StreamParams:
    """`params`, once every ControlNet and model they name has loaded."""
    for future in engine.control_loads(params).values():
        future.result(timeout=300)
    return params


def edges(scale: float = 1.0, preprocessor: str = "canny", name: str = "edges", **more: Any) -> StreamParams:
    return StreamParams(seed=7, controlnet=(ControlParams(name, preprocessor, scale, **more),))


def run(engine: StreamEngine, params: Sequence[StreamParams], frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last frame's outputs of streams with `params`, stepped together."""
    streams = [engine.open_stream(p) for p in params]
    for frame in frames:
        outputs = engine.step([(s, frame) for s in streams]).outputs
    return [o.int() for o in outputs]


def test_a_controlnet_changes_the_output_and_its_control_image_matters(
    engine: StreamEngine, frames: list[torch.Tensor]
) -> None:
    plain, canny, depth = run(engine, [StreamParams(seed=7), edges(), edges(preprocessor="depth")], frames)
    assert (canny - plain).abs().float().mean().item() > 2.0
    # the same ControlNet, scale and frame; only the control image differs
    assert (canny - depth).abs().float().mean().item() > 2.0


def test_scale_zero_gives_the_output_without_controlnet(engine: StreamEngine, frames: list[torch.Tensor]) -> None:
    (plain,) = run(engine, [StreamParams(seed=7)], frames)
    (zero,) = run(engine, [edges(scale=0.0)], frames)
    assert (zero - plain).abs().max().item() <= 1  # zero residuals: the same UNet, up to summation order


def test_a_controlnet_outside_its_steps_does_nothing(engine: StreamEngine, frames: list[torch.Tensor]) -> None:
    two_steps = StreamParams(seed=7, steps=2, strength=0.8)
    (plain,) = run(engine, [two_steps], frames)
    first_half = two_steps.replace(controlnet=(ControlParams("edges", end=0.5),))
    (whole,) = run(engine, [two_steps.replace(controlnet=(ControlParams("edges"),))], frames)
    (half,) = run(engine, [first_half], frames)
    (never,) = run(engine, [two_steps.replace(controlnet=(ControlParams("edges", start=0.6),))], frames)
    assert (never - plain).abs().max().item() == 0  # start 0.6 of 2 steps: step 1 starts at 0.5, ends 1.0 -> off
    assert (half - plain).abs().float().mean().item() > 1.0 and (half - whole).abs().float().mean().item() > 0.5


def test_streams_with_different_controlnets_share_a_step_and_each_gets_its_own_result(
    engine: StreamEngine, frames: list[torch.Tensor]
) -> None:
    mixed = [
        StreamParams(seed=1),
        edges(scale=1.0),
        StreamParams(seed=3, controlnet=(ControlParams("other", "depth", 0.5),)),
        StreamParams(seed=4, controlnet=(ControlParams("edges", "previous", 1.5), ControlParams("other", scale=0.7))),
    ]
    together = run(engine, mixed, frames)
    for params, output in zip(mixed, together):
        (alone,) = run(engine, [params], frames)
        assert (output - alone).abs().max().item() <= 1, params.controlnet


def test_guidance_and_stream_batch_rows_get_their_streams_controlnets(tiny_parts: ModelParts,
                                                                      frames: list[torch.Tensor]) -> None:  # fmt: skip
    engine = StreamEngine(_settings(stream_batch=True), tiny_parts)
    ready(engine, edges())
    guided = StreamParams(seed=2, guidance=2.0, negative_prompt="blur", steps=2, strength=0.9)
    mixed = [guided, guided.replace(controlnet=edges().controlnet), edges().replace(steps=2, strength=0.9)]
    together = run(engine, mixed, frames)
    for params, output in zip(mixed, together):
        (alone,) = run(engine, [params], frames)
        assert (output - alone).abs().max().item() <= 1
    assert (together[0] - together[1]).abs().float().mean().item() > 1.0


def test_a_live_switch_applies_on_the_next_frame_with_no_reload(engine: StreamEngine,
                                                                frames: list[torch.Tensor]) -> None:  # fmt: skip
    loads = dict(engine.controls._loads)
    stream = engine.open_stream(StreamParams(seed=7))
    engine.step([(stream, frames[0])])
    for params in (edges(), edges(name="other", preprocessor="depth", scale=0.6), StreamParams(seed=7)):
        engine.update(stream, params)
        output = engine.step([(stream, frames[1])]).outputs[0].int()
        (fresh,) = run(engine, [params], frames[1:2])
        assert torch.equal(output, fresh), params.controlnet
    assert engine.controls._loads == loads  # switching among loaded ControlNets started no load


def test_a_controlnet_loads_off_the_frame_path_and_applies_once_ready(tiny_parts: ModelParts,
                                                                      frames: list[torch.Tensor]) -> None:  # fmt: skip
    gate = threading.Event()

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        assert threading.current_thread() is not threading.main_thread()  # never on the engine's thread
        gate.wait(timeout=60)
        return create_controlnet(*args, **kwargs)

    engine = StreamEngine(_settings(), tiny_parts)
    engine.controls._create = slow_create
    stream = engine.open_stream(edges())
    loads = engine.control_loads(edges())
    assert list(loads) == [("controlnet", "edges")] and engine.controls.state(("controlnet", "edges")) == "loading"
    (plain,) = run(engine, [StreamParams(seed=7)], frames[:1])
    while_loading = engine.step([(stream, frames[0])]).outputs[0].int()
    assert torch.equal(while_loading, plain)  # the frame did not wait: it ran without the ControlNet
    gate.set()
    loads[("controlnet", "edges")].result(timeout=120)
    assert engine.control_loads(edges()) == {}
    applied = engine.step([(stream, frames[0])]).outputs[0].int()
    (expected,) = run(engine, [edges()], frames[:1])
    assert torch.equal(applied, expected) and not torch.equal(applied, plain)
    assert stream.control_image is not None and stream.control_image.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("controls", "field", "message"),
    [
        ((ControlParams("nope"),), "controlnet[0].name", "not one of this engine's ControlNets: edges, other"),
        ((ControlParams("edges"), ControlParams("missing")), "controlnet[1].name", "'missing'"),
    ],
)
def test_unknown_controlnets_are_refused_naming_the_field(engine: StreamEngine, controls: tuple, field: str,
                                                          message: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=f"^{re.escape(field)} .*{re.escape(message)}"):
        engine.open_stream(StreamParams(controlnet=controls))
    stream = engine.open_stream(StreamParams())
    with pytest.raises(ConfigError, match=re.escape(field)):
        engine.update(stream, StreamParams(controlnet=controls))
    assert stream.params == StreamParams()  # a refused change leaves the stream as it was


def test_an_engine_without_controlnets_or_depth_model_says_how_to_get_them(tiny_parts: ModelParts) -> None:
    plain = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE), tiny_parts)
    with pytest.raises(ConfigError, match=r"controlnet\[0\]\.name .*none \(start it with --controlnet"):
        plain.open_stream(edges())
    no_depth = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE, controlnets=CONTROLNETS), tiny_parts)
    with pytest.raises(ConfigError, match=r"controlnet\[0\]\.preprocessor depth needs a depth model"):
        no_depth.open_stream(edges(preprocessor="depth"))


def test_a_controlnet_that_fails_to_load_is_reported_and_then_refused(tiny_parts: ModelParts, tmp_path: Path) -> None:
    engine = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE,
                                         controlnets=(("broken", str(tmp_path)),)), tiny_parts)  # fmt: skip
    stream = engine.open_stream(edges(name="broken"))
    (future,) = engine.control_loads(stream.params).values()
    with pytest.raises(Exception, match="not a diffusers ControlNet folder"):
        future.result(timeout=60)
    assert engine.controls.state(("controlnet", "broken")) == "failed"
    assert engine.step([(stream, torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8))]).outputs[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(ConfigError, match=r"controlnet\[0\]\.name 'broken' could not be loaded"):
        engine.open_stream(edges(name="broken"))  # a new stream is told at once
    other = engine.open_stream(StreamParams(seed=7))
    with pytest.raises(ConfigError, match=r"controlnet\[0\]\.name 'broken' could not be loaded"):
        engine.update(other, edges(name="broken"))  # and so is one that adds it
    # the stream that named it before it failed (its client was told) still changes everything else
    engine.update(stream, replace(edges(name="broken", scale=0.5), prompt="a charcoal drawing"))
    assert engine.step([(stream, torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8))]).outputs[0].shape == (SIZE, SIZE, 3)


def test_loads_dropped_at_close_are_started_again_when_asked_for(tiny_parts: ModelParts) -> None:
    gate = threading.Event()

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        gate.wait(timeout=60)
        return create_controlnet(*args, **kwargs)

    engine = StreamEngine(_settings(), tiny_parts)
    engine.controls._create = slow_create
    both = StreamParams(controlnet=(ControlParams("edges"), ControlParams("other")))
    loads = engine.control_loads(both)  # one loader thread: "other" waits behind "edges"
    engine.close()
    assert loads[("controlnet", "other")].cancelled()
    assert engine.controls.state(("controlnet", "other")) == "unloaded"
    engine.check_params(both)  # a dropped load is no failure: nothing is refused for it
    gate.set()
    loads[("controlnet", "edges")].result(timeout=120)  # the load under way finished
    for future in engine.control_loads(both).values():  # "other" starts again on a new loader thread
        future.result(timeout=120)
    assert engine.control_loads(both) == {} and engine.controls.state(("controlnet", "other")) == "ready"


def test_the_steps_timings_name_the_preprocessors_and_the_controlnet(engine: StreamEngine,
                                                                     frames: list[torch.Tensor]) -> None:  # fmt: skip
    params = [edges(), StreamParams(controlnet=(ControlParams("other", "depth"),))]
    streams: list[Stream] = [engine.open_stream(p) for p in params]
    timings = engine.step([(s, frames[0]) for s in streams]).timings_ms
    assert {"canny", "depth", "controlnet", "unet"} <= set(timings)
    assert all(ms >= 0 for ms in timings.values())
    plain = engine.step([(engine.open_stream(StreamParams()), frames[0])]).timings_ms
    assert not {"canny", "depth", "controlnet"} & set(plain)


@pytest.mark.slow  # exports the residual UNet and a ControlNet for each runtime, checked against torch
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_compiled_backends_run_controlnets_as_torch_does(backend: str, tiny_parts: ModelParts, engine: StreamEngine,
                                                         frames: list[torch.Tensor],
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    if backend == "openvino":
        pytest.importorskip("openvino")
    engines_dir = tmp_path_factory.getbasetemp() / "controlnet-engines"
    compiled = StreamEngine(_settings(backend=backend, engines_dir=engines_dir), tiny_parts)
    mixed = [StreamParams(seed=1), edges(), StreamParams(seed=3, controlnet=(ControlParams("other", "depth", 0.5),))]
    for params in mixed:
        ready(compiled, params)
    ours, theirs = run(compiled, mixed, frames), run(engine, mixed, frames)
    for a, b in zip(ours, theirs):  # float32 both sides: a level at a rounding boundary may move
        assert (a - b).abs().max().item() <= 1
