"""`livediff bench`: the engine's speed on synthetic camera frames, beside a baseline run in the same process.

Every number is measured in this run: per-stage p50/p95, ms per frame, frames per second, and,
with `baseline="diffusers"`, the same model, size, steps and strength through diffusers'
`AutoPipelineForImage2Image` called once per frame with PIL images in and out, in the engine's
dtype unless `baseline_dtype` names another (the report says which).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine import STAGES, StreamEngine
from livediff.engine.device import resolve_dtype
from livediff.models import ModelParts, load_model
from livediff.synthetic import SyntheticCamera


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan}
    p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


@dataclass
class BenchPlan:
    frames: int = 100
    warmup: int = 5
    batch: int = 1
    """Frames per engine step, one per stream."""
    params: StreamParams = field(default_factory=StreamParams)
    baseline: str | None = None
    baseline_dtype: str | None = None
    """The baseline's dtype when not the engine's (`float32`: what diffusers loads by default)."""
    streams: tuple[int, ...] = ()
    """Stream counts for the batched-versus-sequential comparison."""


def _camera_frames(settings: EngineSettings, count: int, seed: int = 0) -> list[torch.Tensor]:
    camera = SyntheticCamera(settings.height, settings.width, seed=seed)
    return [torch.from_numpy(f) for f in camera.frames(count)]


def run_engine(engine: StreamEngine, plan: BenchPlan) -> dict[str, Any]:
    """Feed `plan.frames` frames per stream through the engine, `plan.batch` streams per step."""
    settings = engine.settings
    streams = [engine.open_stream(plan.params.replace(seed=plan.params.seed + i)) for i in range(plan.batch)]
    frames = _camera_frames(settings, plan.frames + plan.warmup)
    stage_ms: dict[str, list[float]] = {stage: [] for stage in STAGES}
    step_ms: list[float] = []
    for index, frame in enumerate(frames):
        started = time.perf_counter()
        result = engine.step([(stream, frame) for stream in streams])
        elapsed = (time.perf_counter() - started) * 1000.0
        if index < plan.warmup:
            continue
        step_ms.append(elapsed)
        for stage, ms in result.timings_ms.items():
            stage_ms[stage].append(ms)
    wall_s = sum(step_ms) / 1000.0
    return {
        "backend": engine.backend.name,
        "batch": plan.batch,
        "frames": plan.frames * plan.batch,
        "stages_ms": {stage: percentiles(values) for stage, values in stage_ms.items()},
        "step_ms": percentiles(step_ms),
        "ms_per_frame": round(sum(step_ms) / (plan.frames * plan.batch), 3),
        "fps": round(plan.frames * plan.batch / wall_s, 2),
    }


def run_streams(engine: StreamEngine, plan: BenchPlan, count: int) -> dict[str, Any]:
    """N streams each sending `plan.frames` frames: one batched step per round versus N single-frame steps."""
    frames = _camera_frames(engine.settings, plan.frames + plan.warmup)
    report: dict[str, Any] = {"streams": count}
    for mode in ("batched", "sequential"):
        streams = [engine.open_stream(plan.params.replace(seed=plan.params.seed + i)) for i in range(count)]
        latency_ms: list[float] = []
        total_s = 0.0
        for index, frame in enumerate(frames):
            started = time.perf_counter()
            if mode == "batched":
                engine.step([(stream, frame) for stream in streams])
                done = [time.perf_counter()] * count
            else:
                done = []
                for stream in streams:
                    engine.step([(stream, frame)])
                    done.append(time.perf_counter())
            if index < plan.warmup:
                continue
            latency_ms.extend((t - started) * 1000.0 for t in done)  # every frame arrived at `started`
            total_s += done[-1] - started
        report[mode] = {"fps": round(plan.frames * count / total_s, 2), "latency_ms": percentiles(latency_ms)}
    report["speedup"] = round(report["batched"]["fps"] / report["sequential"]["fps"], 2)
    return report


def run_diffusers_baseline(parts: ModelParts, settings: EngineSettings, plan: BenchPlan) -> dict[str, Any]:
    """What a user would write first: the diffusers img2img pipeline, once per frame, PIL in and out."""
    from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline
    from PIL import Image

    text2img = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=type(parts.scheduler).from_config(parts.scheduler.config),  # pipelines edit their scheduler
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = AutoPipelineForImage2Image.from_pipe(text2img)
    pipe.set_progress_bar_config(disable=True)
    params = plan.params
    # img2img runs steps * strength of its schedule: ask for steps / strength to run `steps`.
    inference_steps = max(params.steps, math.ceil(params.steps / params.strength - 1e-6))
    camera = SyntheticCamera(settings.height, settings.width)
    frame_ms: list[float] = []
    for index in range(plan.frames + plan.warmup):
        image = Image.fromarray(camera.frame(index))
        started = time.perf_counter()
        output = pipe(
            params.prompt,
            image=image,
            num_inference_steps=inference_steps,
            strength=params.strength,
            guidance_scale=params.guidance,
            generator=torch.Generator().manual_seed(params.seed),
            output_type="pil",
        ).images[0]
        np.asarray(output)  # the frame as bytes, as a video sink needs it
        if index >= plan.warmup:
            frame_ms.append((time.perf_counter() - started) * 1000.0)
    return {
        "name": "diffusers AutoPipelineForImage2Image, PIL per frame",
        "frames": plan.frames,
        "frame_ms": percentiles(frame_ms),
        "ms_per_frame": round(sum(frame_ms) / len(frame_ms), 3),
        "fps": round(1000.0 * len(frame_ms) / sum(frame_ms), 2),
    }


def run_bench(settings_list: list[EngineSettings], plan: BenchPlan, parts: ModelParts | None = None) -> dict[str, Any]:
    """One report: a row per engine configuration, the baseline and the stream comparison."""
    report: dict[str, Any] = {
        "size": f"{settings_list[0].width}x{settings_list[0].height}",
        "steps": len(plan.params.timesteps),
        "strength": plan.params.strength,
        "runs": [],
    }
    engine = None
    for settings in settings_list:
        engine = StreamEngine(settings, parts)
        parts = engine.parts
        report.setdefault("model", f"{parts.ref} ({parts.revision})")
        report.setdefault("device", _device_name(engine.device))
        report.setdefault("dtype", str(engine.dtype).removeprefix("torch."))
        report["runs"].append(run_engine(engine, plan))
    assert engine is not None and parts is not None
    for count in plan.streams:
        report.setdefault("streams", []).append(run_streams(engine, plan, count))
    if plan.baseline == "diffusers":
        baseline_parts = parts
        if plan.baseline_dtype is not None and resolve_dtype(plan.baseline_dtype, parts.device) != parts.dtype:
            dtype = resolve_dtype(plan.baseline_dtype, parts.device)
            baseline_parts = load_model(settings_list[0].model, parts.device, dtype, vae=settings_list[0].vae)
        baseline = run_diffusers_baseline(baseline_parts, settings_list[0], plan)
        baseline["dtype"] = str(baseline_parts.dtype).removeprefix("torch.")
        report["baseline"] = baseline
        best = max(report["runs"], key=lambda run: run["fps"] / run["batch"])
        report["speedup"] = {
            "vs": "diffusers",
            "backend": best["backend"],
            "ratio": round(baseline["ms_per_frame"] / best["ms_per_frame"], 2),
        }
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(report: dict[str, Any]) -> str:
    """A human-readable table of `report`."""
    lines = [
        f"model {report['model']}  device {report['device']}  dtype {report['dtype']}  "
        f"size {report['size']}  steps {report['steps']}  strength {report['strength']}",
        "",
        f"{'backend':<14}{'batch':>6}"
        + "".join(f"{stage + ' p50/p95':>22}" for stage in STAGES)
        + f"{'ms/frame':>10}{'fps':>8}",
    ]
    for run in report["runs"]:
        cells = "".join(
            f"{run['stages_ms'][s]['p50']:>12.1f} /{run['stages_ms'][s]['p95']:>7.1f}" for s in STAGES
        )
        lines.append(f"{run['backend']:<14}{run['batch']:>6}{cells}{run['ms_per_frame']:>10.1f}{run['fps']:>8.1f}")
    if "baseline" in report:
        base = report["baseline"]
        ratio = report["speedup"]
        lines += [
            "",
            f"baseline: {base['name']}, {base['dtype']}: {base['ms_per_frame']:.1f} ms/frame, {base['fps']:.1f} fps "
            f"(p50 {base['frame_ms']['p50']:.1f}, p95 {base['frame_ms']['p95']:.1f})",
            f"speedup of {ratio['backend']} over the baseline: {ratio['ratio']:.2f}x",
        ]
    for streams in report.get("streams", []):
        b, s = streams["batched"], streams["sequential"]
        lines.append(
            f"{streams['streams']} streams: batched {b['fps']:.1f} fps (p50 {b['latency_ms']['p50']:.1f} / "
            f"p99 {b['latency_ms']['p99']:.1f} ms), sequential {s['fps']:.1f} fps (p50 {s['latency_ms']['p50']:.1f} / "
            f"p99 {s['latency_ms']['p99']:.1f} ms): {streams['speedup']:.2f}x"
        )
    return "\n".join(lines)
