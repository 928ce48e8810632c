"""Faults in the engine cache end cleanly: staging folders of killed builds are swept, a truncated
engine is rebuilt (and a folder that cannot be trusted is named with the command that clears it),
a full disk names the file, the folder and --engines-dir, and a stop request ends a build at the
next network, keeping what finished."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livediff.backends import cache as cache_module
from livediff.backends.cache import BuildStopped, EngineCache, EngineKey
from livediff.errors import LivediffError

KEY = EngineKey(
    model="tiny", revision="builtin-v1", component="unet", height=64, width=64, batch="dynamic",
    precision="fp32", runtime="onnx-opset18-torch2.13.0", device="cpu",
)  # fmt: skip


def write(text: str):  # type: ignore[no-untyped-def]
    def build(path: Path) -> None:
        path.write_text(text)

    return build


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_staging_folders_of_killed_builds_are_swept_at_start(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    killed = model / f".{KEY.name}-k1ll3d"  # its builder died (SIGKILL): its pid is gone
    killed.mkdir()
    (killed / "model.onnx").write_text("half")
    (killed / cache_module.OWNER).write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    old = model / ".vae_decoder-64x64-fp32-0123456789abcdef-0ld0ne"  # from before owners were written
    old.mkdir()
    hours_ago = time.time() - 3 * 3600
    os.utime(old, (hours_ago, hours_ago))
    building = model / f".{KEY.name}-l1ve"  # a build running now in another process: left alone
    building.mkdir()
    (building / cache_module.OWNER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    cache_module.swept_roots.discard(tmp_path.resolve())

    artifact = EngineCache(tmp_path).get_or_build(KEY, "model.onnx", write("graph"))
    assert artifact.built and artifact.path.read_text() == "graph"
    assert sorted(p.name for p in model.iterdir()) == sorted([KEY.name, building.name])


def test_a_truncated_engine_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    first = cache.get_or_build(KEY, "model.plan", write("a complete engine"))
    with open(first.path, "r+b") as file:  # the disk filled, or a copy stopped half way
        file.truncate(5)
    caplog.set_level(logging.WARNING)
    again = cache.get_or_build(KEY, "model.plan", write("a complete engine"))
    assert again.built and again.path.read_text() == "a complete engine"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(first.path) in warning and "--engines-dir" in warning and "rebuilding" in warning


def test_a_folder_that_does_not_match_its_key_is_named_with_the_command_that_clears_it(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    built = cache.get_or_build(KEY, "model.onnx", write("graph"))
    sidecar = built.path.parent / "key.json"
    sidecar.write_text(json.dumps({**KEY.fields(), "height": 65}))
    with pytest.raises(LivediffError) as error:
        cache.get_or_build(KEY, "model.onnx", write("graph"))
    message = str(error.value)
    assert f"rm -rf {built.path.parent}" in message and "--engines-dir" in message


def test_a_full_disk_names_the_file_the_folder_and_the_flag(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("a small tmpfs cannot be mounted here (mount needs root)")
    try:
        cache = EngineCache(mount)
        with pytest.raises(LivediffError) as error:
            cache.get_or_build(KEY, "model.onnx", lambda path: path.write_bytes(b"\0" * (1 << 20)))
        message = str(error.value)
        assert "no space left" in message.lower() and "model.onnx" in message
        assert str(mount / "tiny") in message and "--engines-dir" in message
        assert not any(p.name.startswith(".") for p in (mount / "tiny").iterdir())  # the staging folder went
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_stop_request_ends_the_build_at_the_next_network(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    first = cache.get_or_build(KEY, "model.onnx", write("unet"))
    other = dataclasses.replace(KEY, component="vae_decoder")
    cache_module.stop_builds()
    try:
        assert cache.get_or_build(KEY, "model.onnx", write("x")).path == first.path  # what finished stays usable
        with pytest.raises(BuildStopped):
            cache.get_or_build(other, "model.onnx", write("decoder"))
    finally:
        cache_module.resume_builds()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [KEY.name]


@pytest.mark.timeout(300)
def test_sigterm_during_the_first_build_stops_at_the_next_network(tmp_path: Path) -> None:
    """A real `livediff serve` building its ONNX engines gets SIGTERM while it exports the first
    network: it exits without building the others, and leaves no staging folder."""
    import signal

    pytest.importorskip("onnxruntime")
    engines = tmp_path / "engines"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livediff.cli",
            "serve",
            "--model",
            "tiny",
            "--backend",
            "onnx",
            "--size",
            "64",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--engines-dir",
            str(engines),
        ],  # fmt: skip
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "exporting" in line:
                break
        assert any("exporting" in line for line in lines), "".join(lines)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines.append(out)
    text = "".join(lines)
    assert process.returncode is not None, text
    built = sorted(p.name.split("-")[0] for p in (engines / "tiny").iterdir() if not p.name.startswith("."))
    staging = [p.name for p in (engines / "tiny").iterdir() if p.name.startswith(".")]
    assert not staging, (staging, text)
    assert "vae_decoder" not in built and "unet" not in built, (built, text)  # stopped after the first network
    assert "Traceback" not in text, text


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_damaged_engine_is_named_with_the_command_that_clears_it(tmp_path: Path, runtime: str) -> None:
    """A committed artifact whose bytes are damaged (same size, so not caught as truncated): loading
    it on the real runtime fails with the file, --engines-dir and the `rm -rf` that clears it."""
    import torch

    pytest.importorskip(runtime)
    filename = "model.onnx" if runtime == "onnxruntime" else "model.blob"
    artifact = EngineCache(tmp_path).get_or_build(KEY, filename, write("not an engine at all, just bytes"))
    with pytest.raises(LivediffError) as error:
        if runtime == "onnxruntime":
            from livediff.backends.onnx_backend import OrtRunner

            OrtRunner(artifact.path, torch.device("cpu"))
        else:
            import openvino

            from livediff.backends.openvino_backend import OvRunner

            OvRunner.load(openvino, artifact.path, "fp32")
    message = str(error.value)
    assert str(artifact.path) in message and f"rm -rf {artifact.path.parent}" in message
    assert "--engines-dir" in message
