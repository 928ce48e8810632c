"""`livediff run`: real clips made with PyAV through the tiny model, H.264 out, audio copied, bad input refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from livediff import cli
from livediff.config import EngineSettings, StreamParams
from livediff.jobs.clip import ClipError, probe
from livediff.jobs.transcode import independent_frames
from tests.clips import decoded_frames, make_audio_only, make_clip, make_huge, video_facts

ROOT = Path(__file__).resolve().parent.parent
RUN = ["run", "--model", "tiny", "--size", "64", "--backend", "torch"]


def test_run_writes_h264_at_the_input_timestamps_with_the_audio_copied(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    source = make_clip(tmp_path / "in.mp4", frames=13, rate=24)
    output = tmp_path / "out.mp4"
    assert cli.main([*RUN, str(source), "-o", str(output), "--batch", "4", "--param", "seed=7"]) == 0
    before, after = video_facts(source), video_facts(output)
    assert after["codec"] == "h264" and after["size"] == (64, 64)
    assert after["rate"] == before["rate"] and after["time_base"] == before["time_base"]
    assert after["pts"] == before["pts"] and len(after["pts"]) == 13  # type: ignore[arg-type]
    assert before["audio"] and after["audio"] == before["audio"]  # packet for packet
    assert not (tmp_path / "out.mp4.part").exists()
    out = capsys.readouterr()
    assert "13 frames" in out.out and "4 per step" in out.out
    assert "13/13 (100%) frames" in out.err  # a plain progress line (stderr is not a terminal here)
    # the frames were transformed, not copied: the tiny model's output is far from the bar image
    source_frames = [f[:, 16:80] for f in decoded_frames(source)]  # the centre crop the engine sees
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(decoded_frames(output), source_frames)]
    assert min(diffs) > 5


def test_a_clip_without_audio_and_with_stateful_params_runs_one_frame_a_step(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    source = make_clip(tmp_path / "in.mp4", frames=5, audio=False)
    output = tmp_path / "out.mp4"
    args = [*RUN, str(source), "-o", str(output), "--params", '{"similarity_filter": true}']
    assert cli.main(args) == 0
    assert "1 per step" in capsys.readouterr().out
    assert video_facts(output)["audio"] is None and len(video_facts(output)["pts"]) == 5  # type: ignore[arg-type]


def test_batched_lanes_give_what_one_stream_gives(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    """The premise of running a clip as several streams: with no temporal state, frame i's output
    does not depend on which stream (of the same params) ran it, nor on the frames before it."""
    from livediff.engine import StreamEngine

    settings = EngineSettings(model="tiny", height=64, width=64, max_batch=4)
    params = StreamParams(seed=3)
    assert independent_frames(params, settings)
    assert not independent_frames(params.replace(temporal_bank=1), settings)
    assert not independent_frames(params, settings.replace(stream_batch=True))
    engine = StreamEngine(settings, tiny_parts)
    generator = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=generator) for _ in range(4)]
    one = engine.open_stream(params)
    sequential = [engine.step([(one, frame)]).outputs[0] for frame in frames]
    lanes = [engine.open_stream(params) for _ in frames]
    batched = engine.step(list(zip(lanes, frames))).outputs
    for a, b in zip(sequential, batched):
        assert (a.int() - b.int()).abs().max() <= 2


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: _write(p, b""), "the file is empty"),
        (lambda p: _write(p, b"hello, not a video\n" * 50), "not a video file PyAV can open"),
        (lambda p: make_audio_only(p), "no video stream (has audio)"),
        (lambda p: make_huge(p.with_suffix(".mkv")), "frame size 10000x10000 is over the limit of 8192"),
    ],
    ids=["empty", "text", "audio-only", "10000x10000"],
)
def test_a_bad_clip_is_one_line_naming_the_problem(tmp_path: Path, capsys, make, said) -> None:  # type: ignore[no-untyped-def]
    source = make(tmp_path / "bad.mp4")
    output = tmp_path / "out.mp4"
    assert cli.main([*RUN, str(source), "-o", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("livediff: error: ") and said in err[-1], err
    assert not output.exists() and not (tmp_path / "out.mp4.part").exists()


def test_a_truncated_clip_is_refused(tmp_path: Path) -> None:
    whole = make_clip(tmp_path / "whole.mp4", frames=10)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ClipError, match="cut.mp4: "):
        probe(cut)


def test_bad_flags_and_limits_name_the_flag(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    source = make_clip(tmp_path / "in.mp4", frames=3, audio=False)
    cases = [
        (["--param", "strength=3"], "--param: strength must be in (0, 1]"),
        (["--params", '{"steps": "two"}'], "--params: steps must be a int"),
        (["--params", "{"], "--params: not JSON"),
        (["--params", '{"temporal": {"bank": 2}}'], "--params: temporal.bank"),
        (["--param", "temporal_bank=9"], "--param: temporal_bank must be an integer in 0..4, got 9"),
        (["--params", '{"temporal": {"bank": 9}}'], "--params: temporal.bank must be an integer in 0..4, got 9"),
        (["--max-seconds", "0.01"], "over the limit of 0.01 s"),
    ]
    for extra, said in cases:
        assert cli.main([*RUN, str(source), "-o", str(tmp_path / "o.mp4"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert said in err, (extra, err)
    assert cli.main([*RUN, str(source), "-o", str(source)]) == 2
    assert "--output" in capsys.readouterr().err


def test_ctrl_c_leaves_no_half_written_output(tmp_path: Path) -> None:
    """SIGINT to a real `livediff run` part-way: exit 130, the old OUTPUT untouched, no part file."""
    source = make_clip(tmp_path / "in.mp4", frames=2000, size=(64, 64), audio=False)
    output = tmp_path / "out.mp4"
    output.write_bytes(b"the previous result")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "livediff.cli", *RUN, str(source), "-o", str(output), "--batch", "8"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        # as from a terminal: a pytest-xdist worker ignores SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # a progress line past the encoder's lookahead: the part file is written
            seen.append(line)
            if " frames, " in line and int(line.split()[1].partition("/")[0]) >= 40:
                break
        assert (tmp_path / "out.mp4.part").exists(), seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert output.read_bytes() == b"the previous result"
    assert not (tmp_path / "out.mp4.part").exists()


def test_run_refuses_a_video_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`livediff run` takes image models; a video model is named in one line, before any clip is read."""
    from livediff.cli import main

    clip = tmp_path / "in.mp4"
    clip.write_bytes(b"")
    code = main(["run", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", "tiny-video"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--model" in err and "video model" in err, err


@pytest.mark.parametrize("fails", ["transform", "encoder"])
def test_a_failure_in_either_thread_stops_the_transcode_and_leaves_no_file(tmp_path: Path, fails: str) -> None:
    """The steps and the encoder run on two threads: an error on either (a step; a frame the encoder
    cannot take) ends the transcode with that error, the encoder thread gone and no part file left."""
    import threading

    from livediff.jobs.transcode import transcode

    clip = make_clip(tmp_path / "in.mp4", frames=40, size=(64, 64))
    calls = [0]

    def transform(frames: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        calls[0] += 1
        if calls[0] == 3 and fails == "transform":
            raise RuntimeError("the step failed")
        if calls[0] == 3:  # not (H, W, 3) uint8: the encoder's from_ndarray refuses it
            return [torch.zeros(5, dtype=torch.float64) for _ in frames]
        return [image for _, image in frames]

    output = tmp_path / "out.mp4"
    with pytest.raises(Exception) as caught:
        transcode(clip, output, probe(clip), transform, 4, (64, 64))
    assert fails != "transform" or str(caught.value) == "the step failed"
    assert not output.exists() and not (tmp_path / "out.mp4.part").exists()
    assert not [t for t in threading.enumerate() if t.name in ("livediff-encode", "livediff-decode")]
