"""The temporal feature bank in the engine (torch backend): what changes with it, and what must not."""

from __future__ import annotations

import math

import pytest
import torch

from livediff.backends.modules import UNet
from livediff.backends.temporal_attention import EMPTY_SLOT, TemporalBank, bank_layers
from livediff.backends.unet_extras import ExtrasUNet, UNetExtras
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.stream import bank_rule
from livediff.errors import ConfigError
from livediff.synthetic import SyntheticCamera

SIZE = 64


@pytest.fixture()
def engine(tiny_parts) -> StreamEngine:  # type: ignore[no-untyped-def]
    return StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE, feature_bank=True), parts=tiny_parts)


@pytest.fixture()
def plain_engine(tiny_parts) -> StreamEngine:  # type: ignore[no-untyped-def]
    return StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE), parts=tiny_parts)


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    camera = SyntheticCamera(SIZE, SIZE, still_background=True, noise=2.0)
    return [torch.from_numpy(f) for f in camera.frames(6)]


def run(engine: StreamEngine, params: list[StreamParams], frames: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every stream's outputs, all streams in one step per frame."""
    streams = [engine.open_stream(p) for p in params]
    outputs: list[list[torch.Tensor]] = [[] for _ in params]
    for frame in frames:
        for out, image in zip(outputs, engine.step([(s, frame) for s in streams]).outputs):
            out.append(image)
    return outputs


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_layers_follow_the_unet_levels(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    layers = bank_layers(tiny_parts.unet, 512, 256)
    # tiny: self-attention only at the second level (1/16 of the frame), 64 channels
    assert [layer.tokens for layer in layers] == [32 * 16] * 4 and {layer.channels for layer in layers} == {64}
    assert [layer.name.split(".")[0] for layer in layers] == ["down_blocks", "up_blocks", "up_blocks", "mid_block"]
    # odd latent sizes round up as the stride-2 convolutions do: 72 px -> 9 latents -> 5
    assert bank_layers(tiny_parts.unet, 72, 72)[0].tokens == 25


def test_a_stream_without_a_bank_gets_exactly_what_it_got_before(engine, plain_engine, frames) -> None:
    before = run(plain_engine, [StreamParams(seed=1), StreamParams(seed=2)], frames)
    after = run(engine, [StreamParams(seed=1), StreamParams(seed=2)], frames)
    assert same(before[0], after[0]) and same(before[1], after[1])


def test_beside_a_stream_with_a_bank_too(engine, plain_engine, frames) -> None:
    """One step, one UNet call per denoising step: the bankless row is split from the banked one."""
    alone = run(plain_engine, [StreamParams(seed=1), StreamParams(seed=2)], frames)
    mixed = run(engine, [StreamParams(seed=1), StreamParams(seed=2, temporal_bank=2)], frames)
    assert same(alone[0], mixed[0])
    assert not same(alone[1], mixed[1])


def test_the_bank_changes_frames_only_once_it_holds_one(engine, plain_engine, frames) -> None:
    (off,) = run(plain_engine, [StreamParams()], frames)
    (on,) = run(engine, [StreamParams(temporal_bank=1)], frames)
    assert torch.equal(off[0], on[0])  # the first frame has an empty bank: the same attention
    changed = [(a.float() - b.float()).abs().max().item() for a, b in zip(off[1:], on[1:])]
    assert all(c > 0 for c in changed), changed


def test_streams_with_different_banks_share_a_step(engine, frames) -> None:
    params = [StreamParams(seed=3, temporal_bank=1), StreamParams(seed=4, temporal_bank=3, temporal_weight=2.0),
              StreamParams(seed=5)]  # fmt: skip
    together = run(engine, params, frames)
    for p, outputs in zip(params, together):
        (alone,) = run(engine, [p], frames)
        # the same math; another batch size may sum in another order: at most a level of 255 apart
        for a, b in zip(alone, outputs):
            assert (a.float() - b.float()).abs().max().item() <= 1.0


def test_the_bank_attends_to_earlier_frames_keys_and_values(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    """A bank holding the current frame's own keys and values twice over at weight w is the same as
    weight 2w of one copy, and as attending to nothing new at weight -> 0."""
    layers = bank_layers(tiny_parts.unet, SIZE, SIZE)
    feature = TemporalBank(layers)
    unet = ExtrasUNet(tiny_parts.unet, UNetExtras((feature,)))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
    t, e = torch.tensor([499.0]), torch.randn(1, 77, 32, generator=generator)
    zeros = {f"bank_kv_{i}": torch.zeros(1, 1, 2, la.tokens, la.channels) for i, la in enumerate(layers)}
    empty = {"bank_bias": torch.full((1, 1), EMPTY_SLOT), **zeros}
    with torch.inference_mode():
        plain = UNet(tiny_parts.unet)(x, t, e)
        first, own = unet.call(x, t, e, empty)
        assert torch.equal(first, plain)
        assert set(own) == {f"bank_new_{i}" for i in range(len(layers))}
        # own keys and values in the bank: attention over [k; k] with weights 1 and w is attention over k
        for w in (0.5, 1.0, 3.0):
            bank = {"bank_bias": torch.full((1, 1), math.log(w)),
                    **{f"bank_kv_{i}": own[f"bank_new_{i}"][:, None] for i in range(len(layers))}}  # fmt: skip
            echoed, _ = unet.call(x, t, e, bank)
            assert (echoed - plain).abs().max().item() < 1e-4
        # someone else's keys and values do change the prediction, and more with more weight
        other = {f"bank_kv_{i}": torch.randn(1, 1, 2, la.tokens, la.channels, generator=generator) * 3
                 for i, la in enumerate(layers)}  # fmt: skip
        moved = [(unet.call(x, t, e, {"bank_bias": torch.full((1, 1), math.log(w)), **other})[0] - plain).abs().mean()
                 for w in (0.1, 1.0, 10.0)]  # fmt: skip
    assert 0 < moved[0] < moved[1] < moved[2]


def test_memory_per_stream(engine, frames) -> None:
    stream = engine.open_stream(StreamParams(temporal_bank=2, steps=2))
    assert stream.bank is not None and stream.bank.nbytes == 0  # allocated on first use
    for frame in frames[:3]:
        engine.step([(stream, frame)])
    assert engine.bank_feature is not None
    per_frame = engine.bank_feature.bytes_per_frame(engine.dtype)
    assert per_frame == 4 * 2 * 16 * 64 * 4  # tiny at 64x64: 4 layers, keys+values, 4x4 tokens, 64 ch, float32
    assert stream.bank.nbytes == 2 * 2 * per_frame  # 2 frames x 2 steps


def test_guidance_keeps_a_slot_per_branch(engine, frames) -> None:
    stream = engine.open_stream(StreamParams(temporal_bank=1, guidance=3.0, negative_prompt="blurry"))
    engine.step([(stream, frames[0])])
    assert stream.bank is not None and set(stream.bank.rings) == {(0, 0), (0, 1)}


def test_stream_batch_and_similarity_filter_keep_working(tiny_parts, frames) -> None:  # type: ignore[no-untyped-def]
    settings = EngineSettings(model="tiny", height=SIZE, width=SIZE, feature_bank=True, stream_batch=True)
    engine = StreamEngine(settings, parts=tiny_parts)
    stream = engine.open_stream(StreamParams(steps=3, strength=0.8, temporal_bank=2))
    for frame in frames:
        out = engine.step([(stream, frame)]).outputs[0]
        assert out.shape == (SIZE, SIZE, 3)
    assert stream.bank is not None and set(stream.bank.rings) == {(0, 0), (1, 0), (2, 0)}
    assert all(ring.filled == 2 for ring in stream.bank.rings.values())

    still = engine.open_stream(StreamParams(temporal_bank=1, similarity_filter=True, similarity_threshold=0.5,
                                            max_skip_frames=100))  # fmt: skip
    results = [engine.step([(still, frames[0])]) for _ in range(5)]
    assert any(r.skipped[0] for r in results)
    assert still.bank is not None and still.bank.rings[(0, 0)].filled == 1  # skipped frames keep the bank as is


def test_prompt_changes_keep_the_bank_seed_changes_drop_it(engine, frames) -> None:
    params = StreamParams(temporal_bank=2)
    stream = engine.open_stream(params)
    for frame in frames[:2]:
        engine.step([(stream, frame)])
    bank = stream.bank
    engine.update(stream, params.replace(prompt="a charcoal sketch", temporal_weight=3.0, strength=0.6))
    assert stream.bank is bank and bank is not None and bank.weight == 3.0 and bank.rings[(0, 0)].filled == 2
    engine.update(stream, params.replace(seed=9))
    assert stream.bank is not bank and stream.bank is not None and stream.bank.nbytes == 0
    engine.update(stream, params.replace(seed=9, temporal_bank=0))
    assert stream.bank is None
    assert bank_rule(params, params.replace(steps=2)) == "drop"
    assert bank_rule(params, params.replace(guidance=2.0)) == "drop"
    assert bank_rule(params, params.replace(blend_prompt="x", blend_weight=0.5)) == "keep"


def test_an_engine_without_the_feature_names_it(plain_engine) -> None:
    with pytest.raises(ConfigError, match="temporal_bank needs an engine started with the feature bank"):
        plain_engine.open_stream(StreamParams(temporal_bank=1))
    stream = plain_engine.open_stream()
    with pytest.raises(ConfigError, match="temporal_bank"):
        plain_engine.update(stream, StreamParams(temporal_bank=1))


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"temporal_bank": 5}, "temporal_bank"), ({"temporal_bank": -1}, "temporal_bank"),
     ({"temporal_bank": True}, "temporal_bank"), ({"temporal_weight": 0.0}, "temporal_weight"),
     ({"temporal_weight": 11.0}, "temporal_weight")],
)  # fmt: skip
def test_params_are_validated(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        StreamParams(**changes)  # type: ignore[arg-type]


# -- motion-aware strength -------------------------------------------------------------------------


def test_motion_aware_strength_follows_the_scene(plain_engine) -> None:
    params = StreamParams(seed=5, motion_strength=(0.3, 0.7))
    stream = plain_engine.open_stream(params)
    still = torch.from_numpy(SyntheticCamera(SIZE, SIZE, still_background=True).frame(0))
    for _ in range(3):
        out = plain_engine.step([(stream, still)]).outputs[0]
    assert stream.strength == 0.7  # a still scene: the high bound
    fixed = plain_engine.open_stream(StreamParams(seed=5, strength=0.7))
    assert torch.equal(out, plain_engine.step([(fixed, still)]).outputs[0])
    drifting = [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE).frames(12)]  # every pixel moves
    seen = []
    for frame in drifting:
        plain_engine.step([(stream, frame)])
        seen.append(stream.strength)
    assert seen == sorted(seen, reverse=True) and seen[-1] is not None and seen[-1] < 0.45  # smoothed, falling
    plain_engine.update(stream, params.replace(motion_strength=None, strength=0.5))
    assert stream.strength is None and stream.motion is None
    assert torch.equal(
        plain_engine.step([(stream, still)]).outputs[0],
        plain_engine.step([(plain_engine.open_stream(StreamParams(seed=5)), still)]).outputs[0],
    )


def test_motion_strength_bounds_are_validated() -> None:
    with pytest.raises(ConfigError, match="motion_strength"):
        StreamParams(motion_strength=(0.8, 0.2))
    with pytest.raises(ConfigError, match="motion_strength"):
        StreamParams(motion_strength=(0.0, 0.5))
    with pytest.raises(ConfigError, match="t_index_list"):
        StreamParams(motion_strength=(0.2, 0.5), t_index_list=(500,))
    assert StreamParams(motion_strength=(0.25, 0.25)).motion_strength == (0.25, 0.25)
