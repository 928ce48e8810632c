"""Stream Batch over a video stream's denoising steps: one transformer call per engine step.

With one step it gives what the chunk-by-chunk engine gives (its context pass moves into the next
call); with S steps the frames come S - 1 steps later, by the rule in `livediff.engine.stream_batch`,
which a direct reference here computes from the model's own calls; mixed step counts in one call
equal their solo runs; caches stay bounded and positions right across rolls and refreshes."""

from __future__ import annotations

import pytest
import torch

from livediff.config import EngineSettings, StreamParams, VideoSettings
from livediff.engine.video import VideoEngine
from livediff.models.video import VideoParts, load_video_model
from livediff.models.wan import Row

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts() -> VideoParts:
    return load_video_model("tiny-video")


def engine_of(parts: VideoParts, stream_batch: bool, **video: int) -> VideoEngine:
    settings = VideoSettings(stream_batch=stream_batch, **video)  # type: ignore[arg-type]
    return VideoEngine(EngineSettings(model="tiny-video", height=SIZE, width=SIZE, video=settings), parts)


def camera(chunks: int, seed: int = 0) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [5] + [4] * (chunks - 1)
    return [[torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator) for _ in range(n)]
            for n in sizes]  # fmt: skip


def run(engine: VideoEngine, params: StreamParams, chunks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each step's output frames (empty while the stream's queue fills)."""
    stream = engine.open_stream(params)
    return [engine.step([(stream, chunk)]).outputs[0] for chunk in chunks]


def same(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: int = 1) -> bool:
    return len(a) == len(b) and all((x.int() - y.int()).abs().max() <= tolerance for x, y in zip(a, b))


def flat(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [frame for out in outputs for frame in out]


def test_with_one_step_it_equals_the_chunk_by_chunk_engine_past_rolls_and_refreshes(parts) -> None:
    video = camera(12, seed=1)
    settings = dict(sink=1, window=4, position_limit=8)  # the window rolls from chunk 4, refreshes every few
    batched, sequential = engine_of(parts, True, **settings), engine_of(parts, False, **settings)
    a, b = run(batched, StreamParams(steps=1), video), run(sequential, StreamParams(steps=1), video)
    assert [len(x) for x in a] == [5] + [4] * 11  # no delay with one step
    assert all(same(x, y) for x, y in zip(a, b))
    stream = batched.open_stream()
    for chunk in video:
        batched.step([(stream, chunk)])
    assert stream.cache.refreshes >= 2 and stream.pipeline.depth == 1  # the last chunk awaits its context pass


@pytest.mark.parametrize("steps", [2, 3])
def test_with_s_steps_frames_come_s_minus_1_steps_later(parts, steps: int) -> None:
    video = camera(7, seed=2)
    engine = engine_of(parts, True)
    outs = run(engine, StreamParams(steps=steps, strength=0.8), video)
    assert [len(x) for x in outs] == [0] * (steps - 1) + [5] + [4] * (7 - steps)
    # the first chunk sees no earlier chunk in either engine: the same frames
    alone = run(engine_of(parts, False), StreamParams(steps=steps, strength=0.8), video[:1])
    assert same(outs[steps - 1], alone[0])


def test_with_two_steps_it_follows_its_rule_computed_directly(parts) -> None:
    """The rule, by hand from the model's calls: chunk j's first step sees the clean keys of the chunks
    up to j - 2, its second those up to j - 1 (nothing is evicted in 4 chunks: 1 sink + 4 window)."""
    engine = engine_of(parts, True)
    params = StreamParams(steps=2, strength=0.8, seed=5)
    video = camera(4, seed=3)
    got = flat(run(engine, params, video))

    model, tae = engine.model, engine.parts.autoencoder
    ref = engine.open_stream(params)  # its cross K/V, autoencoder memories and noise generator
    generator = ref.generator
    sigmas = [engine.sigma(t) for t in params.timesteps]
    clean_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per chunk, per layer (tokens, heads, dim)
    expected: list[torch.Tensor] = []
    state: list[dict] = []
    position = 0

    def seen(upto: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        chunks = clean_kv[: max(0, upto + 1)]
        keys = tuple(torch.cat([c[i][0] for c in chunks]) if chunks else torch.zeros(0, model.heads, model.head_dim)
                     for i in range(model.layers))  # fmt: skip
        values = tuple(torch.cat([c[i][1] for c in chunks]) if chunks else torch.zeros(0, model.heads, model.head_dim)
                       for i in range(model.layers))  # fmt: skip
        return keys, values

    with torch.inference_mode():
        for j, chunk in enumerate(video):
            pixels = torch.stack(chunk).permute(0, 3, 1, 2).float().div(255.0)[None]
            x0 = tae.encode(pixels, [ref.tae]).transpose(1, 2)[0]
            positions = torch.arange(position, position + x0.shape[1])
            position += x0.shape[1]
            x = (1 - sigmas[0]) * x0 + sigmas[0] * torch.randn(tuple(x0.shape), generator=generator)
            state.append({"x": x, "positions": positions, "step": 0})
            # this call: chunk j at step 0, chunk j - 1 at step 1 (rows oldest first, as the engine orders them)
            for i in (j - 1, j):
                if i < 0:
                    continue
                s = state[i]
                k = s["step"]
                keys, values = seen(i + k - 2)
                flow, _ = model.forward_chunk(s["x"][None], torch.tensor([1000.0 * sigmas[k]]),
                                              [Row(ref.cross, keys, values, s["positions"])])  # fmt: skip
                s["x"] = s["x"] - sigmas[k] * flow[0]
                s["step"] = k + 1
                if k + 1 < 2:
                    s["x"] = (1 - sigmas[1]) * s["x"] + sigmas[1] * torch.randn(tuple(x0.shape), generator=generator)
                else:  # done: its frames, then its clean keys and values (its context pass)
                    expected += list(engine.parts.autoencoder.decode(s["x"][None].transpose(1, 2), [ref.tae])[0])
                    keys, values = seen(i - 1)
                    row = Row(ref.cross, keys, values, s["positions"])
                    _, kept = model.forward_chunk(s["x"][None], torch.zeros(1), [row], keep=True)
                    clean_kv.append([(k_[0], v_[0]) for k_, v_ in kept])
    frames = [f.mul(255.0).round().to(torch.uint8).permute(1, 2, 0) for f in expected]
    assert len(got) == len(frames) == 5 + 4 * 2
    assert same(got, frames), max(int((a.int() - b.int()).abs().max()) for a, b in zip(got, frames))


def test_mixed_step_counts_in_one_call_equal_their_solo_runs(parts) -> None:
    engine = engine_of(parts, True)
    params = [StreamParams(prompt="a red fox", strength=0.7, steps=1, seed=1),
              StreamParams(prompt="a city at night", strength=0.5, steps=3, seed=2),
              StreamParams(prompt="ink", strength=0.9, steps=2, seed=3)]  # fmt: skip
    videos = [camera(6, seed=10 + i) for i in range(3)]
    solo = [flat(run(engine, p, v)) for p, v in zip(params, videos)]
    streams = [engine.open_stream(p) for p in params]
    mixed: list[list[torch.Tensor]] = [[], [], []]
    starts = [0, 1, 3]  # joining at different chunks: first chunks beside later ones, caches of other lengths
    for tick in range(9):
        batch = [(i, videos[i][tick - starts[i]]) for i in range(3) if 0 <= tick - starts[i] < 6]
        result = engine.step([(streams[i], chunk) for i, chunk in batch])
        for (i, _), out in zip(batch, result.outputs):
            mixed[i] += out
    for i in range(3):
        assert len(mixed[i]) == len(solo[i]) > 0 and same(mixed[i], solo[i]), f"stream {i}"


def test_a_chunk_does_not_depend_on_later_frames(parts) -> None:
    engine = engine_of(parts, True)
    video, other = camera(6, seed=1), camera(6, seed=2)
    a = flat(run(engine, StreamParams(steps=3), video))
    b = flat(run(engine, StreamParams(steps=3), video[:3] + other[3:]))
    assert same(a[:13], b[:13], tolerance=0)  # the first three chunks' frames (5 + 4 + 4)
    assert not same(a[13:], b[13:])


def test_caches_stay_bounded_and_positions_right_with_chunks_in_flight(parts) -> None:
    engine = engine_of(parts, True, sink=1, window=4, position_limit=10)
    stream = engine.open_stream(StreamParams(steps=3))
    keys = stream.cache.keys
    frame = torch.full((SIZE, SIZE, 3), 128, dtype=torch.uint8)
    for _ in range(40):
        engine.step([(stream, [frame] * stream.frames_needed)])
        cache = stream.cache
        assert cache.frames <= 5 and cache.keys is keys and cache.next_position <= 10
        assert not cache.positions or cache.positions[0] == 0
        # the cached window, then the chunks in flight (newest last): consecutive positions
        flight = [int(p) for c in (*stream.pipeline.finished, *stream.pipeline.in_flight) for p in c.positions]
        order = cache.positions[1:] + flight
        assert order == list(range(order[0], order[0] + len(order))), order
        assert cache.next_position == order[-1] + 1 and cache.reserved == flight
    assert cache.refreshes >= 5


def test_a_step_change_and_a_reset_mid_flight(parts) -> None:
    engine = engine_of(parts, True)
    video = camera(9, seed=7)
    stream = engine.open_stream(StreamParams(steps=3))
    outs = [engine.step([(stream, chunk)]).outputs[0] for chunk in video[:4]]
    engine.update(stream, StreamParams(steps=1))  # new chunks take 1 step; those in flight keep their 3
    outs += [engine.step([(stream, chunk)]).outputs[0] for chunk in video[4:6]]
    # chunk 3 (3 steps: calls 3-5) leaves at call 5, and with it chunks 4 and 5 (1 step each) that waited for it
    assert [len(x) for x in outs] == [0, 0, 5, 4, 4, 12]
    engine.reset(stream)
    assert stream.pipeline.depth == 0 and stream.frames_needed == 5
    fresh = [[video[6][0], *video[6]], video[7]]
    after = [engine.step([(stream, chunk)]).outputs[0] for chunk in fresh]
    assert [len(x) for x in after] == [5, 4]
    assert all(same(a, b, tolerance=0) for a, b in zip(after, run(engine, StreamParams(steps=1), fresh)))
