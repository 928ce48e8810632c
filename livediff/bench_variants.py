"""`python -m livediff.bench_variants`: each fast-path variant against eager torch, in one process.

For each variant (`torch`, `cuda-graph`, `cuda-graph-compiled`, `cuda-graph-compiled-fp8`, and with
`--autotune` `cuda-graph-compiled` with inductor's max-autotune options), on the same model, size,
dtype (`--dtype`: float16 on CUDA by default), frames and params:

1. time to ready: building the backend and warming up batch 1, 4 and 8 (for the compiled variant,
   its compiles, from the compile cache in `--engines-dir` when an earlier run left one);
2. ms per frame by stage at batch 1 (the engine's stage clock), ms per frame and fps at batch 1/4/8
   (wall clock over `--frames` steps; each step ends with its frames' copy to the host);
3. parity with eager torch: the same frames through a fresh stream of each, PSNR of every output
   frame (the worst reported) and the largest pixel difference (levels of 255);
4. features on the variant's path: a ControlNet (canny) and the feature bank (1 frame), each as ms
   per frame at batch 1 and the ratio to the plain step of the same variant;
5. the top 10 kernels of the fastest variant that matched, from `torch.profiler`; when GroupNorm is
   among them, `cuda-graph-fused-norm` (GroupNorm+SiLU in one kernel) is measured too, as 1-4.

A variant that cannot run here is skipped with its reason (float8 needs a GPU of compute capability
8.9 or above and torchao). On CUDA the measurement is appended to `<engines-dir>/backend-choice.json`,
which `--backend auto` reads (`livediff.backends.choice`).

The JSON report goes to standard output, a table to standard error. Without CUDA the graph variants
record through `host_capture` (a stand-in that recomputes a stage on replay: it checks the flow
and the parity, its times mean nothing) and the compiled variant runs only with `--compiled-on-cpu`
(inductor compiles for minutes on a small CPU). The GPU kit runs this as its `variants` step.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livediff.backends.choice import PSNR_MATCH_DB, best_variant, measurement, record
from livediff.backends.fp8 import fp8_unavailable
from livediff.config import ControlParams, EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.stream import STAGES
from livediff.models import ModelParts, load_model
from livediff.synthetic import SyntheticCamera

GROUP_NORM = re.compile(r"group_?norm", re.IGNORECASE)
"""A profiled kernel's name that says it is GroupNorm's (eager `native_group_norm`, a fused inductor one)."""
FUSED_NORM = "cuda-graph-fused-norm"
DEFAULT_VARIANTS = "torch,cuda-graph,cuda-graph-compiled,cuda-graph-compiled-fp8"


def host_capture(run: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
    """The CPU stand-in for a CUDA graph capture: a replay recomputes the stage into its recorded outputs."""
    from livediff.backends.cuda_graph import flatten

    outputs = run()

    def replay() -> None:
        for static, fresh in zip(flatten(outputs), flatten(run())):
            if isinstance(static, torch.Tensor):
                static.copy_(fresh)

    return outputs, replay


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 frames (peak 255); inf when identical."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def make_engine(variant: str, settings: EngineSettings, parts: ModelParts, engines_dir: Path) -> StreamEngine:
    """An engine running `variant` (on CUDA as `--backend` builds it; off CUDA through `host_capture`)."""
    from livediff.backends.compiled_graph import OPTIONS_AUTOTUNE, CompiledGraphBackend, inductor_options
    from livediff.backends.cuda_graph import CudaGraphBackend
    from livediff.backends.unet_extras import unet_extras
    from livediff.backends.variants import FusedNormGraphBackend

    cuda = parts.device.type == "cuda"
    base = variant.removesuffix("+autotune")
    settings = settings.replace(engines_dir=engines_dir)
    engine = StreamEngine(settings.replace(backend=base if cuda else "torch"), parts)
    capture = None if cuda else host_capture
    extras = unet_extras(settings, parts)
    if base == "cuda-graph" and not cuda:
        engine.backend = CudaGraphBackend(parts, capture=capture, extras=extras)
    elif base == FUSED_NORM and not cuda:  # the torch reference of the fused kernel, recorded by the stand-in
        engine.backend = FusedNormGraphBackend(parts, capture=capture, extras=extras)
    elif base == "cuda-graph-compiled" and (variant != base or not cuda):
        options = inductor_options(parts.device)
        if variant != base:
            options.update(OPTIONS_AUTOTUNE)
        engine.backend = CompiledGraphBackend(parts, capture=capture, extras=extras, engines_dir=engines_dir,
                                              options=options, size=(settings.height, settings.width))  # fmt: skip
    return engine


def _time_steps(engine: StreamEngine, params: list[StreamParams], frames: list[torch.Tensor], count: int,
                warm: int = 2) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Wall ms per step of len(params) streams over `count` steps after `warm`, and the mean stage ms."""
    streams = [engine.open_stream(p) for p in params]
    for i in range(warm):
        engine.step([(s, frames[i % len(frames)]) for s in streams])
    stages: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(count):
        result = engine.step([(s, frames[(warm + i) % len(frames)]) for s in streams])
        for name, ms in result.timings_ms.items():
            stages[name] = stages.get(name, 0.0) + ms / count
    return (time.perf_counter() - start) * 1000.0 / count, stages


def _outputs(engine: StreamEngine, params: StreamParams, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    stream = engine.open_stream(params)
    return [engine.step([(stream, frame)]).outputs[0].clone() for frame in frames]


def measure(variant: str, settings: EngineSettings, parts: ModelParts, frames: list[torch.Tensor], count: int,
            batches: list[int], engines_dir: Path, reference: list[torch.Tensor] | None,
            features: bool) -> tuple[dict[str, Any], StreamEngine]:  # fmt: skip
    """One variant's row of the report (see the module docstring) and its engine."""
    params = StreamParams(prompt="a watercolor painting", strength=0.5, seed=1)
    started = time.perf_counter()
    engine = make_engine(variant, settings, parts, engines_dir)
    for batch in batches:  # warm-up: every layout met twice (eager, then recorded)
        streams = [engine.open_stream(params.replace(seed=i)) for i in range(batch)]
        for _ in range(2):
            engine.step([(s, frames[0]) for s in streams])
    warmed = getattr(engine.backend, "warmed", None)
    if warmed is not None:
        warmed()
    row: dict[str, Any] = {"variant": variant, "backend": engine.backend.name,
                           "ready_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    compile_s = getattr(engine.backend, "compile_seconds", None)
    if compile_s is not None:
        row["compile_s"] = {name: round(sum(s.values()), 1) for name, s in compile_s().items()}
        cache = engine.backend.cache  # type: ignore[attr-defined]
        row["compile_cache"] = {"loaded": cache.loaded, "path": str(cache.path)} if cache is not None else None
    describe = getattr(engine.backend, "describe", None)
    if describe is not None:
        detail = describe()
        if "attention" in detail:
            row["attention"] = detail["attention"]["order"]
        for key in ("fp8_linear_layers", "fused_blocks", "group_norm_silu"):
            if key in detail:
                row[key] = detail[key]
    row["batches"] = {}
    for batch in batches:
        ms, stages = _time_steps(engine, [params.replace(seed=i) for i in range(batch)], frames, count)
        row["batches"][str(batch)] = {"ms_per_frame": round(ms / batch, 3), "fps": round(1000.0 * batch / ms, 1)}
        if batch == 1:
            row["stages_ms"] = {name: round(stages.get(name, 0.0), 3) for name in STAGES}
    outputs = _outputs(engine, params, frames)
    if reference is not None:
        scores = [psnr(a, b) for a, b in zip(reference, outputs)]
        worst = min(scores)
        row["parity"] = {"vs": "torch", "psnr_db": round(worst, 2),  # inf (JSON Infinity): identical frames
                         "max_abs": max(int((a.int() - b.int()).abs().max()) for a, b in zip(reference, outputs)),
                         "matches": worst >= PSNR_MATCH_DB}  # fmt: skip
    row["outputs"] = outputs
    if features:
        row["features"] = _features(variant, settings, parts, frames, count, engines_dir)
    return row, engine


def _features(variant: str, settings: EngineSettings, parts: ModelParts, frames: list[torch.Tensor], count: int,
              engines_dir: Path) -> dict[str, Any]:  # fmt: skip
    """A ControlNet (canny) and the feature bank on `variant`, each against its plain step (batch 1)."""
    source = parts.ref if parts.ref in ("tiny", "sd-turbo-random") else "tiny"
    featured = settings.replace(controlnets=(("canny", source),), feature_bank=True)
    engine = make_engine(variant, featured, parts, engines_dir)
    canny = StreamParams(seed=1, controlnet=(ControlParams("canny", "canny", 1.0),))
    for future in engine.control_loads(canny).values():
        future.result(timeout=600)
    cases = {"plain": StreamParams(seed=1), "controlnet-canny": canny, "bank-1": StreamParams(seed=1, temporal_bank=1)}
    result: dict[str, Any] = {}
    graphs = getattr(engine.backend, "graphs", None)
    for name, params in cases.items():
        before = len(graphs.layouts) if graphs is not None else 0
        ms, _ = _time_steps(engine, [params], frames, count, warm=3)
        result[name] = {"ms_per_frame": round(ms, 3)}
        if graphs is not None:  # whether its step ran from a recording (the fast path) or eagerly
            result[name]["recorded"] = len(graphs.layouts) > before
    for name in ("controlnet-canny", "bank-1"):
        result[name]["vs_plain"] = round(result[name]["ms_per_frame"] / result["plain"]["ms_per_frame"], 2)
    if graphs is not None:
        result["recorded_layouts"] = [repr(layout) for layout in graphs.layouts]
    return result


def top_kernels(
    engine: StreamEngine, frames: list[torch.Tensor], steps: int = 5, top: int = 10
) -> list[dict[str, Any]]:
    """The `top` kernels (device time on CUDA, CPU ops elsewhere) of `steps` batch-1 steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    stream = engine.open_stream(StreamParams(seed=1))
    engine.step([(stream, frames[0])])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            engine.step([(stream, frames[i % len(frames)])])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return [{"name": e.key[:100], "ms_per_step": round(getattr(e, key, 0.0) / 1000.0 / steps, 4),
             "calls_per_step": round(e.count / steps, 1)} for e in events[:top]]  # fmt: skip


def table(report: dict[str, Any]) -> str:
    """The report as a text table: one line per variant."""
    lines = [f"variants: {report['model']} {report['size']} {report['dtype']} on {report['device']}"]
    for row in report["variants"]:
        fps = ", ".join(f"b{b} {v['fps']:.1f} fps ({v['ms_per_frame']:.2f} ms/f)" for b, v in row["batches"].items())
        stages = " ".join(f"{k} {v:.2f}" for k, v in row.get("stages_ms", {}).items())
        parity = row.get("parity")
        match = "" if parity is None else f"; PSNR {parity['psnr_db']} dB, max diff {parity['max_abs']}"
        compiled = f"; compile {row['compile_s']}" if row.get("compile_s") else ""
        feats = row.get("features", {})
        feat = "".join(
            f"; {k} {v['vs_plain']}x plain" for k, v in feats.items() if isinstance(v, dict) and "vs_plain" in v
        )
        lines.append(
            f"  {row['variant']:<28} ready {row['ready_s']} s; {fps}; stages ms: {stages}{match}{compiled}{feat}"
        )
    for name, why in report.get("skipped", {}).items():
        lines.append(f"  {name:<28} skipped: {why}")
    lines.append(f"  fastest matching: {report['best']}")
    if report.get("fused_norm"):
        lines.append(f"  {FUSED_NORM}: {report['fused_norm']}")
    for kernel in report.get("profile", {}).get("top", []):
        lines.append(f"    {kernel['ms_per_step']:>9.3f} ms/step x{kernel['calls_per_step']:<6} {kernel['name']}")
    return "\n".join(lines)


def runnable(variants: list[str], device: torch.device, compiled_on_cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The variants that can run on `device`, and the others with the reason they are skipped."""
    skipped: dict[str, str] = {}
    fp8_why = fp8_unavailable(device)
    for variant in variants:
        if variant.startswith("cuda-graph-compiled-fp8") and fp8_why is not None:
            skipped[variant] = fp8_why
        elif variant.startswith("cuda-graph-compiled") and device.type != "cuda" and not compiled_on_cpu:
            skipped[variant] = "needs CUDA (or --compiled-on-cpu)"
    return [v for v in variants if v not in skipped], skipped


def group_norm_kernels(top: list[dict[str, Any]]) -> list[str]:
    """The names among profiled kernels that are GroupNorm's."""
    return [k["name"] for k in top if GROUP_NORM.search(k["name"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="the engine's dtype (default float16 on CUDA, float32 on the CPU)")  # fmt: skip
    parser.add_argument("--autotune", action="store_true", help="also cuda-graph-compiled with max-autotune")
    parser.add_argument("--compiled-on-cpu", action="store_true", help="run the compiled variant without CUDA too")
    parser.add_argument("--no-features", action="store_true", help="skip the ControlNet and bank rows")
    parser.add_argument("--no-fused-norm", action="store_true",
                        help=f"never add {FUSED_NORM}, even when GroupNorm is among the top kernels")  # fmt: skip
    parser.add_argument("--engines-dir", type=Path, default=Path("engines"), help="where the compile cache lives")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.autotune:
        variants.append("cuda-graph-compiled+autotune")
    variants, skipped = runnable(variants, device, args.compiled_on_cpu)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16 if device.type == "cuda" else torch.float32
    parts = load_model(args.model, device, dtype)
    settings = EngineSettings(model=args.model, height=args.size, width=args.size, max_batch=max(batches))
    frames = [torch.from_numpy(np.ascontiguousarray(f)) for f in SyntheticCamera(args.size, args.size).frames(8)]
    rows: list[dict[str, Any]] = []
    engines: dict[str, StreamEngine] = {}
    reference: list[torch.Tensor] | None = None

    def run(variant: str) -> None:
        nonlocal reference
        print(f"variants: measuring {variant}", file=sys.stderr, flush=True)
        row, engine = measure(variant, settings, parts, frames, args.frames, batches, args.engines_dir, reference,
                              features=not args.no_features)  # fmt: skip
        if variant == "torch":
            reference = row["outputs"]
        del row["outputs"]
        rows.append(row)
        engines[variant] = engine

    for variant in variants:
        run(variant)
    report: dict[str, Any] = {
        "model": f"{parts.ref} ({parts.revision})",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "size": f"{args.size}x{args.size}",
        "variants": rows,
        "skipped": skipped,
        "best": best_variant(rows),
    }
    if report["best"] is not None:
        report["profile"] = {"variant": report["best"], "top": top_kernels(engines[report["best"]], frames)}
        norms = group_norm_kernels(report["profile"]["top"])
        if norms and FUSED_NORM not in engines and not args.no_fused_norm:
            report["fused_norm"] = f"measured: GroupNorm among the top kernels of {report['best']} ({norms[0]})"
            run(FUSED_NORM)
            report["best"] = best_variant(rows)
        elif FUSED_NORM not in engines:
            report["fused_norm"] = "not measured: " + (
                "--no-fused-norm" if norms else f"no GroupNorm among the top kernels of {report['best']}"
            )
    if device.type == "cuda":  # what `--backend auto` reads (CPU times through the host stand-in mean nothing)
        entry = measurement(report, report["device"], torch.__version__)
        report["choice_file"] = str(record(args.engines_dir, entry))
    print(table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
