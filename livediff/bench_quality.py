"""`livediff bench --quality`: what a temporal setting buys in steadiness and costs in time, in one run.

The synthetic camera holds its background still and adds sensor noise (sigma 2 levels), so a run
has moving shapes and static regions that still change a little, as a webcam's do. Each engine
(one per backend) runs the same frames through one lane per configuration: first the baseline,
the engine's stream params with temporal features off, then each configuration asked for. The
lanes take turns of `plan.turn` frames, as in `livediff bench`, so the host's busy spells slow all
of them alike. Each lane's outputs are measured after the run (`livediff.quality`): warp error,
static-region flicker and SSIM against the input, printed next to its ms per frame, with the
ratio of each to the same engine's baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livediff import quality
from livediff.bench import BenchPlan, percentiles, run_rounds
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.models import ModelParts
from livediff.synthetic import SyntheticCamera

CAMERA_NOISE = 2.0
"""Sensor noise of the quality camera: standard deviation in levels of 255 (a decent webcam indoors)."""


@dataclass(frozen=True)
class QualityConfig:
    """One configuration under test: a label for the table and the stream params it runs."""

    label: str
    params: StreamParams


def quality_camera(settings: EngineSettings, count: int, seed: int = 0) -> list[np.ndarray]:
    """The quality run's frames: moving shapes over a still, noisy background."""
    camera = SyntheticCamera(settings.height, settings.width, seed=seed, still_background=True, noise=CAMERA_NOISE)
    return camera.frames(count)


class QualityLane:
    """One configuration on one engine: `plan.batch` streams stepped together; stream 0's outputs kept."""

    def __init__(self, engine: StreamEngine, config: QualityConfig, plan: BenchPlan, frames: list[np.ndarray]) -> None:
        self.engine = engine
        self.config = config
        self.plan = plan
        self.inputs = frames
        self.frames = [torch.from_numpy(frame) for frame in frames]
        params = config.params
        self.streams = [engine.open_stream(params.replace(seed=params.seed + i)) for i in range(plan.batch)]
        self.step_ms: list[float] = []
        self.recorded: list[int] = []
        self.outputs: list[np.ndarray] = []

    def run(self, index: int, record: bool) -> None:
        frame = self.frames[index]
        started = time.perf_counter()
        result = self.engine.step([(stream, frame) for stream in self.streams])
        elapsed = (time.perf_counter() - started) * 1000.0
        if record:
            self.step_ms.append(elapsed)
            self.recorded.append(index)
            self.outputs.append(result.outputs[0].numpy())

    def report(self) -> dict[str, Any]:
        frames = len(self.step_ms) * self.plan.batch
        figures = quality.measure([self.inputs[i] for i in self.recorded], self.outputs)
        return {
            "backend": self.engine.backend.name,
            "config": self.config.label,
            "batch": self.plan.batch,
            "frames": frames,
            "step_ms": percentiles(self.step_ms),
            "ms_per_frame": round(sum(self.step_ms) / frames, 3),
            "fps": round(1000.0 * frames / sum(self.step_ms), 2),
            **figures.as_dict(),
        }


def run_quality(
    settings_list: list[EngineSettings], plan: BenchPlan, configs: list[QualityConfig],
    parts: ModelParts | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One report: a row per (engine, configuration); `configs[0]` is each engine's baseline.

    Each row carries its figures and, but for the baseline, their ratios to the same engine's
    baseline (`vs_baseline`: below 1 is steadier or faster).
    """
    engines = []
    for settings in settings_list:
        engines.append(StreamEngine(settings, parts))
        parts = engines[-1].parts
    assert parts is not None
    frames = quality_camera(engines[0].settings, plan.rounds)
    lanes = [QualityLane(engine, config, plan, frames) for engine in engines for config in configs]
    run_rounds(list(lanes), plan)
    rows = [lane.report() for lane in lanes]
    for engine_rows in (rows[i : i + len(configs)] for i in range(0, len(rows), len(configs))):
        baseline = engine_rows[0]
        for row in engine_rows[1:]:
            row["vs_baseline"] = {key: _ratio(row[key], baseline[key])
                                  for key in ("warp_error", "flicker", "ssim", "ms_per_frame")}  # fmt: skip
    engine = engines[0]
    return {
        "model": f"{parts.ref} ({parts.revision})",
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "size": f"{engine.settings.width}x{engine.settings.height}",
        "steps": len(configs[0].params.timesteps),
        "strength": configs[0].params.strength,
        "stream_batch": engine.settings.stream_batch,
        "camera": f"moving shapes on a still background, sensor noise sigma {CAMERA_NOISE} levels",
        "frames_per_turn": plan.turn,
        "quality": rows,
    }


def _ratio(value: Any, base: Any) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return round(float(value) / float(base), 3)


def format_quality(report: dict[str, Any]) -> str:
    """A table of `report`: one row per engine and configuration, ratios to its baseline beside."""
    lines = [
        f"model {report['model']}  device {report['device']}  dtype {report['dtype']}  size {report['size']}  "
        f"steps {report['steps']}  strength {report['strength']}",
        f"camera: {report['camera']}; warp error and flicker in levels of 255 (lower is steadier), "
        "SSIM output vs input (1 = input's structure kept); (x) = ratio to the baseline",
        "",
        f"{'backend':<16}{'config':<26}{'ms/frame':>16}{'warp error':>18}{'flicker':>18}{'SSIM':>16}",
    ]

    def cell(row: dict[str, Any], key: str, width: int, fmt: str) -> str:
        value = row[key]
        text = "n/a" if value is None else format(value, fmt)
        ratio = row.get("vs_baseline", {}).get(key)
        if ratio is not None:
            text += f" ({ratio:.2f}x)"
        return f"{text:>{width}}"

    for row in report["quality"]:
        lines.append(
            f"{row['backend']:<16}{row['config']:<26}{cell(row, 'ms_per_frame', 16, '.1f')}"
            f"{cell(row, 'warp_error', 18, '.2f')}{cell(row, 'flicker', 18, '.2f')}{cell(row, 'ssim', 16, '.3f')}"
        )
    return "\n".join(lines)
