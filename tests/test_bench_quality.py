"""`livediff bench --quality`: temporal settings against the baseline, figures beside ms/frame, in one run."""

from __future__ import annotations

import json
import math

from livediff.cli import main


def test_quality_bench_reports_every_config_against_its_baseline(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = [
        "bench",
        "--quality",
        "--model",
        "tiny",
        "--size",
        "64",
        "--frames",
        "4",
        "--warmup",
        "1",
        "--temporal",
        '{"bank": 2, "weight": 2}',
        "--temporal",
        '{"motion_strength": [0.3, 0.5]}',
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["quality"]
    assert [row["config"] for row in rows] == ["off (baseline)", "bank=2 weight=2", "motion_strength=[0.3,0.5]"]
    for row in rows:
        assert row["backend"] == "torch" and row["frames"] == 4 and row["ms_per_frame"] > 0
        for key in ("warp_error", "flicker", "ssim"):
            assert row[key] is not None and math.isfinite(row[key])
        assert row["warp_error"] > 0  # a random-weight model does not follow the motion
    baseline = rows[0]
    assert "vs_baseline" not in baseline
    for row in rows[1:]:
        assert row["vs_baseline"]["ms_per_frame"] == round(row["ms_per_frame"] / baseline["ms_per_frame"], 3)
        assert row["vs_baseline"]["flicker"] == round(row["flicker"] / baseline["flicker"], 3)
    assert "still background" in report["camera"]


def test_quality_table_names_the_figures(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--quality", "--model", "tiny", "--size", "64", "--frames", "2", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    for word in ("off (baseline)", "bank=1", "bank=2", "warp error", "flicker", "SSIM", "ms/frame"):
        assert word in table


def test_quality_flags_are_checked(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--model", "tiny", "--size", "64", "--temporal", '{"bank": 1}']) == 2
    assert "--temporal needs --quality" in capsys.readouterr().err
    assert main(["bench", "--quality", "--model", "tiny", "--size", "64", "--temporal", "{bank: 1}"]) == 2
    assert "--temporal" in capsys.readouterr().err
    assert main(["bench", "--quality", "--model", "tiny", "--size", "64", "--temporal", '{"bank": 9}']) == 2
    assert "--temporal: temporal.bank must be an integer in 0..4" in capsys.readouterr().err
