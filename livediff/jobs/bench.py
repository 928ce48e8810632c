"""`livediff bench --jobs`: what clips cost and reach, on one engine, every figure measured in the same run.

1. Clip throughput: the engine's batched frames per second (`batch` streams, one step each turn, frames
   already in memory) beside `livediff run`'s whole path on a clip of the same frames (decode, convert,
   the same steps, H.264 encode), in turns; the ratio is the second over the first (target >= 0.9).
2. Sharing with live sessions: `live` sessions fed by cameras at `fps` through the scheduler, alone and
   then with one job running through `Scheduler.run_background` at the same time; each session's output
   frames per second and p99 frame age (output finished - input received), and the ratios (targets: the
   job costs <= 10% of the output fps and <= one frame interval of p99 age). Before the live sessions come,
   a job of the same clip alone, run as the server's worker runs one (`job_alone`), against section 1's
   engine figure (target >= 0.9).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from livediff.bench import percentiles
from livediff.config import EngineSettings, StreamParams
from livediff.jobs.clip import probe
from livediff.jobs.run import cpu_threads
from livediff.jobs.transcode import transcode
from livediff.synthetic import SyntheticCamera


def write_clip(path: Path, frames: list[np.ndarray], rate: int = 30) -> Path:
    """`frames` as an H.264 MP4 at `rate` fps (the clip the throughput figure decodes)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast"}
        for image in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
    return path


def clip_throughput(engine: Any, frames: int, batch: int, params: StreamParams, rounds: int = 3) -> dict[str, Any]:
    """Section 1 of the module doc; best of `rounds` turns each (a busy host slows the turn it hits)."""
    settings = engine.settings
    camera = SyntheticCamera(settings.height, settings.width)
    images = camera.frames(frames)
    tensors = [torch.from_numpy(image) for image in images]
    streams = [engine.open_stream(params) for _ in range(batch)]
    engine_fps, clip_fps = [], []
    with tempfile.TemporaryDirectory(prefix="livediff-bench-") as folder:
        source = write_clip(Path(folder) / "clip.mp4", images)
        info = probe(source)

        def transform(items: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
            return list(engine.step([(streams[lane], image) for lane, image in items]).outputs)

        engine.step([(s, tensors[0]) for s in streams])  # warm
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(0, frames, batch):
                engine.step(list(zip(streams, tensors[i : i + batch])))
            engine_fps.append(frames / (time.perf_counter() - started))
            started = time.perf_counter()
            done = transcode(source, Path(folder) / "out.mp4", info, transform, batch,
                             (settings.width, settings.height))  # fmt: skip
            clip_fps.append(done / (time.perf_counter() - started))
    best_engine, best_clip = max(engine_fps), max(clip_fps)
    return {
        "frames": frames, "batch": batch, "engine_fps": round(best_engine, 2), "clip_fps": round(best_clip, 2),
        "ratio": round(best_clip / best_engine, 3),
    }  # fmt: skip


async def _live_run(scheduler: Any, live: int, fps: float, seconds: float, job_frames: list[torch.Tensor] | None,
                    params: StreamParams) -> dict[str, Any]:  # fmt: skip
    from livediff.session import FrameIn

    sessions = [await scheduler.open_session(params.replace(seed=i)) for i in range(live)]
    settings = scheduler.engine.settings
    camera = [torch.from_numpy(f) for f in SyntheticCamera(settings.height, settings.width).frames(30)]
    ages: list[float] = []
    counts = [0] * live
    stop = asyncio.Event()

    async def feed() -> None:
        index, start = 0, time.monotonic()
        while not stop.is_set():
            for s in sessions:
                s.inbox.put(FrameIn(camera[index % len(camera)], None, None, time.monotonic()))
            index += 1
            await asyncio.sleep(max(0.0, start + index / fps - time.monotonic()))

    async def drain(i: int) -> None:
        while not stop.is_set():
            out = await sessions[i].outbox.get()
            counts[i] += 1
            ages.append(out.finished - out.source.received)

    job_done = [0]

    async def job() -> None:
        assert job_frames is not None
        lanes = [await scheduler.run_on_worker(scheduler.engine.open_stream, params) for _ in range(settings.max_batch)]
        index = 0
        while not stop.is_set():
            batch = [(lanes[k], job_frames[(index + k) % len(job_frames)]) for k in range(len(lanes))]
            job_done[0] += len(await scheduler.run_background(batch))
            index += len(lanes)

    tasks = [asyncio.create_task(feed()), *(asyncio.create_task(drain(i)) for i in range(live))]
    job_task = asyncio.create_task(job()) if job_frames is not None else None
    await asyncio.sleep(1.0)  # settle
    ages.clear()
    counts[:] = [0] * live
    job_done[0] = 0
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    stop.set()
    job_fps = job_done[0] / elapsed
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if job_task is not None:
        job_task.cancel()
        await asyncio.gather(job_task, return_exceptions=True)
    for s in sessions:
        await scheduler.close_session(s)
    return {
        "output_fps": round(sum(counts) / live / elapsed, 2),
        "job_fps": round(job_fps, 2),
        "age_ms": {k: round(v * 1000, 1) for k, v in percentiles(ages).items()},
    }


async def job_alone(scheduler: Any, frames: int, batch: int, params: StreamParams, rounds: int = 3) -> float:
    """A job with no live session, as the server's worker runs one: the transcode on a thread of its own,
    its frames handed to the scheduler (`run_background`) `batch` at a time -> the best of `rounds` turns,
    frames per second."""
    settings = scheduler.engine.settings
    loop = asyncio.get_running_loop()
    sets = [[await scheduler.run_on_worker(scheduler.engine.open_stream, params) for _ in range(batch)]
            for _ in range(2)]  # fmt: skip
    turn = [0]

    def transform(items: list[tuple[int, torch.Tensor]]) -> Any:  # two batches in flight, as the worker's
        lanes = sets[turn[0] % 2]
        turn[0] += 1
        return asyncio.run_coroutine_threadsafe(
            scheduler.run_background([(lanes[lane], image) for lane, image in items]), loop
        )

    best = 0.0
    with tempfile.TemporaryDirectory(prefix="livediff-bench-") as folder:
        source = write_clip(Path(folder) / "clip.mp4", SyntheticCamera(settings.height, settings.width).frames(frames))
        info = probe(source)
        for _ in range(rounds):
            started = time.perf_counter()
            done = await asyncio.to_thread(transcode, source, Path(folder) / "out.mp4", info, transform, batch,
                                           (settings.width, settings.height), None, None, None, 2)  # fmt: skip
            best = max(best, done / (time.perf_counter() - started))
    return round(best, 2)


async def live_sharing(settings: EngineSettings, parts: Any, live: int, fps: float, seconds: float,
                       params: StreamParams, frames: int = 0, batch: int = 0) -> dict[str, Any]:  # fmt: skip
    """Section 2 of the module doc (and, with `frames`, a job of that many frames alone, `batch` (default the
    engine's `max_batch`) a step: `job_alone`)."""
    from livediff.engine import StreamEngine
    from livediff.scheduler import Scheduler

    scheduler = Scheduler(max_sessions=live, fresh_frames=True)
    await scheduler.load(lambda: StreamEngine(settings, parts), warmup_frames=2)
    try:
        alone_fps = await job_alone(scheduler, frames, batch or settings.max_batch, params) if frames else None
        job_frames = [torch.from_numpy(f) for f in SyntheticCamera(settings.height, settings.width, seed=1).frames(16)]
        alone = await _live_run(scheduler, live, fps, seconds, None, params)
        shared = await _live_run(scheduler, live, fps, seconds, job_frames, params)
    finally:
        await scheduler.close()
    interval_ms = 1000.0 / fps
    return {
        "live": live, "camera_fps": fps, "seconds": seconds, "alone": alone, "with_job": shared,
        "job_alone_fps": alone_fps,
        "fps_cost": round(1 - shared["output_fps"] / alone["output_fps"], 3) if alone["output_fps"] else None,
        "p99_age_added_intervals": round((shared["age_ms"]["p99"] - alone["age_ms"]["p99"]) / interval_ms, 2),
    }  # fmt: skip


def run_jobs_bench(settings: EngineSettings, frames: int, batch: int, live: int, fps: float, seconds: float,
                   params: StreamParams) -> dict[str, Any]:  # fmt: skip
    from livediff.engine import StreamEngine

    settings = settings.replace(max_batch=max(settings.max_batch, batch))
    cpu_threads(settings)  # as `livediff run` and `serve` set them
    engine = StreamEngine(settings)
    try:
        throughput = clip_throughput(engine, frames, batch, params)
    finally:
        engine.close()
    sharing = asyncio.run(live_sharing(settings, engine.parts, live, fps, seconds, params, frames, batch))
    throughput["job_fps"] = sharing["job_alone_fps"]
    throughput["job_ratio"] = round(sharing["job_alone_fps"] / throughput["engine_fps"], 3)
    return {"engine": f"{engine.parts.ref} {engine.backend.name} {engine.device} {settings.width}x{settings.height}",
            "clip": throughput, "sharing": sharing}  # fmt: skip


def format_jobs_report(report: dict[str, Any]) -> str:
    c, s = report["clip"], report["sharing"]
    return "\n".join([
        f"engine: {report['engine']}",
        f"clip throughput ({c['frames']} frames, {c['batch']} per step): engine {c['engine_fps']} fps, "
        f"livediff run path {c['clip_fps']} fps, ratio {c['ratio']} (target >= 0.9)",
        f"a job with no live session (through the scheduler) {c['job_fps']} fps, ratio {c['job_ratio']} "
        "(target >= 0.9)",
        f"live sharing ({s['live']} sessions at {s['camera_fps']} fps, {s['seconds']} s each):",
        f"  alone:    {s['alone']['output_fps']} fps per session, frame age p50/p99 "
        f"{s['alone']['age_ms']['p50']}/{s['alone']['age_ms']['p99']} ms",
        f"  with job: {s['with_job']['output_fps']} fps per session, frame age p50/p99 "
        f"{s['with_job']['age_ms']['p50']}/{s['with_job']['age_ms']['p99']} ms; the job ran "
        f"{s['with_job']['job_fps']} fps in the slots and time left",
        f"  cost: {s['fps_cost'] * 100 if s['fps_cost'] is not None else float('nan'):.1f}% of output fps "
        f"(target <= 10%), p99 age +{s['p99_age_added_intervals']} frame intervals (target <= 1)",
    ])  # fmt: skip
