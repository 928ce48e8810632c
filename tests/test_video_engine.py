"""The video engine: causality, bounded caches, mixed batches, live params, errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from livediff.config import ControlParams, EngineSettings, ImagePromptParams, StreamParams, VideoSettings
from livediff.engine.kv_cache import KVCache
from livediff.engine.video import VideoEngine
from livediff.errors import ConfigError
from livediff.models.video import VideoParts, load_video_model
from livediff.models.wan import rotate

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts() -> VideoParts:
    return load_video_model("tiny-video")


def engine_of(parts: VideoParts, stream_batch: bool = False, **video: int) -> VideoEngine:
    """An engine at SIZE; these tests read the cache chunk by chunk, so Stream Batch (the default) is off
    unless asked: tests/test_stream_batch.py covers it, and shows it equal to this engine at 1 step."""
    settings = VideoSettings(stream_batch=stream_batch, **video)  # type: ignore[arg-type]
    return VideoEngine(EngineSettings(model="tiny-video", height=SIZE, width=SIZE, video=settings), parts)


def camera(chunks: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Chunks of random frames: 5, then 4 each."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [5] + [4] * (chunks - 1)
    return [[torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator) for _ in range(n)]
            for n in sizes]  # fmt: skip


def run(engine: VideoEngine, params: StreamParams, chunks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    stream = engine.open_stream(params)
    return [engine.step([(stream, chunk)]).outputs[0] for chunk in chunks]


def same(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: int = 1) -> bool:
    """Frame by frame within `tolerance` levels (a batch's matmuls may round a little differently)."""
    return len(a) == len(b) and all((x.int() - y.int()).abs().max() <= tolerance for x, y in zip(a, b))


def test_a_chunk_gives_as_many_frames_as_it_took(parts) -> None:
    engine = engine_of(parts)
    stream = engine.open_stream()
    assert stream.frames_needed == 5
    result = engine.step([(stream, camera(1)[0])])
    assert len(result.outputs[0]) == 5 and result.outputs[0][0].shape == (SIZE, SIZE, 3)
    assert result.outputs[0][0].dtype == torch.uint8
    assert set(result.timings_ms) == {"preprocess", "encode", "transformer", "decode", "postprocess"}
    assert stream.frames_needed == 4 and stream.cache.positions == [0, 1]
    with pytest.raises(ValueError, match="takes 4 frames, got 5"):
        engine.step([(stream, camera(1)[0])])


def test_a_chunk_does_not_depend_on_later_frames(parts) -> None:
    engine = engine_of(parts)
    video, other = camera(5, seed=1), camera(5, seed=2)
    changed = video[:3] + other[3:]
    a, b = run(engine, StreamParams(), video), run(engine, StreamParams(), changed)
    for k in range(3):
        assert same(a[k], b[k], tolerance=0)
    assert not same(a[3], b[3])


def test_the_past_changes_the_present(parts) -> None:
    """The cache carries the past: the same chunk after another history gives another output."""
    engine = engine_of(parts)
    video, other = camera(4, seed=1), camera(4, seed=2)
    a = run(engine, StreamParams(), video)
    b = run(engine, StreamParams(), other[:3] + video[3:])
    assert not same(a[3], b[3])


def test_the_cache_stays_bounded_over_1000_chunks_and_positions_stay_right(parts) -> None:
    """1000 chunks through a cache of 1 sink and 2 window frames (tokens of a 16x16 latent) with a
    position limit of 12: allocated once, at most 3 frames, the sink at 0, the window consecutive
    and each frame's keys where its positions say (checked against keys rotated afresh)."""
    model = parts.transformer
    cache = KVCache(1, 4, 1, 32, sink=1, window=2, position_limit=12, device=torch.device("cpu"),
                    dtype=torch.float32)  # fmt: skip
    keys = cache.keys
    raw: dict[int, torch.Tensor] = {}  # chunk -> its key before rotation
    at: dict[int, int] = {}  # cached frame position -> chunk
    generator = torch.Generator().manual_seed(0)
    for chunk in range(1000):
        frames = 2 if chunk == 0 else 1
        positions = cache.reserve(frames, model.rope)
        if cache.refreshes and positions[0] < max(at, default=0) + 1:  # refreshed: renumber what is kept
            at = {p: at[old] for p, old in zip(cache.positions, sorted(at))}
        key = torch.randn((frames * 4, 1, 32), generator=generator)
        cos, sin = model.rope.frames(positions, 2, 2)
        cache.append([(rotate(key, cos, sin), key)], positions)
        for f, p in enumerate(positions.tolist()):
            raw[chunk * 10 + f] = key[f * 4 : (f + 1) * 4]
            at[p] = chunk * 10 + f
        at = {p: c for p, c in at.items() if p in cache.positions}
        assert cache.frames <= 3 and cache.keys is keys  # allocated once, never grown
        assert cache.positions[0] == 0  # the sink stays at its place
        window = cache.positions[1:]
        assert window == list(range(window[0], window[0] + len(window)))  # consecutive, no gap
        assert cache.next_position == window[-1] + 1 <= 12
        stored, values = cache.layer(0)
        for i, p in enumerate(cache.positions):
            cos, sin = model.rope.frames(torch.tensor([p]), 2, 2)
            expected = rotate(raw[at[p]], cos, sin)
            assert torch.allclose(stored[i * 4 : (i + 1) * 4], expected, atol=1e-4), (chunk, p)
            assert torch.equal(values[i * 4 : (i + 1) * 4], raw[at[p]])
    assert cache.refreshes > 100


def test_an_engine_stream_keeps_its_cache_bounded(parts) -> None:
    engine = engine_of(parts, sink=1, window=2, position_limit=8)
    stream = engine.open_stream()
    keys = stream.cache.keys
    frame = torch.full((SIZE, SIZE, 3), 128, dtype=torch.uint8)
    for _ in range(24):
        engine.step([(stream, [frame] * stream.frames_needed)])
        assert stream.cache.frames <= 3 and stream.cache.keys is keys and stream.cache.next_position <= 8
    assert stream.chunks == 24 and stream.cache.refreshes >= 3


def test_a_position_refresh_changes_nothing_the_model_sees_without_sinks(parts) -> None:
    """Keys rotated back with their positions keep every distance: with no sinks, a stream that
    refreshes every few chunks gives what one that never refreshes gives."""
    video = camera(10, seed=4)
    refreshing = engine_of(parts, sink=0, window=2, position_limit=5)
    never = engine_of(parts, sink=0, window=2, position_limit=1024)
    a, b = run(refreshing, StreamParams(), video), run(never, StreamParams(), video)
    assert all(same(x, y) for x, y in zip(a, b))
    stream = refreshing.open_stream()
    for chunk in video:
        refreshing.step([(stream, chunk)])
    assert stream.cache.refreshes >= 2


def test_each_stream_of_a_mixed_batch_equals_its_solo_run(parts) -> None:
    engine = engine_of(parts)
    params = [StreamParams(prompt="a red fox", strength=0.7, steps=1, seed=1),
              StreamParams(prompt="a city at night", strength=0.5, steps=3, seed=2),
              StreamParams(prompt="ink", strength=0.9, steps=2, seed=3)]  # fmt: skip
    videos = [camera(6, seed=10 + i) for i in range(3)]
    solo = [run(engine, p, v) for p, v in zip(params, videos)]
    streams = [engine.open_stream(p) for p in params]
    mixed: list[list[list[torch.Tensor]]] = [[], [], []]
    starts = [0, 1, 3]  # the streams join at different chunks: different cache lengths, first chunks beside later ones
    for tick in range(9):
        batch = [(i, videos[i][tick - starts[i]]) for i in range(3) if 0 <= tick - starts[i] < 6]
        result = engine.step([(streams[i], chunk) for i, chunk in batch])
        for (i, _), out in zip(batch, result.outputs):
            mixed[i].append(out)
    for i in range(3):
        assert all(same(a, b) for a, b in zip(mixed[i], solo[i])), f"stream {i}"


def test_a_prompt_change_takes_effect_on_the_next_chunk(parts) -> None:
    engine = engine_of(parts)
    video = camera(4, seed=5)
    stream = engine.open_stream(StreamParams(prompt="a red fox"))
    outs = [engine.step([(stream, chunk)]).outputs[0] for chunk in video[:2]]
    engine.update(stream, StreamParams(prompt="a city at night"))
    outs += [engine.step([(stream, chunk)]).outputs[0] for chunk in video[2:]]
    unchanged = run(engine, StreamParams(prompt="a red fox"), video)
    assert same(outs[1], unchanged[1], tolerance=0)
    assert not same(outs[2], unchanged[2])


def test_a_reset_starts_the_stream_over_from_the_current_frame(parts) -> None:
    engine = engine_of(parts)
    video = camera(5, seed=6)
    stream = engine.open_stream()
    for chunk in video[:3]:
        engine.step([(stream, chunk)])
    engine.reset(stream)
    assert stream.frames_needed == 5 and stream.cache.frames == 0
    fresh_start = [torch.stack([video[3][0], *video[3]])] + [torch.stack(video[4])]
    after = [engine.step([(stream, list(chunk))]).outputs[0] for chunk in fresh_start]
    new = run(engine, StreamParams(), [list(c) for c in fresh_start])
    assert all(same(a, b, tolerance=0) for a, b in zip(after, new))


def test_a_closed_stream_frees_its_cache(parts) -> None:
    engine = engine_of(parts)
    stream = engine.open_stream()
    engine.step([(stream, camera(1)[0])])
    freed = weakref.ref(stream.cache.keys)
    del stream
    gc.collect()
    assert freed() is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (StreamParams(controlnet=(ControlParams(name="canny"),)), "controlnet"),
        (StreamParams(temporal_bank=2), "temporal_bank"),
        (StreamParams(guidance=3.0), "guidance"),
        (StreamParams(similarity_filter=True), "similarity_filter"),
        (StreamParams(image_prompt=ImagePromptParams()), "image_prompt"),
    ],
)
def test_what_a_video_model_cannot_do_is_a_config_error_naming_the_field(parts, params, field) -> None:
    engine = engine_of(parts)
    with pytest.raises(ConfigError, match=field):
        engine.open_stream(params)
    stream = engine.open_stream()
    with pytest.raises(ConfigError, match=field):
        engine.update(stream, params)
    engine.check_params(StreamParams(steps=4))


def test_steps_outside_1_to_4_are_refused_by_the_params_themselves() -> None:
    for steps in (0, 5):
        with pytest.raises(ConfigError, match="steps"):
            StreamParams(steps=steps)


def test_a_frame_size_the_model_cannot_take_is_a_config_error(parts) -> None:
    with pytest.raises(ConfigError, match="height must be a multiple of 16"):
        VideoEngine(EngineSettings(model="tiny-video", height=72, width=64), parts)
    with pytest.raises(ConfigError, match="backend"):
        VideoEngine(EngineSettings(model="tiny-video", height=64, width=64, backend="onnx"), parts)


def test_motion_aware_noise_gives_a_moving_camera_less_noise(parts) -> None:
    """With `motion_strength`, a still camera's chunks run at the high strength, a moving camera's lower."""
    engine = engine_of(parts)
    still = [[torch.full((SIZE, SIZE, 3), 100, dtype=torch.uint8)] * n for n in (5, 4, 4, 4)]
    moving = camera(4, seed=8)  # random frames: as much motion as there is
    params = StreamParams(motion_strength=(0.3, 0.9))
    streams = [engine.open_stream(params), engine.open_stream(params)]
    for a, b in zip(still, moving):
        engine.step([(streams[0], a), (streams[1], b)])
    assert streams[0].strength == pytest.approx(0.9) and streams[1].strength == pytest.approx(0.3)
    assert streams[0].timesteps[0] > streams[1].timesteps[0]
    engine.update(streams[1], StreamParams())
    assert streams[1].strength is None and streams[1].timesteps == StreamParams().timesteps


def test_auto_runs_a_video_model_on_torch_and_the_exported_backends_are_refused() -> None:
    from livediff.engine.video import resolve_video_backend

    assert resolve_video_backend("auto") == "torch" and resolve_video_backend("torch") == "torch"
    assert resolve_video_backend("auto", "cuda") == "cuda-graph"  # the fast path is CUDA's default
    for name in ("onnx", "openvino", "tensorrt"):
        with pytest.raises(ConfigError, match=f"backend {name} does not run video models"):
            resolve_video_backend(name)
    with pytest.raises(ConfigError, match="backend cuda-graph needs CUDA"):
        resolve_video_backend("cuda-graph", "cpu")


def test_serve_help_says_the_exported_backends_are_not_for_video_models(capsys) -> None:
    from livediff.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "tiny-video" in help_text and "the exported CPU backends are not for them" in help_text
