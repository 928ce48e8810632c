"""`livediff bench --controlnet canny,depth`: what ControlNet conditioning costs, beside the same engine without.

On each backend one engine runs the camera through one lane per configuration: first ControlNet
off, then one ControlNet per control image asked for (the engine's ControlNets are named after
the control images they run with: `--controlnet canny,depth` loads the model's built-in ControlNet
twice, `--controlnet canny=SOURCE` another). The lanes take turns of
`plan.turn` frames as in `livediff bench`, so the host's busy spells slow all of them alike; each
row gives every stage's p50/p95 (the preprocessor's and the ControlNet's among them), ms per frame,
fps and the ratio of its ms per frame to ControlNet off.

With `plan.streams` (e.g. 2), N streams, stream i with the i-th ControlNet (round robin), run as
one batched step per frame against N separate steps, the two taking turns like the lanes above:
what sharing a step buys streams that each use another ControlNet. The ControlNets named after
the preprocessors are separate networks, each run on its own rows (loaded from the same source or
not, the cost is that of two ControlNets).

Both the mean and the median (p50) ms per frame are given, each with its ratio to ControlNet off:
on a host shared with other work a few stalled frames move the mean, the median much less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livediff.bench import BenchPlan, EngineLane, percentiles, run_rounds
from livediff.config import PREPROCESSORS, ControlParams, EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import ConfigError
from livediff.models import ModelParts
from livediff.synthetic import SyntheticCamera

LOAD_TIMEOUT_S = 1800.0
"""Longest wait for a ControlNet to load before the run (an export and compile on a slow CPU)."""


@dataclass(frozen=True)
class ControlConfig:
    """One configuration under test: a label for the table and the stream params it runs."""

    label: str
    params: StreamParams


def control_configs(base: StreamParams, preprocessors: list[str], scale: float = 1.0) -> list[ControlConfig]:
    """ControlNet off, then one ControlNet per preprocessor."""
    configs = [ControlConfig("off", base.replace(controlnet=()))]
    for name in preprocessors:
        control = ControlParams(name=name, preprocessor=name, scale=scale)
        configs.append(ControlConfig(name, base.replace(controlnet=(control,))))
    return configs


class MixedLane:
    """N streams, each with its own params, stepped together (`batched`) or one step each."""

    def __init__(self, engine: StreamEngine, params: list[StreamParams], batched: bool, plan: BenchPlan,
                 frames: list[np.ndarray]) -> None:  # fmt: skip
        self.engine = engine
        self.batched = batched
        self.frames = [torch.from_numpy(frame) for frame in frames]
        self.streams = [engine.open_stream(p.replace(seed=p.seed + i)) for i, p in enumerate(params)]
        self.frame_ms: list[float] = []
        """Per camera frame: the time to turn all N streams' frames (ms)."""

    def run(self, index: int, record: bool) -> None:
        frame = self.frames[index]
        started = time.perf_counter()
        if self.batched:
            self.engine.step([(stream, frame) for stream in self.streams])
        else:
            for stream in self.streams:
                self.engine.step([(stream, frame)])
        if record:
            self.frame_ms.append((time.perf_counter() - started) * 1000.0)

    def report(self) -> dict[str, Any]:
        count = len(self.streams) * len(self.frame_ms)
        return {"fps": round(1000.0 * count / sum(self.frame_ms), 2), "round_ms": percentiles(self.frame_ms)}


def wait_for_controlnets(engine: StreamEngine, configs: list[ControlConfig]) -> None:
    """Load every ControlNet (and the depth model) the configurations use before timing anything."""
    for config in configs:
        for future in engine.control_loads(config.params).values():
            future.result(timeout=LOAD_TIMEOUT_S)


def run_controlnet_bench(settings_list: list[EngineSettings], plan: BenchPlan, streams: tuple[int, ...] = (),
                         parts: ModelParts | None = None) -> dict[str, Any]:  # fmt: skip
    """One report: a row per (engine, configuration), `runs[...]["vs_off"]` the ratio of its ms per
    frame to the same engine's ControlNet off; then the mixed-ControlNet streams comparison per count.

    The settings' ControlNets (the same in each) are named after the control images they are run
    with (`canny`, `depth`, `previous`).
    """
    preprocessors = [name for name, _ in settings_list[0].controlnets]
    if not preprocessors or any(name not in PREPROCESSORS for name in preprocessors):
        raise ConfigError(f"name each ControlNet after its control image ({', '.join(PREPROCESSORS)})")
    configs = control_configs(plan.params, preprocessors)
    engines = []
    for settings in settings_list:
        engines.append(StreamEngine(settings, parts))
        parts = engines[-1].parts
        wait_for_controlnets(engines[-1], configs)
    assert parts is not None
    engine = engines[0]
    frames = SyntheticCamera(engine.settings.height, engine.settings.width).frames(plan.rounds)
    lanes = [EngineLane(e, plan, frames, config.params, config.label) for e in engines for config in configs]
    run_rounds(list(lanes), plan)
    rows = [lane.report() for lane in lanes]
    for engine_rows in (rows[i : i + len(configs)] for i in range(0, len(rows), len(configs))):
        off = engine_rows[0]
        for row in engine_rows[1:]:
            row["vs_off"] = round(row["ms_per_frame"] / off["ms_per_frame"], 3)
            row["vs_off_p50"] = round(row["step_ms"]["p50"] / off["step_ms"]["p50"], 3)
    report: dict[str, Any] = {
        "model": f"{parts.ref} ({parts.revision})",
        "controlnet": ", ".join(sorted({source for _, source in engine.settings.controlnets})),
        "depth_model": engine.settings.depth_model or None,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "size": f"{engine.settings.width}x{engine.settings.height}",
        "steps": len(plan.params.timesteps),
        "strength": plan.params.strength,
        "frames_per_turn": plan.turn,
        "runs": rows,
    }
    for count in streams:
        mixed = [configs[1 + i % len(preprocessors)].params for i in range(count)]
        together, apart = (MixedLane(engine, mixed, batched, plan, frames) for batched in (True, False))
        run_rounds([together, apart], plan)
        batched, sequential = together.report(), apart.report()
        report.setdefault("streams", []).append({
            "streams": count, "controlnets": [p.controlnet[0].name for p in mixed], "batched": batched,
            "sequential": sequential, "speedup": round(batched["fps"] / sequential["fps"], 2),
            "speedup_p50": round(sequential["round_ms"]["p50"] / batched["round_ms"]["p50"], 2),
        })  # fmt: skip
    return report


def format_controlnet(report: dict[str, Any]) -> str:
    """A table of `report`: per engine and configuration, each stage's p50 and the frame's cost."""
    stages: list[str] = []
    for row in report["runs"]:  # every row's stages in the order they ran, new ones after their predecessor
        for i, stage in enumerate(row["stages_ms"]):
            if stage not in stages:
                before = list(row["stages_ms"])[i - 1] if i else None
                stages.insert(stages.index(before) + 1 if before in stages else len(stages), stage)
    lines = [
        f"model {report['model']}  ControlNet {report['controlnet']}  device {report['device']}  "
        f"dtype {report['dtype']}  size {report['size']}  steps {report['steps']}  strength {report['strength']}",
        "stages: p50 ms per step; ms per frame, mean and p50, (x) against ControlNet off on the same engine",
        "",
        f"{'backend':<16}{'controlnet':<12}"
        + "".join(f"{stage:>12}" for stage in stages)
        + f"{'mean ms':>17}{'p50 ms':>17}{'fps':>8}",
    ]
    for row in report["runs"]:
        cells = "".join(
            f"{row['stages_ms'][stage]['p50']:>12.1f}" if stage in row["stages_ms"] else f"{'-':>12}"
            for stage in stages
        )
        mean = f"{row['ms_per_frame']:.1f}" + (f" ({row['vs_off']:.2f}x)" if "vs_off" in row else "")
        median = f"{row['step_ms']['p50']:.1f}" + (f" ({row['vs_off_p50']:.2f}x)" if "vs_off_p50" in row else "")
        lines.append(f"{row['backend']:<16}{row['config']:<12}{cells}{mean:>17}{median:>17}{row['fps']:>8.1f}")
    for streams in report.get("streams", []):
        b, s = streams["batched"], streams["sequential"]
        lines.append(
            f"{streams['streams']} streams ({', '.join(streams['controlnets'])}): batched {b['fps']:.1f} fps "
            f"(p50 {b['round_ms']['p50']:.1f} ms a round), separate steps {s['fps']:.1f} fps "
            f"(p50 {s['round_ms']['p50']:.1f} ms): {streams['speedup']:.2f}x, {streams['speedup_p50']:.2f}x at p50"
        )
    return "\n".join(lines)
