"""`livediff bench`: the engine's speed on synthetic camera frames, beside a baseline run in the same process.

Every number is measured in this run: per-stage p50/p95, ms per frame, frames per second, and,
with `baseline="diffusers"`, the same model, size, steps and strength through diffusers'
`AutoPipelineForImage2Image` called once per frame with PIL images in and out, in the engine's
dtype unless `baseline_dtype` names another (the report says which).

Each engine configuration after the first also reports how far its frames are from the first's
(`parity`: the last frame of every stream, in levels of 255), and on CUDA every configuration its
peak GPU memory (`peak_gpu_mb`).

The configurations take turns of a few frames each (engine configurations and the baseline, the
first of a turn changing each time): a busy spell of the host (other tenants, a frequency drop)
then slows all of them alike instead of whichever happened to run at the time. Turns of one frame
would spread the noise best but leave every frame with caches cold from the other configuration
(measured: 10-20% slower for both, more for the baseline); with 10 frames a turn they run warm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine import STAGES, StreamEngine
from livediff.engine.device import resolve_dtype
from livediff.models import ModelParts
from livediff.models.loading import load_engine_model
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

    turn: int = 10
    """Consecutive frames a configuration runs before the next one takes over (see `run_rounds`)."""

    @property
    def rounds(self) -> int:
        return self.warmup + self.frames


def _camera_frames(settings: EngineSettings, count: int, seed: int = 0) -> list[np.ndarray]:
    return list(SyntheticCamera(settings.height, settings.width, seed=seed).frames(count))


class PeakMemory:
    """The most GPU memory allocated while a lane runs, in MB; None off CUDA.

    Counts everything live at the time, the weights the lanes share and other lanes' buffers included.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.peak = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device is None:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    def report(self) -> float | None:
        return None if self.device is None else round(self.peak / 2**20, 1)


def frame_parity(frames: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """How far uint8 `frames` are from `reference`, in levels of 255: largest and mean absolute
    difference, and the reference's own standard deviation (near 0: flat frames, a weak comparison)."""
    diff = torch.cat([(a.int() - b.int()).abs().flatten() for a, b in zip(frames, reference)])
    spread = torch.cat([b.flatten() for b in reference]).float().std()
    return {"max_abs": int(diff.max()), "mean_abs": round(float(diff.float().mean()), 4),
            "reference_std": round(float(spread), 2)}  # fmt: skip


class Lane(Protocol):
    """One configuration under test: runs frame `index` of the camera when its turn comes."""

    def run(self, index: int, record: bool) -> None: ...

    def report(self) -> dict[str, Any]: ...


class EngineLane:
    """An engine configuration: `plan.batch` streams, one step per turn.

    `params`: the streams' params (default `plan.params`; stream i gets seed + i); `label`: the
    configuration's name in the report (`config`), for benches that compare several on one engine.
    """

    def __init__(self, engine: StreamEngine, plan: BenchPlan, frames: list[np.ndarray],
                 params: StreamParams | None = None, label: str | None = None) -> None:  # fmt: skip
        self.engine = engine
        self.plan = plan
        self.label = label
        self.frames = [torch.from_numpy(frame) for frame in frames]
        params = params or plan.params
        self.streams = [engine.open_stream(params.replace(seed=params.seed + i)) for i in range(plan.batch)]
        self.stage_ms: dict[str, list[float]] = {}
        """Stage -> ms per recorded step, in the order the engine reports them (the pipeline's)."""
        self.step_ms: list[float] = []
        self.memory = PeakMemory(engine.device)
        self.last_outputs: list[torch.Tensor] = []
        """The outputs of the last frame run, one per stream (for `frame_parity`)."""

    def run(self, index: int, record: bool) -> None:
        frame = self.frames[index]
        with self.memory.measure():
            started = time.perf_counter()
            result = self.engine.step([(stream, frame) for stream in self.streams])
            elapsed = (time.perf_counter() - started) * 1000.0
        self.last_outputs = result.outputs
        if record:
            self.step_ms.append(elapsed)
            for stage, ms in result.timings_ms.items():
                self.stage_ms.setdefault(stage, []).append(ms)

    def report(self) -> dict[str, Any]:
        frames = len(self.step_ms) * self.plan.batch
        stages = [*self.stage_ms, *(stage for stage in STAGES if stage not in self.stage_ms)]  # every one in the table
        return {
            "backend": self.engine.backend.name,
            **({"config": self.label} if self.label is not None else {}),
            "batch": self.plan.batch,
            "frames": frames,
            "stages_ms": {stage: percentiles(self.stage_ms.get(stage, [])) for stage in stages},
            "step_ms": percentiles(self.step_ms),
            "ms_per_frame": round(sum(self.step_ms) / frames, 3),
            "fps": round(1000.0 * frames / sum(self.step_ms), 2),
            "peak_gpu_mb": self.memory.report(),
        }


class DiffusersLane:
    """What a user would write first: the diffusers img2img pipeline, once per frame, PIL in and out."""

    def __init__(self, parts: ModelParts, plan: BenchPlan, frames: list[np.ndarray]) -> None:
        from diffusers import AutoPipelineForImage2Image, StableDiffusionPipeline

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
        self.pipe = AutoPipelineForImage2Image.from_pipe(text2img)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = str(parts.dtype).removeprefix("torch.")
        self.params = plan.params
        # img2img runs steps * strength of its schedule: ask for steps / strength to run `steps`.
        self.inference_steps = max(plan.params.steps, math.ceil(plan.params.steps / plan.params.strength - 1e-6))
        self.frames = frames
        self.frame_ms: list[float] = []
        self.memory = PeakMemory(parts.device)

    def run(self, index: int, record: bool) -> None:
        from PIL import Image

        image = Image.fromarray(self.frames[index])  # the camera's frame as the user's code receives it
        params = self.params
        with self.memory.measure():
            started = time.perf_counter()
            output = self.pipe(
                params.prompt,
                image=image,
                num_inference_steps=self.inference_steps,
                strength=params.strength,
                guidance_scale=params.guidance,
                generator=torch.Generator().manual_seed(params.seed),
                output_type="pil",
            ).images[0]
            np.asarray(output)  # the frame as bytes, as a video sink needs it
        if record:
            self.frame_ms.append((time.perf_counter() - started) * 1000.0)

    def report(self) -> dict[str, Any]:
        return {
            "name": "diffusers AutoPipelineForImage2Image, PIL per frame",
            "dtype": self.dtype,
            "frames": len(self.frame_ms),
            "frame_ms": percentiles(self.frame_ms),
            "ms_per_frame": round(sum(self.frame_ms) / len(self.frame_ms), 3),
            "fps": round(1000.0 * len(self.frame_ms) / sum(self.frame_ms), 2),
            "peak_gpu_mb": self.memory.report(),
        }


def run_rounds(lanes: list[Lane], plan: BenchPlan) -> None:
    """Frames 0 .. `plan.rounds` - 1 through every lane, in turns of `plan.turn` frames per lane;
    the first `plan.warmup` frames are not recorded.

    Turn i starts with lane i mod n, so no lane always runs right after the same other one.
    """
    for turn, first in enumerate(range(0, plan.rounds, plan.turn)):
        start = turn % len(lanes)
        for lane in lanes[start:] + lanes[:start]:
            for index in range(first, min(first + plan.turn, plan.rounds)):
                lane.run(index, record=index >= plan.warmup)


def run_streams(engine: StreamEngine, plan: BenchPlan, count: int) -> dict[str, Any]:
    """N streams each sending `plan.frames` frames: one batched step per round versus N single-frame steps.

    Per mode: aggregate fps, the latency of every frame (arrival of the round to its output) and
    each stream's own p99 (`per_stream_p99_ms`, in stream order).
    """
    frames = [torch.from_numpy(f) for f in _camera_frames(engine.settings, plan.rounds)]
    report: dict[str, Any] = {"streams": count}
    for mode in ("batched", "sequential"):
        streams = [engine.open_stream(plan.params.replace(seed=plan.params.seed + i)) for i in range(count)]
        latency_ms: list[float] = []
        per_stream_ms: list[list[float]] = [[] for _ in range(count)]
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
            for own, t in zip(per_stream_ms, done):
                own.append((t - started) * 1000.0)
            total_s += done[-1] - started
        report[mode] = {
            "fps": round(plan.frames * count / total_s, 2),
            "latency_ms": percentiles(latency_ms),
            "per_stream_p99_ms": [percentiles(own)["p99"] for own in per_stream_ms],
        }
    report["speedup"] = round(report["batched"]["fps"] / report["sequential"]["fps"], 2)
    return report


def run_bench(settings_list: list[EngineSettings], plan: BenchPlan, parts: ModelParts | None = None) -> dict[str, Any]:
    """One report: a row per engine configuration, the baseline and the stream comparison."""
    engines = []
    for settings in settings_list:
        engines.append(StreamEngine(settings, parts))
        parts = engines[-1].parts
    assert parts is not None
    engine = engines[-1]
    frames = _camera_frames(engine.settings, plan.rounds)
    lanes: list[Lane] = [EngineLane(e, plan, frames) for e in engines]
    baseline: DiffusersLane | None = None
    if plan.baseline == "diffusers":
        baseline_parts = parts
        if plan.baseline_dtype is not None and resolve_dtype(plan.baseline_dtype, parts.device) != parts.dtype:
            dtype = resolve_dtype(plan.baseline_dtype, parts.device)
            baseline_parts = load_engine_model(settings_list[0], parts.device, dtype)
        baseline = DiffusersLane(baseline_parts, plan, frames)
        lanes.append(baseline)
    run_rounds(lanes, plan)
    report: dict[str, Any] = {
        "model": f"{parts.ref} ({parts.revision})",
        "device": _device_name(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "size": f"{engine.settings.width}x{engine.settings.height}",
        "steps": len(plan.params.timesteps),
        "strength": plan.params.strength,
        "frames_per_turn": plan.turn,
        "runs": [lane.report() for lane in lanes if isinstance(lane, EngineLane)],
    }
    first = lanes[0]
    for lane, run in zip(lanes[1 : len(engines)], report["runs"][1:]):
        assert isinstance(lane, EngineLane) and isinstance(first, EngineLane)
        run["parity"] = {"vs": report["runs"][0]["backend"], **frame_parity(lane.last_outputs, first.last_outputs)}
    for count in plan.streams:
        report.setdefault("streams", []).append(run_streams(engine, plan, count))
    if baseline is not None:
        report["baseline"] = baseline.report()
        best = max(report["runs"], key=lambda run: run["fps"] / run["batch"])
        report["speedup"] = {
            "vs": "diffusers",
            "backend": best["backend"],
            "ratio": round(report["baseline"]["ms_per_frame"] / best["ms_per_frame"], 2),
        }
    return report


def engine_line(report: dict[str, Any]) -> str:
    """The first line of an adapter bench's text report: model, backend, device, dtype, size, steps, batch."""
    return (
        f"model {report['model']}  backend {report['backend']}  device {report['device']} ({report['threads']} "
        f"threads)  dtype {report['dtype']}  size {report['size']}  steps {report['steps']}  batch {report['batch']}"
    )


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
        cells = "".join(f"{run['stages_ms'][s]['p50']:>12.1f} /{run['stages_ms'][s]['p95']:>7.1f}" for s in STAGES)
        lines.append(f"{run['backend']:<14}{run['batch']:>6}{cells}{run['ms_per_frame']:>10.1f}{run['fps']:>8.1f}")
    notes = [
        f"{run['backend']}: frames {run['parity']['mean_abs']:.3f} levels from {run['parity']['vs']}'s on average, "
        f"{run['parity']['max_abs']} at most" for run in report["runs"] if "parity" in run
    ]  # fmt: skip
    notes += [f"{run['backend']}: peak GPU memory {run['peak_gpu_mb']:.0f} MB"
              for run in report["runs"] if run.get("peak_gpu_mb") is not None]  # fmt: skip
    if notes:
        lines += [""] + notes
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
            f"p99 {s['latency_ms']['p99']:.1f} ms): {streams['speedup']:.2f}x; "
            f"worst stream's p99 batched {max(b['per_stream_p99_ms']):.1f} ms"
        )
    return "\n".join(lines)
