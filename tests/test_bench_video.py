"""`livediff bench --model tiny-video`: stages, fps, first chunk latency, memory per stream; bad flags named."""

from __future__ import annotations

import json
import math

import pytest

from livediff.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_video_bench_reports_stages_fps_latency_and_memory_per_stream_count(capsys) -> None:
    code = main(["bench", "--model", "tiny-video", "--size", "64", "--frames", "8", "--warmup", "4",
                 "--streams", "1,2", "--steps", "2", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny-video" and report["size"] == "64x64" and report["steps"] == 2
    assert [r["streams"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        assert set(result["stages_ms"]) == {"preprocess", "encode", "transformer", "decode", "postprocess"}
        assert all(math.isfinite(ms) and ms >= 0 for ms in result["stages_ms"].values())
        assert result["fps"] > 0 and result["first_chunk_ms"] > 0 and result["memory_per_stream_mib"] > 0
        assert result["ms_per_frame"] == pytest.approx(result["ms_per_step"] / (4 * result["streams"]), rel=0.01)
    assert report["results"][0]["fps_vs_1_stream"] == 1.0
    # streams of different cache lengths: one padded transformer call against one call per stream
    assert "mixed_cache" not in report["results"][0]
    mixed = report["results"][1]["mixed_cache"]
    assert mixed["cached_frames"] == [2, 3], mixed  # after 1 and 2 chunks (the first gives 2 latent frames)
    assert mixed["padded_ms"] > 0 and mixed["per_stream_ms"] > 0, mixed
    assert mixed["per_stream_vs_padded"] == pytest.approx(mixed["per_stream_ms"] / mixed["padded_ms"], rel=0.02)


def test_the_table_names_the_stages(capsys) -> None:
    assert main(["bench", "--model", "tiny-video", "--size", "64", "--frames", "4", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "video bench: tiny-video 64x64" in out and "transformer" in out and "first ms" in out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--baseline", "diffusers"], "--baseline"), (["--backend", "onnx"], "--backend"), (["--size", "72"], "--size")],
)
def test_what_a_video_bench_cannot_do_is_named(argv: list[str], flag: str, capsys) -> None:
    assert main(["bench", "--model", "tiny-video", *argv]) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(("warmup", "noted"), [("0", True), ("4", True), ("5", False)])
def test_a_warmup_under_two_chunks_is_raised_with_a_note_naming_the_flag(warmup: str, noted: bool, capsys) -> None:
    assert main(["bench", "--model", "tiny-video", "--size", "64", "--frames", "4", "--warmup", warmup]) == 0
    err = capsys.readouterr().err
    assert ("--warmup" in err and "8 frames (2 chunks)" in err) is noted, err


def test_a_plan_under_two_warmup_chunks_is_refused() -> None:
    from livediff.bench_video import VideoBenchPlan

    with pytest.raises(ValueError, match="warmup must be at least 2 chunks"):
        VideoBenchPlan(warmup=1)
