from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.schedule import C_OUT, C_SKIP, NoiseSchedule
from livediff.synthetic import SyntheticCamera

SIZE = 64


@pytest.fixture()
def engine(tiny_parts) -> StreamEngine:
    return StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE), parts=tiny_parts)


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE).frames(12)]


def run(engine: StreamEngine, params: StreamParams, frame: torch.Tensor) -> torch.Tensor:
    return engine.step([(engine.open_stream(params), frame)]).outputs[0]


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_output_is_a_frame_of_the_same_shape_and_not_the_input(engine, frames) -> None:
    result = engine.step([(engine.open_stream(), frames[0])])
    out = result.outputs[0]
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert differ(out, frames[0]) > 5
    assert result.skipped == [False]
    assert set(result.timings_ms) == {"preprocess", "encode", "unet", "decode", "postprocess"}
    assert all(ms >= 0 for ms in result.timings_ms.values())


def test_same_seed_same_output_other_seed_other_output(engine, frames) -> None:
    a = run(engine, StreamParams(seed=7), frames[0])
    b = run(engine, StreamParams(seed=7), frames[0])
    c = run(engine, StreamParams(seed=8), frames[0])
    assert torch.equal(a, b)
    assert differ(a, c) > 0.5


def test_prompt_change_takes_effect_on_the_next_frame(engine, frames) -> None:
    stream = engine.open_stream(StreamParams(prompt="a red fox"))
    before = engine.step([(stream, frames[0])]).outputs[0]
    engine.update(stream, StreamParams(prompt="a city at night"))
    after = engine.step([(stream, frames[0])]).outputs[0]
    assert differ(before, after) > 0.5
    assert torch.equal(after, run(engine, StreamParams(prompt="a city at night"), frames[0]))


def test_conditioning_cache_counts_hits_and_misses(engine) -> None:
    cache = engine.conditioning
    hits, misses = cache.hits, cache.misses
    engine.open_stream(StreamParams(prompt="one"))
    engine.open_stream(StreamParams(prompt="one"))
    engine.open_stream(StreamParams(prompt="two"))
    assert (cache.hits - hits, cache.misses - misses) == (1, 2)


def test_cache_evicts_least_recently_used(tiny_parts) -> None:
    engine = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE, cache_size=2), parts=tiny_parts)
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        engine.conditioning.get(prompt)
    misses = engine.conditioning.misses
    engine.conditioning.get("a")
    assert engine.conditioning.misses == misses
    engine.conditioning.get("b")
    assert engine.conditioning.misses == misses + 1
    assert len(engine.conditioning) == 2


def test_batch_of_two_streams_gives_each_its_own_prompt(engine, frames) -> None:
    fox, city = StreamParams(prompt="a red fox"), StreamParams(prompt="a city at night", seed=3)
    result = engine.step([(engine.open_stream(fox), frames[0]), (engine.open_stream(city), frames[0])])
    assert differ(result.outputs[0], result.outputs[1]) > 0.5
    # batching changes nothing but speed: each equals its single-frame run (within float reordering)
    for out, params in zip(result.outputs, (fox, city)):
        assert differ(out, run(engine, params, frames[0])) < 0.05


def test_streams_with_different_step_counts_share_a_step(engine, frames) -> None:
    one, three = StreamParams(steps=1), StreamParams(steps=3, strength=0.9)
    result = engine.step([(engine.open_stream(one), frames[1]), (engine.open_stream(three), frames[1])])
    assert differ(result.outputs[0], run(engine, one, frames[1])) < 0.05
    assert differ(result.outputs[1], run(engine, three, frames[1])) < 0.05


def test_prompt_blend_moves_between_the_two_prompts(engine, frames) -> None:
    a = run(engine, StreamParams(prompt="a red fox"), frames[0])
    b = run(engine, StreamParams(prompt="a city at night"), frames[0])
    half = run(engine, StreamParams(prompt="a red fox", blend_prompt="a city at night", blend_weight=0.5), frames[0])
    full = run(engine, StreamParams(prompt="a red fox", blend_prompt="a city at night", blend_weight=1.0), frames[0])
    assert torch.equal(full, b)
    assert differ(half, a) > 0.1 and differ(half, b) > 0.1


def test_guidance_uses_the_negative_prompt_and_mixes_with_unguided_streams(engine, frames) -> None:
    plain = StreamParams(prompt="a red fox")
    guided = StreamParams(prompt="a red fox", negative_prompt="blurry", guidance=4.0)
    assert differ(run(engine, plain, frames[0]), run(engine, guided, frames[0])) > 0.5
    result = engine.step([(engine.open_stream(plain), frames[0]), (engine.open_stream(guided), frames[0])])
    assert differ(result.outputs[0], run(engine, plain, frames[0])) < 0.05
    assert differ(result.outputs[1], run(engine, guided, frames[0])) < 0.05


def test_long_prompt_is_truncated_and_says_so(engine) -> None:
    stream = engine.open_stream(StreamParams(prompt="word " * 200))
    assert stream.conditioning.truncated
    assert not engine.open_stream(StreamParams(prompt="short")).conditioning.truncated


def test_similarity_filter_skips_identical_frames_within_its_bound(engine, frames) -> None:
    params = StreamParams(similarity_filter=True, max_skip_frames=3)
    stream = engine.open_stream(params)
    outputs = [engine.step([(stream, frames[0])]) for _ in range(12)]
    skipped = [r.skipped[0] for r in outputs]
    assert skipped[0] is False
    assert sum(skipped) >= 6  # identical input: every frame may be skipped but for the bound
    run_length = longest = 0
    for skip in skipped:
        run_length = run_length + 1 if skip else 0
        longest = max(longest, run_length)
    assert longest <= 3
    for result in outputs[1:]:
        if result.skipped[0]:
            assert torch.equal(result.outputs[0], outputs[0].outputs[0])
    assert stream.skipped == sum(skipped) and stream.frames == 12


def test_similarity_filter_lets_moving_frames_through(engine, frames) -> None:
    stream = engine.open_stream(StreamParams(similarity_filter=True))
    skipped = [engine.step([(stream, frame)]).skipped[0] for frame in frames]
    assert sum(skipped) <= 2


def test_similarity_filter_is_off_by_default(engine, frames) -> None:
    stream = engine.open_stream()
    assert not any(engine.step([(stream, frames[0])]).skipped[0] for _ in range(4))


def test_passthrough_returns_the_input_unchanged_without_running_the_networks(engine, frames) -> None:
    stream = engine.open_stream(StreamParams(passthrough=True, similarity_filter=True))
    for frame in (frames[0], frames[0], frames[1]):
        result = engine.step([(stream, frame)])
        assert torch.equal(result.outputs[0], frame)
        assert result.skipped == [False] and result.timings_ms == {}  # not a skip, no device work
    assert stream.frames == 3 and stream.skipped == 0 and stream.last_output is None


def test_a_batch_mixing_passthrough_and_model_frames_gives_each_its_own_output(engine, frames) -> None:
    model = StreamParams(prompt="a red fox")
    through = engine.open_stream(StreamParams(passthrough=True))
    result = engine.step([(through, frames[2]), (engine.open_stream(model), frames[3]), (through, frames[4])])
    assert torch.equal(result.outputs[0], frames[2]) and torch.equal(result.outputs[2], frames[4])
    assert differ(result.outputs[1], run(engine, model, frames[3])) < 0.05
    assert result.skipped == [False] * 3 and "unet" in result.timings_ms


def test_stream_batch_matches_sequential_steps_once_its_pipeline_is_full(tiny_parts, frames) -> None:
    params = StreamParams(steps=2, strength=0.8)
    settings = EngineSettings(model="tiny", height=SIZE, width=SIZE)
    sequential = StreamEngine(settings, parts=tiny_parts)
    batched = StreamEngine(settings.replace(stream_batch=True), parts=tiny_parts)
    stream = batched.open_stream(params)
    outputs = [batched.step([(stream, frames[0])]).outputs[0] for _ in range(3)]
    expected = run(sequential, params, frames[0])
    assert differ(outputs[2], expected) < 0.05
    assert stream.pending is not None and stream.pending.shape[0] == 1


def test_bad_frames_are_refused_clearly(engine) -> None:
    stream = engine.open_stream()
    with pytest.raises(ValueError, match="uint8 tensors of shape"):
        engine.step([(stream, torch.zeros((SIZE, SIZE + 8, 3), dtype=torch.uint8))])
    with pytest.raises(ValueError, match="uint8"):
        engine.step([(stream, torch.zeros((SIZE, SIZE, 3)))])
    with pytest.raises(ValueError, match="batch of 5"):
        engine.step([(stream, torch.zeros((SIZE, SIZE, 3), dtype=torch.uint8))] * 5)


def test_lcm_schedule_uses_the_consistency_boundary(tiny_parts) -> None:
    lcm = LCMScheduler.from_config(tiny_parts.scheduler.config)
    table = NoiseSchedule(lcm, torch.device("cpu")).table
    assert table[C_SKIP, 0] == pytest.approx(1.0) and table[C_OUT, 0] == pytest.approx(0.0)
    assert table[C_SKIP, 999] == pytest.approx(0.0, abs=1e-6) and table[C_OUT, 999] == pytest.approx(1.0, abs=1e-4)
    euler = NoiseSchedule(tiny_parts.scheduler, torch.device("cpu")).table
    assert torch.all(euler[C_SKIP] == 0) and torch.all(euler[C_OUT] == 1)
