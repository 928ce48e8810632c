from __future__ import annotations

import json
import math

import pytest

from livediff.cli import main

STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")


def test_bench_prints_json_with_stages_fps_and_the_baseline_ratio(capsys) -> None:
    code = main(
        ["bench", "--model", "tiny", "--size", "64", "--frames", "4", "--warmup", "1",
         "--baseline", "diffusers", "--streams", "1,2", "--json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == "64x64" and report["steps"] == 1 and report["model"].startswith("tiny")
    (run,) = report["runs"]
    assert run["backend"] == "torch" and run["frames"] == 4
    for stage in STAGES:
        for key in ("p50", "p95"):
            assert math.isfinite(run["stages_ms"][stage][key]) and run["stages_ms"][stage][key] >= 0
    assert run["fps"] > 0 and run["ms_per_frame"] > 0
    baseline = report["baseline"]
    assert baseline["fps"] > 0 and baseline["frames"] == 4
    assert report["speedup"]["ratio"] == pytest.approx(baseline["ms_per_frame"] / run["ms_per_frame"], abs=0.01)
    assert [s["streams"] for s in report["streams"]] == [1, 2]
    for streams in report["streams"]:
        assert streams["batched"]["fps"] > 0 and streams["sequential"]["fps"] > 0
        assert math.isfinite(streams["batched"]["latency_ms"]["p99"])


def test_bench_baseline_in_another_dtype(capsys) -> None:
    """The engine in bfloat16 against the pipeline as diffusers loads it (float32), in one process."""
    argv = ["bench", "--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "0", "--dtype", "bfloat16",
            "--baseline", "diffusers"]  # fmt: skip
    assert main([*argv, "--baseline-dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["baseline"]["dtype"] == "float32"
    assert main(argv) == 0  # by default the baseline runs in the engine's dtype, and the table says so
    assert "baseline: diffusers AutoPipelineForImage2Image, PIL per frame, bfloat16:" in capsys.readouterr().out


def test_bench_table_names_every_stage(capsys) -> None:
    assert main(["bench", "--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "0", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    for stage in STAGES:
        assert stage in table
    assert "steps 2" in table and "fps" in table


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--size", "100"], "--size"),
        (["--size", "64x6O"], "--size"),
        (["--steps", "9"], "--steps"),
        (["--strength", "0"], "--strength"),
        (["--frames", "0"], "--frames"),
        (["--dtype", "float8"], "--dtype"),
    ],
)
def test_bad_flags_are_named(argv: list[str], flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_baseline_dtype_without_a_baseline_is_named(capsys) -> None:
    assert main(["bench", "--model", "tiny", "--size", "64", "--baseline-dtype", "float32"]) == 2
    assert "--baseline-dtype needs --baseline diffusers" in capsys.readouterr().err


def test_unknown_backend_is_named(capsys) -> None:
    assert main(["bench", "--model", "tiny", "--size", "64", "--backend", "torch,fast"]) == 2
    assert "--backend" in capsys.readouterr().err


def test_unknown_model_is_a_message_not_a_traceback(capsys) -> None:
    assert main(["bench", "--model", "nobody/nothing", "--size", "64", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "nobody/nothing" in err and "--model tiny" in err and "Traceback" not in err


def test_models_lists_the_builtins(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "sd-turbo-random" in out and "stabilityai/sd-turbo" in out


@pytest.mark.parametrize(
    ("argv", "env", "backend", "compiled"),
    [
        ([], {}, "auto", False),
        (["--backend", "torch"], {}, "torch", False),
        (["--backend", "onnx"], {}, "onnx", False),
        (["--backend", "torch.compile"], {}, "torch", True),
        ([], {"LIVEDIFF_BACKEND": "onnx"}, "onnx", False),
    ],
)
def test_serve_takes_the_backend_from_the_flag_or_the_environment(
    argv: list[str], env: dict[str, str], backend: str, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livediff.cli import build_parser, engine_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["serve", "--model", "tiny", *argv])
    settings = engine_settings(args, backend=args.backend)
    assert (settings.backend, settings.compile) == (backend, compiled)


@pytest.mark.parametrize("argv", [["serve", "--backend", "warp"], ["build-engines", "--backend", "torch"]])
def test_an_unknown_backend_is_named(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--backend" in err and repr(argv[-1]) in err


def test_bench_reports_parity_against_the_first_run_memory_and_each_streams_p99(capsys) -> None:
    """Two runs of the same backend compute the same frames: parity 0, on frames that are not flat."""
    argv = ["bench", "--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "0", "--backend", "torch,torch",
            "--batch", "2", "--streams", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    first, second = report["runs"]
    assert "parity" not in first
    assert second["parity"]["vs"] == "torch" and second["parity"]["max_abs"] == 0
    assert second["parity"]["mean_abs"] == 0 and second["parity"]["reference_std"] > 5
    assert first["peak_gpu_mb"] is None  # no CUDA here
    (streams,) = report["streams"]
    batched, sequential = (streams[mode]["per_stream_p99_ms"] for mode in ("batched", "sequential"))
    assert len(batched) == len(sequential) == 3 and min(batched + sequential) > 0
    assert len(set(batched)) == 1  # one step serves every stream at once
    assert sequential == sorted(sequential)  # one after another: a later stream always waits longer
