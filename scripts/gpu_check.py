"""The GPU check (`scripts/gpu-check`, docs/gpu-check.md): what a session lent a GPU measures, in one call.

Steps, in order, each in its own process under its own time limit, all inside one budget
(`--budget`, seconds); a step the remaining budget cannot hold is skipped, and so said:

1. `environment`: Python, torch, CUDA, GPU, package versions (decides GPU run or dry run);
2. `gpu-tests`: `pytest -m gpu` over the test files that hold GPU tests;
3. `model`: the model built or found (`sd-turbo-random`: SD-Turbo's architecture at random weights);
4. `bench-batch1`: `livediff bench` at 512x512, 1 step, batch 1, `torch` and `cuda-graph` taking
   turns, beside diffusers' `AutoPipelineForImage2Image` in the engine's float16;
5. `bench-batch4`: the same two backends at batch 4 (four streams per step);
6. `streams`: `--streams 1,4,8` on `cuda-graph`: aggregate fps, each stream's p99;
7. `controlnet`: `--controlnet canny,depth --streams 4` on `torch` (each control image against
   ControlNet off at batch 1, and 4 streams with different ControlNets in one step against apart);
8. `temporal`, `temporal-batch4`: `--quality` with feature banks of 1 and 2 frames against none,
   batch 1 and 4 (warp error, static flicker, SSIM, ms per frame);
9. `g2g`: `livediff bench --g2g`: a real `livediff serve` app (`--backend auto`) and an aiortc
   client over loopback, glass-to-glass for passthrough and the model, and each stage's share;
10. `video`, `video-480p`, `video-eager`: `livediff bench --model wan-1.3b-random` (a causal video
   model, Wan 2.1 1.3B's architecture at random weights, bf16, `--backend auto`: the transformer
   step replayed from CUDA graphs per layout): 512x512 at 1 step with 1, 2 and 4 streams per step,
   and 832x480 at 2 steps with 1 and 2 (ms per chunk and frame by stage, fps, first chunk latency,
   memory per added stream; docs/video-models.md); `video-eager` the 512x512 single stream on eager
   torch, the fast path's baseline;
11. `bench-compile`: `torch.compile` beside `torch` at batch 1 (late: it compiles for minutes);
12. `variants`: `python -m livediff.bench_variants`: `torch`, `cuda-graph`, `cuda-graph-compiled`
    (inductor's kernels inside the step's CUDA graphs) and `cuda-graph-compiled-fp8` (the UNet's
    large linear layers in float8) side by side in float16: time to ready with compile times, ms per
    frame by stage, fps at batch 1/4/8, parity with eager torch (PSNR, largest pixel difference), a
    ControlNet and the feature bank against the plain step on each (and whether that step replayed
    a recording), the top 10 kernels of the fastest variant that matched (torch.profiler), and
    `cuda-graph-fused-norm` (GroupNorm+SiLU in one Triton kernel) when GroupNorm is among them; the
    compile cache and `backend-choice.json` (what `--backend auto` reads) go to the checkout's
    `engines/`, copied to `$OUT/engines` (carry it back as `engines` next call);
13. `variants-warm`: the compiled variant again in a fresh process: its time to ready from the cache;
14. `variants-bf16`: `torch`, `cuda-graph-compiled` and `cuda-graph-compiled-fp8` in bfloat16 at
    batch 1/4/8 (float8 against bfloat16, as `variants` holds it against float16);

and `nvidia-smi`'s clocks and memory before the first step and after the last. The results go to
`$OUT` (or `--out`): `gpu-check.json` (every step's result, the verdict), `gpu-check.txt` (the
summary, also printed last) and `gpu-check.log` (every step's command and output).

Without CUDA, or with `--dry-run`, the same steps run on the CPU with `tiny` at 64x64 and a few
frames, the CUDA-only parts skipped with their reason: CI runs that, so the script never rots.
The exit status is 1 when a step failed or ran out of its time, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {"batch1_fps": 200.0, "streams4_fps": 400.0, "speedup_vs_torch": 2.0}
"""Issue 13's targets on an H100/H200: >= 200 fps at batch 1 with the fast path, >= 400 fps
aggregate over 4 batched streams, the fast path >= 2x eager torch at batch 1."""

ANCHORS = {
    "streamdiffusion_speedup_over_autopipeline": 59.6,
    "streamdiffusion_sd_turbo_1step_fps_rtx4090_tensorrt": "91-94",
}
"""The StreamDiffusion paper's figures (Kodaira et al. 2023, arXiv:2312.12491): throughput over
diffusers' AutoPipelineForImage2Image, and SD-Turbo 1-step img2img fps with TensorRT on an RTX 4090."""

MATCH = {"max_abs": 2, "mean_abs": 0.05}
"""Frames within this many levels of 255 of eager torch's count as matching it."""

ENV_PROBE = r"""
import importlib.metadata, json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
for name in ("diffusers", "transformers", "huggingface_hub", "numpy", "pytest"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info[name] = None
print(json.dumps(info))
"""

SMI_FIELDS = (
    "name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
    "memory.used,memory.total,temperature.gpu,power.draw,utilization.gpu"
)
SMI_FEW = "name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total"
"""Asked for when a driver refuses one of SMI_FIELDS (nvidia-smi then answers none)."""


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: float
    """This step's own time limit; the budget may cut it shorter."""
    parse: Callable[[str], Any] | None = None
    """Turns the step's standard output into its result."""
    skip: str | None = None
    """Why the step does not run here (None: it runs)."""
    note: str | None = None
    """What a reader of the result should know (a dry run's changes to the step)."""


def bench_json(stdout: str) -> Any:
    """The report `livediff bench --json` printed (the first `{` on a line of its own onwards)."""
    start = stdout.find("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def pytest_counts(stdout: str) -> dict[str, int]:
    """{'passed': 9, 'skipped': 2, ...} from pytest's last summary line."""
    lines = [line for line in stdout.strip().splitlines() if " in " in line and re.search(r"\d+ \w+", line)]
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", lines[-1] if lines else "")
    return {kind.rstrip("s") + ("s" if kind.startswith("error") else ""): int(n) for n, kind in counts}


GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*pytest\.mark\.gpu\b)", re.MULTILINE)


def gpu_test_files() -> list[str]:
    """The test files that mark tests `gpu` (collecting only these keeps the page and server tests'
    imports, absent on the device, out of the way)."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if GPU_MARK.search(p.read_text())]


def plan(gpu: bool, python: str, size: int) -> list[Step]:
    """The steps, for a GPU run or a dry run on the CPU (`tiny`, a few frames, torch alone)."""
    model, frames, warmup, few = ("sd-turbo-random", 100, 10, 50) if gpu else ("tiny", 2, 0, 2)
    bench = [python, "-m", "livediff.cli", "bench", "--model", model, "--size", str(size), "--steps", "1", "--json"]
    backends = "torch,cuda-graph" if gpu else "torch"
    note = None if gpu else "dry run: cuda-graph needs CUDA, so torch runs alone"
    build = f"from livediff.models.builtin import builtin_dir; print(builtin_dir({model!r}))"
    return [
        Step("gpu-tests", [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           *gpu_test_files()], 150, pytest_counts),
        Step("model", [python, "-c", build], 240, lambda out: {"model": model, "folder": out.strip()}),
        Step("bench-batch1", [*bench, "--backend", backends, "--batch", "1", "--frames", str(frames),
                              "--warmup", str(warmup), "--baseline", "diffusers"], 180, bench_json, note=note),
        Step("bench-batch4", [*bench, "--backend", backends, "--batch", "4", "--frames", str(few),
                              "--warmup", str(warmup)], 150, bench_json, note=note),
        Step("streams", [*bench, "--backend", backends.split(",")[-1], "--streams", "1,4,8", "--frames", str(few),
                         "--warmup", str(warmup)], 180, bench_json, note=note),
        Step("controlnet", [*bench, "--backend", "torch", "--controlnet", "canny,depth", "--streams", "4",
                            "--frames", str(few), "--warmup", str(warmup)], 240, bench_json),
        *(Step(name, [*bench, "--backend", "torch", "--quality", "--batch", batch, "--temporal", '{"bank": 1}',
                      "--temporal", '{"bank": 2}', "--frames", str(few), "--warmup", str(warmup)], 180, bench_json)
          for name, batch in (("temporal", "1"), ("temporal-batch4", "4"))),
        Step("g2g", [python, "-m", "livediff.cli", "bench", "--g2g", "--model", model, "--size", str(size),
                     "--backend", "auto" if gpu else "torch", "--cases", "pass-both,model-both",
                     "--duration", "10" if gpu else "2", "--fps", "30", "--json"], 180, bench_json,
             note=None if gpu else "dry run: torch (auto would export ONNX or OpenVINO networks on the CPU)"),
        *video_steps(gpu, python),
        Step("bench-compile", [*bench, "--backend", "torch,torch.compile", "--batch", "1", "--frames", str(few),
                               "--warmup", str(warmup)], 300, bench_json,
             skip=None if gpu else "dry run: torch.compile takes minutes on 2 CPU cores"),
        *variant_steps(gpu, python, model, size),
    ]  # fmt: skip


def video_steps(gpu: bool, python: str) -> list[Step]:
    """The video model's bench (`bench --model wan-1.3b-random`); a dry run: `tiny-video` at 64x64, 2 chunks."""
    model, frames, warmup = ("wan-1.3b-random", "40", "8") if gpu else ("tiny-video", "8", "8")
    bench = [python, "-m", "livediff.cli", "bench", "--model", model, "--json", "--frames", frames, "--warmup", warmup]
    note = None if gpu else "dry run: tiny-video at 64x64 (wan-1.3b-random needs a GPU's memory and time)"
    sizes = (("512", "1", "1,2,4"), ("832x480", "2", "1,2")) if gpu else (("64", "1", "1,2"), ("64", "2", "1"))
    # auto: the fast path on CUDA (the step replayed from CUDA graphs per layout); video-eager: its baseline
    steps = [
        Step(
            name,
            [*bench, "--backend", "auto", "--size", size, "--steps", steps, "--streams", streams],
            240,
            bench_json,
            note=note,
        )  # fmt: skip
        for name, (size, steps, streams) in zip(("video", "video-480p"), sizes)
    ]
    size, steps_, _ = sizes[0]
    eager = [*bench, "--backend", "torch", "--size", size, "--steps", steps_, "--streams", "1"]
    return [*steps, Step("video-eager", eager, 180, bench_json, note=note)]


def video_line(name: str, result: dict[str, Any]) -> str:
    """One line of a `video` step: fps, ms per frame, first chunk and memory per stream count, and for
    2 or more streams a step's transformer for mixed cache lengths, padded in one call or one call per stream."""
    cells = [f"{r['streams']} stream(s) {r['fps']:.1f} fps ({r['fps_vs_1_stream']}x one), {r['ms_per_frame']:.1f} "
             f"ms/frame, first chunk {r['first_chunk_ms']:.0f} ms, {r['memory_per_stream_mib']:.1f} MiB/stream"
             + (f", mixed caches: padded {r['mixed_cache']['padded_ms']:.1f} ms vs per stream "
                f"{r['mixed_cache']['per_stream_ms']:.1f} ms" if "mixed_cache" in r else "")
             for r in result["results"]]  # fmt: skip
    head = f"{name} ({result['model']}, {result['size']}, {result.get('backend', 'torch')}, {result['dtype']}, "
    return head + f"{result['steps']} step(s)): " + "; ".join(cells)


def variant_steps(gpu: bool, python: str, model: str, size: int) -> list[Step]:
    """`variants` and `variants-warm` (see the module docstring); a dry run measures torch and
    cuda-graph (recorded through a host stand-in) at batch 1 on one frame, the compiled variant skipped."""
    variants = [python, "-m", "livediff.bench_variants", "--model", model, "--size", str(size),
                "--engines-dir", str(ROOT / "engines")]  # fmt: skip
    if gpu:
        return [
            Step("variants", [*variants, "--frames", "30", "--batches", "1,4,8"], 420, bench_json),
            Step(
                "variants-warm",
                [
                    *variants,
                    "--variants",
                    "cuda-graph-compiled",
                    "--frames",
                    "10",
                    "--batches",
                    "1,4,8",
                    "--no-features",
                ],
                240,
                bench_json,
            ),  # fmt: skip
            Step("variants-bf16", [*variants, "--dtype", "bfloat16", "--variants", BF16_VARIANTS, "--frames", "20",
                                   "--batches", "1,4,8", "--no-features", "--no-fused-norm"], 300, bench_json),
        ]  # fmt: skip
    return [
        Step(
            "variants",
            [*variants, "--frames", "1", "--batches", "1"],
            240,
            bench_json,
            note="dry run: cuda-graph (and cuda-graph-fused-norm's torch reference, GroupNorm being among the "
            "CPU's top ops) through a host stand-in (its times mean nothing), the compiled variants skipped "
            "(inductor compiles for minutes on 2 CPU cores; float8 needs a GPU)",
        ),  # fmt: skip
        Step("variants-warm", [], 60, skip="dry run: the compiled variant needs CUDA"),
        Step("variants-bf16", [*variants, "--dtype", "bfloat16", "--variants", BF16_VARIANTS, "--frames", "1",
                               "--batches", "1", "--no-features", "--no-fused-norm"], 180, bench_json,
             note="dry run: torch in bfloat16 on the CPU; the compiled variants skipped (float8 needs a GPU of "
                  "compute capability 8.9 or above)"),
    ]  # fmt: skip


BF16_VARIANTS = "torch,cuda-graph-compiled,cuda-graph-compiled-fp8"
"""The `variants-bf16` step's: float8 against the compiled variant and eager torch in bfloat16."""

VARIANT_TARGETS = {"batch1_ms": 5.0, "feature_vs_plain": 1.3, "psnr_db": 40.0, "warm_ready_s": 60.0}
"""Issue 26's targets: batch 1 <= 5 ms a frame, a ControlNet or the bank <= 1.3x the plain step on
the fast path, PSNR >= 40 dB against eager torch, a warm start from the compile cache <= 60 s."""


def variants_verdict(steps: dict[str, dict[str, Any]], gpu: bool = True) -> dict[str, Any]:
    """The `variants` steps against issue 26's targets, and the variant `--backend auto` may pick on
    CUDA from these numbers (the fastest at batch 1 that matched eager torch)."""
    report, warm = _result(steps, "variants"), _result(steps, "variants-warm")
    rows = {r["variant"]: r for r in (report or {}).get("variants", [])}
    best = (report or {}).get("best")
    row = rows.get(best) if best else None
    warm_row = next(iter((warm or {}).get("variants", [])), None)
    feature_ratios = [v["vs_plain"] for v in (row or {}).get("features", {}).values()
                      if isinstance(v, dict) and "vs_plain" in v]  # fmt: skip
    parity = (row or {}).get("parity") or {}
    values = {
        "batch1_ms": row["batches"]["1"]["ms_per_frame"] if row else None,
        "feature_vs_plain": max(feature_ratios) if feature_ratios else None,
        "psnr_db": parity.get("psnr_db"),
        "warm_ready_s": warm_row["ready_s"] if warm_row else None,
    }
    below = {"batch1_ms", "feature_vs_plain", "warm_ready_s"}
    targets = {
        name: {"value": values[name], "target": target,
               "met": None if values[name] is None or not gpu
               else (values[name] <= target if name in below else values[name] >= target)}
        for name, target in VARIANT_TARGETS.items()
    }  # fmt: skip
    return {"best": best, "auto_may_pick": best if gpu and best else None, "targets": targets}


def variants_lines(report: dict[str, Any]) -> list[str]:
    """`bench_variants`' JSON as summary lines: a row per variant, then the profile's top kernels."""
    lines = [f"variants ({report['model']}, {report['size']}, {report['dtype']}, {report['device']}):"]
    for row in report["variants"]:
        fps = ", ".join(f"b{b} {v['fps']:.1f} fps {v['ms_per_frame']:.2f} ms/f" for b, v in row["batches"].items())
        stages = " ".join(f"{k} {v:.2f}" for k, v in row.get("stages_ms", {}).items())
        cell = f"  {row['variant']}: ready {row['ready_s']} s; {fps}; stage ms {stages}"
        if row.get("parity"):
            p = row["parity"]
            cell += f"; PSNR {p['psnr_db']} dB, max diff {p['max_abs']}"
        if row.get("compile_s"):
            cell += f"; compile s {row['compile_s']} (cache loaded: {(row.get('compile_cache') or {}).get('loaded')})"
        for name, feature in row.get("features", {}).items():
            if isinstance(feature, dict) and "vs_plain" in feature:
                cell += f"; {name} {feature['ms_per_frame']:.2f} ms ({feature['vs_plain']}x plain)"
        lines.append(cell)
    for name, why in report.get("skipped", {}).items():
        lines.append(f"  {name}: skipped ({why})")
    if report.get("fused_norm"):
        lines.append(f"  cuda-graph-fused-norm: {report['fused_norm']}")
    profile = report.get("profile") or {}
    if profile:
        lines.append(f"  top kernels of {profile['variant']}: " + "; ".join(
            f"{k['name'][:48]} {k['ms_per_step']:.3f} ms" for k in profile["top"]))  # fmt: skip
    return lines


def run_step(step: Step, limit_s: float, log: Any, env: dict[str, str]) -> dict[str, Any]:
    """Run one step in its own process group; killed (TERM, then KILL) at `limit_s`."""
    record: dict[str, Any] = {"name": step.name, "command": " ".join(step.argv)}
    if step.note:
        record["note"] = step.note
    log.write(f"\n===== {step.name}: {record['command']} (limit {limit_s:.0f} s)\n")
    log.flush()
    started = time.monotonic()
    process = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=limit_s)
        record["status"] = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill(process)
        stdout, stderr = process.communicate()
        record["status"] = "timeout"
    record["seconds"] = round(time.monotonic() - started, 1)
    record["returncode"] = process.returncode
    log.write(stdout + ("\n----- stderr\n" + stderr if stderr else ""))
    log.flush()
    if record["status"] == "ok" and step.parse is not None:
        try:
            record["result"] = step.parse(stdout)
        except Exception as exc:  # noqa: BLE001 - whatever the output was, the record says so and the run goes on
            record["status"] = "failed"
            record["error"] = f"could not read the output: {exc!r}"
    if record["status"] == "failed" and step.name == "gpu-tests":
        record["result"] = pytest_counts(stdout)
    if record["status"] != "ok":
        record.setdefault("error", _tail(stderr or stdout))
    return record


def _kill(process: subprocess.Popen[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def nvidia_smi() -> dict[str, Any]:
    """nvidia-smi's reading of each GPU (clocks in MHz, memory in MiB), or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return {"skipped": "nvidia-smi not found"}
    failure = ""
    for fields in (SMI_FIELDS, SMI_FEW):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout  # fmt: skip
        except subprocess.CalledProcessError as exc:
            failure = (exc.stdout or exc.stderr or str(exc)).strip()
            continue
        except (subprocess.SubprocessError, OSError) as exc:
            return {"skipped": f"nvidia-smi failed: {exc}"}
        names = fields.split(",")
        return {"gpus": [dict(zip(names, (v.strip() for v in line.split(",")))) for line in out.strip().splitlines()]}
    return {"skipped": f"nvidia-smi failed: {failure}"}


# -- what the numbers say ----------------------------------------------------------------------------


def _run(report: Any, backend: str) -> dict[str, Any] | None:
    if not isinstance(report, dict):
        return None
    return next((run for run in report.get("runs", []) if run["backend"] == backend), None)


def _result(steps: dict[str, dict[str, Any]], name: str) -> Any:
    step = steps.get(name, {})
    return step.get("result") if step.get("status") == "ok" else None


def verdict(steps: dict[str, dict[str, Any]], gpu: bool = True) -> dict[str, Any]:
    """The numbers against the targets and anchors, and whether `--backend auto` may pick `cuda-graph`
    (faster than eager torch at batch 1 and 4 in the same runs, its frames matching, the GPU tests
    passed). A dry run's numbers are held against no target."""
    b1, b4, streams = (_result(steps, n) for n in ("bench-batch1", "bench-batch4", "streams"))
    eager1, fast1 = _run(b1, "torch"), _run(b1, "cuda-graph")
    eager4, fast4 = _run(b4, "torch"), _run(b4, "cuda-graph")
    speedup1 = round(eager1["ms_per_frame"] / fast1["ms_per_frame"], 2) if eager1 and fast1 else None
    speedup4 = round(eager4["ms_per_frame"] / fast4["ms_per_frame"], 2) if eager4 and fast4 else None
    parity = [run["parity"] for run in (fast1, fast4) if run and "parity" in run]
    matches = bool(parity) and all(p["max_abs"] <= MATCH["max_abs"] and p["mean_abs"] <= MATCH["mean_abs"]
                                   for p in parity)  # fmt: skip
    # sd-turbo-random's random weights may saturate its frames; the GPU tests hold cuda-graph to
    # eager torch on the calibrated tiny model, so they must have run and passed too
    tests = _result(steps, "gpu-tests") or {}
    tests_passed = tests.get("passed", 0) > 0 and not tests.get("failed") and not tests.get("errors")
    four = next((s for s in (streams or {}).get("streams", []) if s["streams"] == 4), None)
    values = {
        "batch1_fps": fast1["fps"] if fast1 else None,
        "streams4_fps": four["batched"]["fps"] if four else None,
        "speedup_vs_torch": speedup1,
    }
    targets = {name: {"value": values[name], "target": target,
                      "met": None if values[name] is None or not gpu else values[name] >= target}
               for name, target in TARGETS.items()}  # fmt: skip
    baseline = b1.get("baseline") if isinstance(b1, dict) else None
    over_baseline = {
        run["backend"]: round(baseline["ms_per_frame"] / run["ms_per_frame"], 2)
        for run in (b1 or {}).get("runs", [])
        if baseline
    }
    faster = speedup1 is not None and speedup1 > 1.0 and (speedup4 is None or speedup4 > 1.0)
    return {
        "cuda_graph": {
            "speedup_vs_torch_batch1": speedup1,
            "speedup_vs_torch_batch4": speedup4,
            "parity_vs_torch": parity,
            "matches_torch": matches if parity else None,
            "match_rule_levels": MATCH,
        },  # fmt: skip
        "gpu_tests_passed": tests_passed,
        "auto_may_pick_cuda_graph": bool(faster and matches and tests_passed),
        "targets": targets,
        "speedup_over_diffusers_baseline": over_baseline,
        "baseline": baseline,
        "anchors": ANCHORS,
    }


def controlnet_line(result: dict[str, Any]) -> str:
    """`bench --controlnet ... --streams N`'s JSON in one line: each control image against off, the batched streams."""
    runs = [
        f"{r['config']} {r['ms_per_frame']:.2f} ms/frame"
        + (f" ({r['vs_off_p50']}x off at p50)" if "vs_off_p50" in r else "")
        for r in result["runs"]
    ]
    streams = [
        f"{s['streams']} streams in one step {s['batched']['fps']:.1f} fps, apart {s['sequential']['fps']:.1f}"
        for s in result.get("streams", [])
    ]
    return "controlnet: " + "; ".join(runs + streams)


def quality_cell(q: dict[str, Any]) -> str:
    """One `bench --quality` row: warp error, static flicker, SSIM, ms per frame, and the ratios to the baseline."""
    cell = f"{q['config']} warp {q['warp_error']} flicker {q['flicker']} ssim {q['ssim']} {q['ms_per_frame']:.2f} ms"
    if "vs_baseline" in q:
        r = q["vs_baseline"]
        cell += f" (x{r['warp_error']} warp, x{r['flicker']} flicker, x{r['ms_per_frame']} ms)"
    return cell


def g2g_line(result: dict[str, Any]) -> str:
    """`bench --g2g`'s JSON in one line: each case's glass-to-glass p50/p99, output fps and model step."""
    cells = []
    for case in result["cases"]:
        g2g = case["g2g_ms"]
        cell = f"{case['label']} p50 {g2g['p50']:.1f} / p99 {g2g['p99']:.1f} ms, {case['output_fps']:.1f} fps out"
        if case.get("model_ms"):
            cell += f" (model step p50 {case['model_ms']['p50']:.1f} ms)"
        cells.append(cell)
    return (
        f"g2g ({result['model']}, backend {result['backend']}, {result['size']}, camera {result['fps']} fps "
        f"{result['codec']}): " + "; ".join(cells)
    )


def summary(report: dict[str, Any]) -> str:
    """The few lines a closing note needs."""
    env, steps, v = report["environment"], {s["name"]: s for s in report["steps"]}, report["verdict"]
    lines = [
        f"livediff gpu-check ({report['mode']}) {report['started']} commit {report['commit']}",
        f"{env.get('gpu') or 'no GPU'}; torch {env.get('torch')} CUDA {env.get('cuda')}; "
        f"diffusers {env.get('diffusers')}; budget {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s",
    ]
    for step in report["steps"]:
        why = step.get("skipped") or " ".join(step.get("error", "").splitlines()[-1:])
        counts = step.get("result") if step["name"] == "gpu-tests" else ""
        lines.append(f"  {step['name']:<14} {step['status']:<8} {step.get('seconds', 0):>6.1f} s {counts or ''} {why}")
    for name in ("bench-batch1", "bench-batch4", "bench-compile"):
        result = steps.get(name, {}).get("result")
        if not isinstance(result, dict):
            continue
        cells = [f"{r['backend']} {r['ms_per_frame']:.2f} ms/frame {r['fps']:.1f} fps"
                 + (f" (parity max {r['parity']['max_abs']}, mean {r['parity']['mean_abs']})" if "parity" in r else "")
                 + (f" peak {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") else "")
                 for r in result["runs"]]  # fmt: skip
        lines.append(f"{name} ({result['model']}, {result['size']}, {result['dtype']}): " + "; ".join(cells))
        if "baseline" in result:
            base = result["baseline"]
            lines.append(f"  baseline {base['name']} {base['dtype']}: {base['ms_per_frame']:.2f} ms/frame "
                         f"{base['fps']:.1f} fps; over it: {v['speedup_over_diffusers_baseline']} "
                         f"(StreamDiffusion: {ANCHORS['streamdiffusion_speedup_over_autopipeline']}x)")  # fmt: skip
    streams = steps.get("streams", {}).get("result")
    for entry in (streams or {}).get("streams", []):
        b = entry["batched"]
        worst = max(b["per_stream_p99_ms"])
        lines.append(f"streams {entry['streams']}: batched {b['fps']:.1f} fps, worst stream p99 {worst:.1f} ms; "
                     f"sequential {entry['sequential']['fps']:.1f} fps")  # fmt: skip
    control = steps.get("controlnet", {}).get("result")
    if isinstance(control, dict):
        lines.append(controlnet_line(control))
    for name in ("temporal", "temporal-batch4"):
        quality = steps.get(name, {}).get("result")
        if isinstance(quality, dict):
            lines.append(f"{name}: " + "; ".join(map(quality_cell, quality["quality"])))
    g2g = steps.get("g2g", {}).get("result")
    if isinstance(g2g, dict):
        lines.append(g2g_line(g2g))
    for name in ("video", "video-480p", "video-eager"):
        video = steps.get(name, {}).get("result")
        if isinstance(video, dict):
            lines.append(video_line(name, video))
    for name in ("variants", "variants-warm", "variants-bf16"):
        variants = steps.get(name, {}).get("result")
        if isinstance(variants, dict):
            lines.extend(variants_lines(variants))
    for name, t in (v.get("variants") or {}).get("targets", {}).items():
        state = "not judged" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target variants {name} {'>=' if name == 'psnr_db' else '<='} {t['target']}: {state} "
                     f"({t['value']})")  # fmt: skip
    if (v.get("variants") or {}).get("auto_may_pick"):
        lines.append(
            f"--backend auto on CUDA may pick (fastest variant that matched): {v['variants']['auto_may_pick']}"
        )
    for name, t in v["targets"].items():
        state = "not judged" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {name} >= {t['target']}: {state} ({t['value']})")
    graph = v["cuda_graph"]
    tests_ran = steps.get("gpu-tests", {}).get("status") not in (None, "skipped")
    if graph["speedup_vs_torch_batch1"] is None or not tests_ran:
        holds = "not judged (this run measured no cuda-graph against torch, or ran no GPU test)"
    else:
        holds = "yes" if v["auto_may_pick_cuda_graph"] else "NO"
    ratio = lambda x: "n/a" if x is None else f"{x}x"  # noqa: E731
    lines.append(f"cuda-graph vs torch: {ratio(graph['speedup_vs_torch_batch1'])} at batch 1, "
                 f"{ratio(graph['speedup_vs_torch_batch4'])} at batch 4, matches: {graph['matches_torch']}, "
                 f"GPU tests passed: {v['gpu_tests_passed']}; --backend auto's CUDA pick (cuda-graph) holds here: "
                 f"{holds}")  # fmt: skip
    for when in ("before", "after"):
        smi = report["nvidia_smi"].get(when, {})
        if smi.get("gpus"):
            g = smi["gpus"][0]
            lines.append(f"nvidia-smi {when}: SM {g.get('clocks.sm')}/{g.get('clocks.max.sm')} MHz, memory clock "
                         f"{g.get('clocks.mem')} MHz, {g.get('memory.used')}/{g.get('memory.total')} MiB, "
                         f"{g.get('temperature.gpu')} C, {g.get('power.draw')} W, "
                         f"driver {g.get('driver_version')}")  # fmt: skip
        else:
            lines.append(f"nvidia-smi {when}: {smi.get('skipped')}")
    return "\n".join(lines)


def keep_compile_cache(out: Path) -> None:
    """Copy the compile caches and the measured backend choice (`backend-choice.json`, what
    `--backend auto` reads) the `variants` steps left in the checkout's `engines/` to `out/engines`
    (the device returns `$OUT` only; carried back as `engines`, the next call compiles from them)."""
    for blob in (ROOT / "engines").glob("*/inductor-*/artifacts.bin"):
        target = out / "engines" / blob.parent.relative_to(ROOT / "engines")
        if target.resolve() != blob.parent.resolve():
            shutil.copytree(blob.parent, target, dirs_exist_ok=True)
    choice = ROOT / "engines" / "backend-choice.json"
    if choice.is_file() and (out / "engines").resolve() != choice.parent.resolve():
        (out / "engines").mkdir(parents=True, exist_ok=True)
        shutil.copy2(choice, out / "engines" / choice.name)


def commit() -> str | None:
    """The commit `scripts/gpu-wheels` stamped beside the wheels (run here just before each device
    call: the device's copy of the checkout may carry a stale .git), else this checkout's
    (`+dirty` with changes)."""
    stamp = ROOT / ".gpu-wheels" / "COMMIT"
    if stamp.exists():
        return stamp.read_text().strip() or None
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (subprocess.SubprocessError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "gpu-check-out"),
        help="where the JSON, summary and log go (default $OUT, else ./gpu-check-out)",
    )
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="the CPU plan even where CUDA is available")
    parser.add_argument("--only", default="", help="comma-separated step names to run (the others are skipped)")
    args = parser.parse_args(argv)
    started_at = time.monotonic()
    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "kit": "livediff gpu-check 1",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "budget_s": args.budget,
        "nvidia_smi": {"before": nvidia_smi()},
        "steps": [],
    }
    with open(args.out / "gpu-check.log", "w") as log:
        probe = run_step(Step("environment", [python, "-c", ENV_PROBE], 120, json.loads), 120, log, env)
        report["steps"].append(probe)
        if probe["status"] != "ok":
            print(f"gpu-check: the environment probe failed:\n{probe.get('error')}", file=sys.stderr)
            return _finish(report, {}, args, started_at, "unknown")
        environment = probe["result"]
        if environment.get("diffusers") is None:
            probe["status"] = "failed"
            probe["error"] = "diffusers is missing: run scripts/gpu-wheels here and carry .gpu-wheels"
            print(f"gpu-check: {probe['error']}", file=sys.stderr)
            return _finish(report, environment, args, started_at, "unknown")
        gpu = environment["cuda_available"] and not args.dry_run
        mode = "gpu" if gpu else ("dry run (--dry-run)" if environment["cuda_available"] else "dry run (no CUDA)")
        print(f"gpu-check: {mode}; {environment.get('gpu') or 'no GPU'}; budget {args.budget:.0f} s", flush=True)
        only = {name.strip() for name in args.only.split(",") if name.strip()}
        for step in plan(gpu, python, size=512 if gpu else 64):
            left = args.budget - (time.monotonic() - started_at)
            limit = min(step.limit_s, left - 10.0)  # 10 s kept for nvidia-smi and writing the report
            if only and step.name not in only:
                record = {"name": step.name, "status": "skipped", "skipped": "not in --only"}
            elif step.skip:
                record = {"name": step.name, "status": "skipped", "skipped": step.skip}
            elif limit < min(30.0, step.limit_s):
                record = {"name": step.name, "status": "skipped", "skipped": f"out of time budget ({left:.0f} s left)"}
            else:
                record = run_step(step, limit, log, env)
            print(f"gpu-check: {step.name}: {record['status']} {record.get('seconds', '')}"
                  f"{' ' + record['skipped'] if 'skipped' in record else ''}", flush=True)  # fmt: skip
            report["steps"].append(record)
        return _finish(report, environment, args, started_at, mode)


def _finish(report: dict[str, Any], environment: dict[str, Any], args: argparse.Namespace, started_at: float,
            mode: str) -> int:  # fmt: skip
    report["nvidia_smi"]["after"] = nvidia_smi()
    report["environment"] = environment
    report["mode"] = mode
    report["elapsed_s"] = round(time.monotonic() - started_at, 1)
    report["verdict"] = verdict({s["name"]: s for s in report["steps"]}, gpu=mode == "gpu")
    report["verdict"]["variants"] = variants_verdict({s["name"]: s for s in report["steps"]}, gpu=mode == "gpu")
    keep_compile_cache(args.out)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        text = summary(report)
    except Exception as exc:  # noqa: BLE001 - the JSON is written: a summary bug must not hide it
        text = f"gpu-check: the summary failed ({exc!r}); gpu-check.json holds every result"
    (args.out / "gpu-check.txt").write_text(text + "\n")
    print(text)
    print(f"gpu-check: wrote {args.out / 'gpu-check.json'}, gpu-check.txt, gpu-check.log")
    return 1 if any(s["status"] in ("failed", "timeout") for s in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
