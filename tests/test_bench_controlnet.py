"""`livediff bench --controlnet`: each control image's ControlNet against ControlNet off, per-stage
costs beside, and streams with different ControlNets batched against separate steps, in one run."""

from __future__ import annotations

import json
import math

from livediff.cli import main


def test_controlnet_bench_reports_each_control_image_against_off(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["bench", "--model", "tiny", "--size", "64", "--frames", "4", "--warmup", "1",
            "--controlnet", "canny,depth", "--streams", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["runs"]
    assert [row["config"] for row in rows] == ["off", "canny", "depth"]
    assert report["controlnet"] == "tiny" and report["depth_model"] == "tiny"
    off, canny, depth = rows
    assert not {"canny", "depth", "controlnet"} & set(off["stages_ms"]) and "vs_off" not in off
    assert {"canny", "controlnet"} <= set(canny["stages_ms"]) and "depth" not in canny["stages_ms"]
    assert {"depth", "controlnet"} <= set(depth["stages_ms"])
    for row in rows:
        assert row["frames"] == 4 and row["ms_per_frame"] > 0 and row["fps"] > 0
        assert all(math.isfinite(v["p50"]) and v["p50"] >= 0 for v in row["stages_ms"].values())
    for row in (canny, depth):
        assert row["vs_off"] == round(row["ms_per_frame"] / off["ms_per_frame"], 3)
        assert row["vs_off_p50"] == round(row["step_ms"]["p50"] / off["step_ms"]["p50"], 3)
    (streams,) = report["streams"]
    assert streams["streams"] == 2 and streams["controlnets"] == ["canny", "depth"]
    assert streams["batched"]["fps"] > 0 and streams["sequential"]["fps"] > 0
    assert streams["speedup"] == round(streams["batched"]["fps"] / streams["sequential"]["fps"], 2)


def test_controlnet_bench_table_names_the_stages(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "0",
                 "--controlnet", "previous"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("backend"))
    assert header.split()[:5] == ["backend", "controlnet", "preprocess", "previous", "encode"]
    assert "controlnet" in header.split()[5:] and "x)" in table and "ControlNet tiny" in table
    assert header.split()[-5:] == ["mean", "ms", "p50", "ms", "fps"]


def test_controlnet_flags_are_checked(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--model", "tiny", "--size", "64", "--controlnet", "pose"]) == 2
    assert "--controlnet: bench names control images (canny, depth, previous), not 'pose'" in capsys.readouterr().err
    assert main(["bench", "--model", "someone/model", "--size", "64", "--controlnet", "canny"]) == 2
    assert "--controlnet: 'canny' names no source: give NAME=SOURCE" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny", "--size", "64", "--controlnet", "canny", "--baseline", "diffusers"]) == 2
    assert "leave out --baseline" in capsys.readouterr().err


def test_serve_flags_name_controlnets_and_the_depth_model(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from livediff.cli import build_parser, engine_settings

    argv = [
        "serve",
        "--model",
        "tiny",
        "--size",
        "64",
        "--controlnet",
        "edges",
        "--controlnet",
        "depth=thibaud/controlnet-sd21-depth-diffusers,pose=./my-pose",
        "--depth-model",
        "tiny",
    ]
    settings = engine_settings(build_parser().parse_args(argv))  # fmt: skip
    assert settings.controlnets == (("edges", "tiny"), ("depth", "thibaud/controlnet-sd21-depth-diffusers"),
                                    ("pose", "./my-pose"))  # fmt: skip
    assert settings.depth_model == "tiny"
    monkeypatch.setenv("LIVEDIFF_CONTROLNET", "a=tiny,b")
    settings = engine_settings(build_parser().parse_args(["serve", "--model", "sd-turbo-random", "--size", "64"]))
    assert settings.controlnets == (("a", "tiny"), ("b", "sd-turbo-random"))
