"""`livediff bench --ip-adapter`: one report with the step with image prompts against none, the UNet
call both ways and an image change's encoder time, in the same run; and its refusals."""

from __future__ import annotations

import math

import pytest

from livediff.bench import BenchPlan
from livediff.bench_ip_adapter import format_ip_adapter, run_ip_adapter_bench
from livediff.config import EngineSettings, StreamParams
from livediff.errors import ConfigError


def test_the_report_sets_image_prompts_against_plain_in_one_run() -> None:
    settings = EngineSettings(model="tiny", height=64, width=64, max_batch=2, ip_adapter="tiny")
    report = run_ip_adapter_bench(settings, BenchPlan(frames=3, warmup=1, batch=2, params=StreamParams()))
    none, image, half = report["runs"]
    assert (none["with_image"], image["with_image"], half["with_image"]) == (0, 2, 1)
    for row in (image, half):
        assert row["vs_none_p50"] == round(row["step_ms"]["p50"] / none["step_ms"]["p50"], 3) > 0
    assert report["unet"]["image_vs_plain_p50"] > 0 and not math.isnan(report["encoder_ms"]["p50"])
    text = format_ip_adapter(report)
    assert "IP-Adapter tiny: 4 image tokens" in text and "vs none" in text and "an image change" in text


def test_it_refuses_what_it_cannot_time() -> None:
    plan = BenchPlan(frames=2, warmup=1, batch=1, params=StreamParams())
    with pytest.raises(ConfigError, match="--ip-adapter: name the IP-Adapter"):
        run_ip_adapter_bench(EngineSettings(model="tiny", height=64, width=64), plan)
    with pytest.raises(ConfigError, match="torch backends"):
        run_ip_adapter_bench(EngineSettings(model="tiny", height=64, width=64, ip_adapter="tiny", backend="onnx"), plan)
