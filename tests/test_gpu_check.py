"""scripts/gpu_check.py's own logic (the plan, reading outputs, the verdict), and what the device
machine needs of the package: the engine, the backends and the bench import without aiortc or av.

The whole script runs in CI as a dry run (`.ci/run`); these tests pin down what that run cannot
show: the GPU plan and the verdict on GPU-shaped results.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_gpu_plan_measures_every_backend_and_the_dry_run_skips_what_needs_cuda(kit) -> None:
    gpu = {step.name: step for step in kit.plan(True, "python3", 512)}
    assert list(gpu) == [
        "gpu-tests",
        "model",
        "bench-batch1",
        "bench-batch4",
        "streams",
        "controlnet",
        "temporal",
        "temporal-batch4",
        "g2g",
        "video",
        "video-480p",
        "video-eager",
        "bench-compile",
        "variants",
        "variants-warm",
        "variants-bf16",
    ]
    b1 = " ".join(gpu["bench-batch1"].argv)
    assert "--model sd-turbo-random --size 512 --steps 1" in b1 and "--backend torch,cuda-graph --batch 1" in b1
    assert "--baseline diffusers" in b1 and "--baseline-dtype" not in b1  # the engine's float16
    assert "--batch 4" in " ".join(gpu["bench-batch4"].argv)
    assert "--backend cuda-graph --streams 1,4,8" in " ".join(gpu["streams"].argv)
    assert "torch,torch.compile" in " ".join(gpu["bench-compile"].argv)
    assert "--controlnet canny,depth --streams 4" in " ".join(gpu["controlnet"].argv)
    assert "--quality --batch 1" in " ".join(gpu["temporal"].argv)
    assert "--quality --batch 4" in " ".join(gpu["temporal-batch4"].argv)
    assert "--g2g --model sd-turbo-random --size 512 --backend auto" in " ".join(gpu["g2g"].argv)
    video = " ".join(gpu["video"].argv)
    assert "--model wan-1.3b-random" in video and "--size 512 --steps 1 --streams 1,2,4" in video
    assert "--size 832x480 --steps 2" in " ".join(gpu["video-480p"].argv)
    assert "--backend auto" in video and "--backend torch --size 512 --steps 1 --streams 1" in " ".join(
        gpu["video-eager"].argv
    )  # the fast path, and its eager baseline
    assert all(step.skip is None and step.note is None for step in gpu.values())
    assert sum(step.limit_s for step in gpu.values()) > 500  # the budget, not the limits, bounds a run

    dry = {step.name: step for step in kit.plan(False, "python3", 64)}
    assert "--model tiny --size 64" in " ".join(dry["bench-batch1"].argv)
    assert "cuda-graph" not in " ".join(dry["streams"].argv) and "needs CUDA" in dry["streams"].note
    assert dry["bench-compile"].skip and "torch.compile" in dry["bench-compile"].skip
    assert "--backend torch" in " ".join(dry["g2g"].argv)
    assert "--model tiny-video" in " ".join(dry["video"].argv) and dry["video"].skip is None
    variants = " ".join(gpu["variants"].argv)
    assert "livediff.bench_variants --model sd-turbo-random --size 512" in variants and "--batches 1,4,8" in variants
    assert "--variants cuda-graph-compiled" in " ".join(gpu["variants-warm"].argv)
    assert gpu["variants"].argv[gpu["variants"].argv.index("--engines-dir") + 1] == str(kit.ROOT / "engines")
    assert "--batches 1" in " ".join(dry["variants"].argv) and "compiled variant" in dry["variants"].note
    assert dry["variants-warm"].skip and "CUDA" in dry["variants-warm"].skip
    bf16 = " ".join(gpu["variants-bf16"].argv)  # float8 against bfloat16 (`variants` holds it against float16)
    assert "--dtype bfloat16 --variants torch,cuda-graph-compiled,cuda-graph-compiled-fp8" in bf16
    assert "--batches 1,4,8" in bf16
    assert "--dtype bfloat16" in " ".join(dry["variants-bf16"].argv) and dry["variants-bf16"].skip is None
    assert "--variants" not in gpu["variants"].argv  # bench_variants' default: every variant, fp8 included


def test_the_gpu_tests_step_runs_every_file_that_holds_gpu_tests(kit) -> None:
    files = kit.gpu_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_backends.py" in files
    assert "tests/test_gpu_check.py" not in files
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    marked = {line.split("::")[0] for line in collected.splitlines() if "::" in line}
    assert marked == set(files)  # pytest's own view of where the gpu tests are


def test_outputs_are_read_from_pytest_and_the_bench(kit) -> None:
    assert kit.pytest_counts("....s\n12 passed, 3 skipped, 40 deselected in 41.20s\n") == {
        "passed": 12, "skipped": 3, "deselected": 40}  # fmt: skip
    assert kit.pytest_counts("F\n1 failed, 2 passed, 1 error in 3.00s") == {"failed": 1, "passed": 2, "errors": 1}
    report = kit.bench_json('engine: model x\n{\n  "runs": []\n}\n')
    assert report == {"runs": []}
    with pytest.raises(ValueError):
        kit.bench_json("Traceback (most recent call last):\n")


def _bench(runs: list[dict[str, Any]], baseline_ms: float | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"model": "sd-turbo-random (builtin-v1)", "size": "512x512", "dtype": "float16"}
    report["runs"] = runs
    if baseline_ms:
        report["baseline"] = {"name": "diffusers", "dtype": "float16", "ms_per_frame": baseline_ms,
                              "fps": 1e3 / baseline_ms}  # fmt: skip
    return report


def _run(backend: str, ms: float, batch: int = 1, parity: tuple[int, float] | None = None) -> dict[str, Any]:
    run: dict[str, Any] = {"backend": backend, "batch": batch, "ms_per_frame": ms, "fps": round(1e3 / ms, 2)}
    if parity:
        run["parity"] = {"vs": "torch", "max_abs": parity[0], "mean_abs": parity[1]}
    return run


def _steps(fast_ms: float, parity: tuple[int, float], streams4_fps: float, failed_tests: int = 0) -> dict[str, Any]:
    ok = lambda result: {"status": "ok", "result": result}  # noqa: E731
    streams = {"streams": [{"streams": n, "batched": {"fps": f, "per_stream_p99_ms": [9.0] * n},
                            "sequential": {"fps": f / 2}} for n, f in ((1, 150.0), (4, streams4_fps))]}  # fmt: skip
    tests = {"passed": 11, "failed": failed_tests, "deselected": 40}
    return {
        "gpu-tests": {"status": "failed", "result": tests} if failed_tests else ok(tests),
        "bench-batch1": ok(_bench([_run("torch", 10.0), _run("cuda-graph", fast_ms, parity=parity)], 400.0)),
        "bench-batch4": ok(_bench([_run("torch", 5.0, 4), _run("cuda-graph", 4.0, 4, parity=parity)])),
        "streams": ok(streams),
    }


def test_the_verdict_holds_the_numbers_against_the_targets(kit) -> None:
    v = kit.verdict(_steps(fast_ms=4.0, parity=(0, 0.0), streams4_fps=450.0))
    assert v["targets"]["batch1_fps"] == {"value": 250.0, "target": 200.0, "met": True}
    assert v["targets"]["streams4_fps"]["met"] is True
    assert v["targets"]["speedup_vs_torch"] == {"value": 2.5, "target": 2.0, "met": True}
    assert v["cuda_graph"]["speedup_vs_torch_batch4"] == 1.25 and v["cuda_graph"]["matches_torch"] is True
    assert v["speedup_over_diffusers_baseline"] == {"torch": 40.0, "cuda-graph": 100.0}
    assert v["auto_may_pick_cuda_graph"] is True

    slow = kit.verdict(_steps(fast_ms=8.0, parity=(0, 0.0), streams4_fps=300.0))
    assert slow["targets"]["batch1_fps"]["met"] is False and slow["targets"]["speedup_vs_torch"]["met"] is False
    assert slow["auto_may_pick_cuda_graph"] is True  # faster than eager torch and matching: auto may pick it


def test_auto_may_pick_cuda_graph_only_when_it_is_faster_and_matches(kit) -> None:
    assert kit.verdict(_steps(fast_ms=4.0, parity=(9, 0.3), streams4_fps=450.0))["auto_may_pick_cuda_graph"] is False
    assert kit.verdict(_steps(fast_ms=12.0, parity=(0, 0.0), streams4_fps=450.0))["auto_may_pick_cuda_graph"] is False
    failing = _steps(fast_ms=4.0, parity=(0, 0.0), streams4_fps=450.0, failed_tests=1)
    assert kit.verdict(failing)["auto_may_pick_cuda_graph"] is False  # parity on sd-turbo-random alone is not enough
    nothing = kit.verdict({"bench-batch1": {"status": "timeout"}})
    assert nothing["auto_may_pick_cuda_graph"] is False and nothing["cuda_graph"]["matches_torch"] is None
    assert all(t["met"] is None for t in nothing["targets"].values())
    dry = kit.verdict(_steps(fast_ms=4.0, parity=(0, 0.0), streams4_fps=450.0), gpu=False)
    assert all(t["met"] is None for t in dry["targets"].values())


def test_the_engine_backends_and_bench_import_without_aiortc_or_av() -> None:
    """The device image has neither: what the GPU check runs must not need them."""
    code = (
        "import sys\n"
        "for name in ('aiortc', 'av', 'aiohttp', 'openvino'): sys.modules[name] = None\n"
        "import livediff.bench, livediff.engine, livediff.backends, livediff.cli\n"
        "import livediff.backends.cuda_graph, livediff.backends.torch_backend, livediff.backends.onnx_backend\n"
        "from livediff.cli import build_parser\n"
        "build_parser().parse_args(['bench', '--backend', 'cuda-graph'])\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_summary_reads_a_gpu_report(kit) -> None:
    steps = _steps(fast_ms=4.0, parity=(0, 0.0), streams4_fps=450.0)
    steps["controlnet"] = {
        "status": "ok",
        "result": {  # the shapes `bench --controlnet ... --streams 4` prints
            "runs": [
                {"config": "off", "ms_per_frame": 10.0},
                {"config": "depth", "ms_per_frame": 13.5, "vs_off_p50": 1.31},
            ],
            "streams": [{"streams": 4, "batched": {"fps": 300.0}, "sequential": {"fps": 200.0}}],
        },
    }
    steps["temporal"] = {
        "status": "ok",
        "result": {
            "quality": [  # and `bench --quality --temporal ...`
                {"config": "off (baseline)", "warp_error": 9.1, "flicker": 2.5, "ssim": 0.8, "ms_per_frame": 10.0},
                {
                    "config": "bank=1",
                    "warp_error": 6.2,
                    "flicker": 1.5,
                    "ssim": 0.79,
                    "ms_per_frame": 11.0,
                    "vs_baseline": {"warp_error": 0.68, "flicker": 0.6, "ssim": 0.99, "ms_per_frame": 1.1},
                },
            ]
        },
    }
    steps["g2g"] = {
        "status": "ok",
        "result": {  # and `bench --g2g --json`
            "model": "sd-turbo-random (builtin-v1)",
            "backend": "cuda-graph",
            "size": "512x512",
            "fps": 30,
            "codec": "VP8",
            "cases": [
                {
                    "label": "passthrough, marker both ends",
                    "g2g_ms": {"p50": 8.04, "p99": 12.0},
                    "output_fps": 30.0,
                    "model_ms": None,
                },
                {
                    "label": "model, marker both ends",
                    "g2g_ms": {"p50": 21.0, "p99": 30.0},
                    "output_fps": 29.9,
                    "model_ms": {"p50": 10.2},
                },
            ],
        },
    }
    smi = {"gpus": [{"name": "NVIDIA H200", "driver_version": "580.159.04", "clocks.sm": "1980",
                     "clocks.max.sm": "1980", "clocks.mem": "3201", "memory.used": "2000", "memory.total": "143771",
                     "temperature.gpu": "40", "power.draw": "300.1"}]}  # fmt: skip
    report = {
        "mode": "gpu", "started": "2026-12-01T10:00:00+00:00", "commit": "abc123", "budget_s": 420.0,
        "elapsed_s": 400.0, "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"},
        "nvidia_smi": {"before": smi, "after": {"skipped": "nvidia-smi failed: x"}},
        "steps": [{"name": name, "seconds": 1.0, **step} for name, step in steps.items()],
        "verdict": kit.verdict(steps),
    }  # fmt: skip
    text = kit.summary(report)
    assert "NVIDIA H200; torch 2.11.0 CUDA 13.0" in text
    assert "bench-batch1 (sd-turbo-random (builtin-v1), 512x512, float16): torch 10.00 ms/frame" in text
    assert "cuda-graph 4.00 ms/frame 250.0 fps (parity max 0, mean 0.0)" in text
    assert "streams 4: batched 450.0 fps, worst stream p99 9.0 ms" in text
    assert "target batch1_fps >= 200.0: met (250.0)" in text
    assert (
        "controlnet: off 10.00 ms/frame; depth 13.50 ms/frame (1.31x off at p50); 4 streams in one step "
        "300.0 fps, apart 200.0"
    ) in text
    assert (
        "temporal: off (baseline) warp 9.1 flicker 2.5 ssim 0.8 10.00 ms; bank=1 warp 6.2 flicker 1.5 ssim "
        "0.79 11.00 ms (x0.68 warp, x0.6 flicker, x1.1 ms)"
    ) in text
    assert (
        "g2g (sd-turbo-random (builtin-v1), backend cuda-graph, 512x512, camera 30 fps VP8): passthrough, marker "
        "both ends p50 8.0 / p99 12.0 ms, 30.0 fps out; model, marker both ends p50 21.0 / p99 30.0 ms, 29.9 fps "
        "out (model step p50 10.2 ms)"
    ) in text
    assert "--backend auto's CUDA pick (cuda-graph) holds here: yes" in text
    only_g2g = {"g2g": steps["g2g"]}  # `--only model,g2g`: no bench, no GPU tests, so no judgement either way
    partial = {**report, "steps": [{"name": "g2g", "seconds": 1.0, **steps["g2g"]}], "verdict": kit.verdict(only_g2g)}
    not_judged = "holds here: not judged (this run measured no cuda-graph against torch, or ran no GPU test)"
    assert not_judged in kit.summary(partial)
    assert "nvidia-smi before: SM 1980/1980 MHz" in text and "nvidia-smi after: nvidia-smi failed: x" in text


def _variants(best_ms: float, psnr: float, canny_ratio: float) -> dict[str, Any]:
    def row(variant: str, ms: float, parity: float | None, features: float) -> dict[str, Any]:
        r: dict[str, Any] = {
            "variant": variant,
            "ready_s": 20.0,
            "stages_ms": {"unet": ms * 0.7},
            "batches": {"1": {"ms_per_frame": ms, "fps": 1e3 / ms}, "4": {"ms_per_frame": ms / 2, "fps": 2e3 / ms}},
            "features": {
                "plain": {"ms_per_frame": ms},
                "controlnet-canny": {"ms_per_frame": ms * features, "vs_plain": features},
            },
        }
        if parity is not None:
            r["parity"] = {"vs": "torch", "psnr_db": parity, "max_abs": 3, "matches": parity >= 40.0}
        return r  # fmt: skip

    rows = [row("torch", 20.0, None, 1.9), row("cuda-graph", 10.0, float("inf"), 1.5),
            row("cuda-graph-compiled", best_ms, psnr, canny_ratio)]  # fmt: skip
    matching = [r for r in rows if r["variant"] == "torch" or r["parity"]["matches"]]
    best = min(matching, key=lambda r: r["batches"]["1"]["ms_per_frame"])["variant"]
    return {"model": "sd-turbo-random (builtin-v1)", "size": "512x512", "dtype": "float16", "device": "NVIDIA H200",
            "variants": rows, "skipped": {}, "best": best,
            "profile": {"variant": best, "top": [{"name": "triton_poi_fused", "ms_per_step": 0.5,
                                                  "calls_per_step": 3.0}]}}  # fmt: skip


def test_the_variants_verdict_holds_the_fastest_matching_variant_to_issue_26s_targets(kit) -> None:
    ok = lambda result: {"status": "ok", "result": result}  # noqa: E731
    warm = {"variants": [{"variant": "cuda-graph-compiled", "ready_s": 35.0, "batches": {}}]}
    steps = {"variants": ok(_variants(4.5, 42.0, 1.2)), "variants-warm": ok(warm)}
    v = kit.variants_verdict(steps)
    assert v["best"] == "cuda-graph-compiled" and v["auto_may_pick"] == "cuda-graph-compiled"
    assert v["targets"]["batch1_ms"] == {"value": 4.5, "target": 5.0, "met": True}
    assert v["targets"]["feature_vs_plain"]["met"] is True and v["targets"]["warm_ready_s"]["met"] is True
    assert v["targets"]["psnr_db"] == {"value": 42.0, "target": 40.0, "met": True}
    # the compiled variant's frames do not match: the fastest that matched is cuda-graph, its numbers judged
    drifted = kit.variants_verdict({"variants": ok(_variants(4.5, 30.0, 1.2))})
    assert drifted["best"] == "cuda-graph" and drifted["targets"]["batch1_ms"]["met"] is False
    assert drifted["targets"]["psnr_db"]["value"] == float("inf") and drifted["targets"]["warm_ready_s"]["met"] is None
    dry = kit.variants_verdict(steps, gpu=False)
    assert dry["auto_may_pick"] is None and all(t["met"] is None for t in dry["targets"].values())
    lines = "\n".join(kit.variants_lines(_variants(4.5, 42.0, 1.2)))
    assert "cuda-graph-compiled: ready 20.0 s; b1 222.2 fps 4.50 ms/f" in lines
    assert "PSNR 42.0 dB, max diff 3" in lines and "controlnet-canny 5.40 ms (1.2x plain)" in lines
    assert "top kernels of cuda-graph-compiled: triton_poi_fused 0.500 ms" in lines
    skipped = _variants(4.5, 42.0, 1.2)
    skipped["skipped"] = {"cuda-graph-compiled-fp8": "needs compute capability >= 8.9"}
    skipped["fused_norm"] = "not measured: no GroupNorm among the top kernels of cuda-graph-compiled"
    lines = "\n".join(kit.variants_lines(skipped))
    assert "cuda-graph-compiled-fp8: skipped (needs compute capability >= 8.9)" in lines
    assert "cuda-graph-fused-norm: not measured: no GroupNorm" in lines


@pytest.mark.timeout(900)  # three variants' engines and their features: about a minute on 2 idle cores
def test_bench_variants_runs_every_variant_here_or_says_why_not(capsys) -> None:  # type: ignore[no-untyped-def]
    """The kit's `variants` step as the dry run makes it, the fused-norm variant named (the dry run
    adds it when GroupNorm is among the CPU's top ops): every variant measured, or skipped with its
    reason; the bank and ControlNet steps on the graph variants replay a recording; the fused-norm
    variant (its torch reference here) matches eager torch."""
    import json

    from livediff import bench_variants

    assert bench_variants.group_norm_kernels([{"name": "aten::native_group_norm"}, {"name": "aten::mm"},
                                              {"name": "triton_red_fused_native_group_norm_silu_3"}]) == [
        "aten::native_group_norm", "triton_red_fused_native_group_norm_silu_3"]  # fmt: skip
    variants = f"{bench_variants.DEFAULT_VARIANTS},cuda-graph-fused-norm"
    argv = ["--frames", "1", "--batches", "1", "--engines-dir", "unused-off-cuda", "--variants", variants]
    assert bench_variants.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"torch", "cuda-graph", "cuda-graph-fused-norm"}
    assert set(report["skipped"]) == {"cuda-graph-compiled", "cuda-graph-compiled-fp8"}
    assert "compute capability >= 8.9" in report["skipped"]["cuda-graph-compiled-fp8"]
    assert "fused_norm" not in report  # named, so measured whatever the profile says
    for name in ("cuda-graph", "cuda-graph-fused-norm"):
        assert rows[name]["parity"]["matches"] and rows[name]["features"]["bank-1"]["recorded"]
        assert rows[name]["features"]["controlnet-canny"]["recorded"]
    assert "choice_file" not in report and not Path("unused-off-cuda").exists()  # CPU times choose nothing


def test_the_video_line_reads_a_video_bench_with_mixed_cache_lengths(kit, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from livediff.cli import main

    argv = ["bench", "--model", "tiny-video", "--size", "64", "--frames", "4", "--warmup", "0", "--streams", "1,2"]
    argv += ["--dtype", "float32"]  # auto is bfloat16 on CPUs with bf16 instructions
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    line = kit.video_line("video", report)
    one, two = line.split("; ")
    assert line.startswith("video (tiny-video, 64x64, torch, float32, 1 step(s)): 1 stream(s)") and "mixed" not in one
    mixed = report["results"][1]["mixed_cache"]
    said = f"mixed caches: padded {mixed['padded_ms']:.1f} ms vs per stream {mixed['per_stream_ms']:.1f} ms"
    assert two.endswith(said), line
