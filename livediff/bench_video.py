"""`livediff bench --model tiny-video` (or `wan-1.3b-random`): the video engine on a synthetic camera.

For each stream count N of `--streams` (1 when none is given), N streams run their chunks in one
engine step each time, as the scheduler runs them: a first chunk (5 frames), `warmup` chunks, then
`chunks` measured chunks of 4 frames. Reported per N: milliseconds per step (a chunk of every
stream) and per output frame, each stage's milliseconds per step (encode, transformer, decode, ...),
aggregate and per-stream frames per second, the first chunk's latency (from a complete first chunk
to its frames: the compute of the steps until they come, `first_chunk_steps`, S with Stream Batch at
S steps; live, each step after the first also waits for the next chunk's 4 camera frames), and the
memory a stream adds (its KV cache and autoencoder memories on the CPU; CUDA's allocated memory on a
GPU). The ratio of each N's aggregate fps to one stream's (measured in
the same run) says what batching streams in one transformer call buys.

For N >= 2 it also measures streams whose caches hold different numbers of latent frames (stream i
after i + 1 chunks: 2, 3, ... up to sink + window frames), as when streams joined at different
times: one denoising step's transformer work for them as one padded call (shorter caches padded and
masked to the longest, what the engine does) against one call per stream (no padding, N calls).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine.video import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, VideoEngine, VideoStream
from livediff.models.tae import LATENT_CHANNELS
from livediff.models.wan import Row
from livediff.synthetic import SyntheticCamera

MIN_VIDEO_WARMUP_CHUNKS = 2
"""Chunks of 4 frames run after a stream's first chunk before measuring: fewer would time the cache
still growing and the 4-frame path's first calls."""


@dataclass(frozen=True)
class VideoBenchPlan:
    chunks: int = 10
    """Chunks measured per stream count (each of 4 frames per stream)."""
    warmup: int = MIN_VIDEO_WARMUP_CHUNKS
    """Chunks run after the first and before measuring (at least `MIN_VIDEO_WARMUP_CHUNKS`)."""
    streams: tuple[int, ...] = (1,)
    params: StreamParams = StreamParams()

    def __post_init__(self) -> None:
        if self.warmup < MIN_VIDEO_WARMUP_CHUNKS:
            raise ValueError(f"warmup must be at least {MIN_VIDEO_WARMUP_CHUNKS} chunks, got {self.warmup}")


def _stream_bytes(engine: VideoEngine, stream: VideoStream) -> int:
    tensors = [stream.cache.keys, stream.cache.values, *stream.cross.keys, *stream.cross.values]
    tensors += [t for t in (*stream.tae.encoder, *stream.tae.decoder) if t is not None]
    for name in ("enc_cache", "dec_cache"):  # the Wan VAE's feature caches
        tensors += [t for t in getattr(stream.tae, name, []) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _median_ms(run: Any, repeats: int, device: torch.device) -> float:
    """Median wall milliseconds of `run()` over `repeats` calls (after one unmeasured call)."""
    run()
    walls = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(walls)


def mixed_cache_calls(engine: VideoEngine, count: int, frames: list[torch.Tensor], params: StreamParams,
                      repeats: int) -> dict[str, Any]:  # fmt: skip
    """One denoising step's transformer work for `count` streams whose caches differ in length
    (stream i's holding 2 + i latent frames, at most sink + window): `padded_ms`, one call with
    shorter caches padded and masked; `per_stream_ms`, one call per stream; each a median of
    `repeats`. The streams are closed (dropped) after."""
    streams = [engine.open_stream(params.replace(seed=params.seed + i)) for i in range(count)]
    for i, stream in enumerate(streams):
        while stream.cache.frames < 2 + i:  # (with Stream Batch a chunk's keys come a step or more later)
            engine.step([(stream, frames[: stream.frames_needed])])
    model = engine.model
    rows = []
    for stream in streams:
        layers = [stream.cache.layer(i) for i in range(model.layers)]
        positions = stream.cache.reserve(1, model.rope)
        rows.append(Row(stream.cross, tuple(k for k, _ in layers), tuple(v for _, v in layers), positions))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((count, LATENT_CHANNELS, 1, *engine.latent_size), generator=generator)
    latents = latents.to(engine.device, engine.dtype)
    t = torch.full((count,), 500.0, device=engine.device)

    def padded() -> None:
        model.forward_chunk(latents, t, rows, dense=engine.fast)

    def per_stream() -> None:
        for b, row in enumerate(rows):
            model.forward_chunk(latents[b : b + 1], t[b : b + 1], [row], dense=engine.fast)

    with torch.inference_mode():
        padded_ms = _median_ms(padded, repeats, engine.device)
        per_stream_ms = _median_ms(per_stream, repeats, engine.device)
    return {
        "cached_frames": [stream.cache.frames for stream in streams],
        "padded_ms": round(padded_ms, 2),
        "per_stream_ms": round(per_stream_ms, 2),
        "per_stream_vs_padded": round(per_stream_ms / padded_ms, 2),
    }


def run_video_bench(settings: EngineSettings, plan: VideoBenchPlan) -> dict[str, Any]:
    """Build the engine and measure each stream count of `plan`; the report as a dict."""
    engine = VideoEngine(settings)
    cuda = engine.device.type == "cuda"
    frames = [torch.from_numpy(f) for f in SyntheticCamera(settings.height, settings.width).frames(16)]
    engine.warmup(MIN_VIDEO_WARMUP_CHUNKS)
    results: list[dict[str, Any]] = []
    for count in plan.streams:
        if cuda:
            torch.cuda.synchronize(engine.device)
            before = torch.cuda.memory_allocated(engine.device)
        streams = [engine.open_stream(plan.params.replace(seed=plan.params.seed + i)) for i in range(count)]
        start = time.perf_counter()
        out = engine.step([(s, frames[:FIRST_CHUNK_FRAMES]) for s in streams])
        first_ms = (time.perf_counter() - start) * 1000.0
        first_steps = 1
        while not out.outputs[0]:  # Stream Batch with S steps: the first frames come S - 1 steps later
            start = time.perf_counter()
            out = engine.step([(s, frames[:CHUNK_FRAMES]) for s in streams])
            first_ms += (time.perf_counter() - start) * 1000.0
            first_steps += 1
        per_stream = (
            (torch.cuda.memory_allocated(engine.device) - before) / count
            if cuda
            else statistics.mean(_stream_bytes(engine, s) for s in streams)
        )
        walls, stages = [], []
        for index in range(plan.warmup + plan.chunks):
            chunk = [frames[(index * CHUNK_FRAMES + k) % len(frames)] for k in range(CHUNK_FRAMES)]
            start = time.perf_counter()
            result = engine.step([(s, chunk) for s in streams])
            wall = (time.perf_counter() - start) * 1000.0
            if index >= plan.warmup:
                walls.append(wall)
                stages.append(result.timings_ms)
        step_ms = statistics.median(walls)
        fps = count * CHUNK_FRAMES * 1000.0 / step_ms
        results.append({
            "streams": count,
            "ms_per_step": round(step_ms, 2),
            "ms_per_frame": round(step_ms / (count * CHUNK_FRAMES), 3),
            "stages_ms": {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]},
            "fps": round(fps, 2),
            "fps_per_stream": round(fps / count, 2),
            "first_chunk_ms": round(first_ms, 1),
            "first_chunk_steps": first_steps,
            "memory_per_stream_mib": round(per_stream / 2**20, 2),
        })  # fmt: skip
        del streams
        if count >= 2:
            results[-1]["mixed_cache"] = mixed_cache_calls(engine, count, frames, plan.params, max(3, plan.chunks))
    one: float | None = next((float(r["fps"]) for r in results if r["streams"] == 1), None)
    for r in results:
        r["fps_vs_1_stream"] = round(r["fps"] / one, 2) if one else None
    return {
        "model": engine.parts.ref,
        "device": str(engine.device),
        "backend": engine.backend.name,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "size": f"{settings.width}x{settings.height}",
        "steps": plan.params.steps,
        "stream_batch": engine.video.stream_batch,
        "cache": {"sink": engine.video.sink, "window": engine.video.window},
        "chunks": plan.chunks,
        "results": results,
    }


def format_video_report(report: dict[str, Any]) -> str:
    lines = [
        f"video bench: {report['model']} {report['size']} on {report['device']} ({report.get('backend', 'torch')}, "
        f"{report['dtype']}, "
        f"{report['threads']} threads), {report['steps']} step(s), Stream Batch "
        f"{'on' if report.get('stream_batch') else 'off'}, cache {report['cache']['sink']} sink + "
        f"{report['cache']['window']} window latent frames, median of {report['chunks']} chunks",
        f"{'streams':>7} {'ms/step':>9} {'ms/frame':>9} {'fps':>8} {'fps/str':>8} {'vs 1':>6} {'first ms':>9} "
        f"{'MiB/str':>8}  stages ms/step",
    ]
    for r in report["results"]:
        stages = ", ".join(f"{k} {v:g}" for k, v in r["stages_ms"].items())
        lines.append(
            f"{r['streams']:>7} {r['ms_per_step']:>9.1f} {r['ms_per_frame']:>9.2f} {r['fps']:>8.1f} "
            f"{r['fps_per_stream']:>8.1f} {r['fps_vs_1_stream'] or 0:>6.2f} {r['first_chunk_ms']:>9.0f} "
            f"{r['memory_per_stream_mib']:>8.2f}  {stages}"
        )
    mixed = [r for r in report["results"] if "mixed_cache" in r]
    if mixed:
        lines.append("mixed cache lengths, one step's transformer: one padded call vs one call per stream")
        for r in mixed:
            m = r["mixed_cache"]
            lines.append(
                f"{r['streams']:>7} streams, cached latent frames {m['cached_frames']}: "
                f"padded {m['padded_ms']:.1f} ms, per stream {m['per_stream_ms']:.1f} ms "
                f"({m['per_stream_vs_padded']:.2f}x)"
            )
    return "\n".join(lines)
