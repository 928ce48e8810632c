"""The fast path's kernel variants and `--backend auto`'s choice, on the CPU: `cuda-graph-fused-norm`
(its torch reference path here: frames equal to the plain `cuda-graph` recording's, the given UNet
left as it was), `cuda-graph-compiled-fp8` (refused off a float8 GPU in one line; which layers it
takes), the choice file the GPU kit writes and `auto` reads. The Triton kernel itself runs on a GPU
(the `gpu` tests at the end, and the GPU kit's `gpu-tests` and `variants` steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from livediff.backends import resolve_backend
from livediff.backends.choice import CHOICE_FILE, measured_choice, measurement, pick, read, record
from livediff.backends.cuda_graph import CudaGraphBackend
from livediff.backends.fp8 import fp8_unavailable, quantizable, require_fp8, with_fp8_unet
from livediff.backends.fused_norm import (
    FusedResnetBlock2D,
    group_norm_silu,
    group_norm_silu_reference,
    with_fused_norm,
)
from livediff.backends.unet_extras import unet_extras
from livediff.backends.variants import FusedNormGraphBackend
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import BackendUnavailable
from livediff.synthetic import SyntheticCamera
from tests.test_cuda_graph import STAGES, HostReplay

SIZE = 64


def test_the_fused_norm_variant_equals_cuda_graph_on_the_cpu_and_leaves_the_given_unet_alone(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    """Every residual block of the tiny UNet is fused on a copy; on the CPU the fused forward runs the
    torch reference, the same ops as diffusers' block: frames equal the plain recording's, a bank step
    included (recorded too)."""
    fused_parts, count = with_fused_norm(tiny_parts)
    blocks = [m for m in tiny_parts.unet.modules() if isinstance(m, ResnetBlock2D)]
    assert count == len(blocks) > 0
    assert all(type(m) is ResnetBlock2D for m in blocks)  # the given UNet: untouched
    assert all(type(m) is FusedResnetBlock2D for m in fused_parts.unet.modules() if isinstance(m, ResnetBlock2D))

    config = EngineSettings(model="tiny", height=SIZE, width=SIZE, feature_bank=True)
    plain, fused = StreamEngine(config, parts=tiny_parts), StreamEngine(config, parts=tiny_parts)
    plain.backend = CudaGraphBackend(tiny_parts, capture=HostReplay(), extras=unet_extras(config, tiny_parts))
    recorder = HostReplay()
    backend = FusedNormGraphBackend(tiny_parts, capture=recorder, extras=unet_extras(config, tiny_parts))
    fused.backend = backend
    assert backend.name == "cuda-graph-fused-norm" and backend.describe() == {
        "fused_blocks": count, "group_norm_silu": "torch reference"}  # fmt: skip
    params = [StreamParams(prompt="a red fox", seed=1, temporal_bank=2), StreamParams(prompt="rain", seed=2)]
    pairs = [(plain.open_stream(p), fused.open_stream(p)) for p in params]
    for frame in [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE, seed=3).frames(4)]:
        want = plain.step([(a, frame) for a, _ in pairs]).outputs
        got = fused.step([(b, frame) for _, b in pairs]).outputs
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert recorder.recorded == len(STAGES)  # recorded at the second frame, replayed after


def test_group_norm_silu_off_cuda_is_the_blocks_own_ops() -> None:
    norm = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, add = torch.randn(2, 16, 5, 6), torch.randn(2, 16, 1, 1)
    want = torch.nn.functional.silu(norm(x + add))
    assert torch.equal(group_norm_silu(x, norm, add), want)
    assert torch.equal(group_norm_silu_reference(x, norm), torch.nn.functional.silu(norm(x)))


def test_fp8_is_refused_off_a_float8_gpu_in_one_line_naming_the_backend() -> None:
    cpu = torch.device("cpu")
    why = fp8_unavailable(cpu)
    assert why is not None and "compute capability >= 8.9" in why
    with pytest.raises(BackendUnavailable) as refused:
        resolve_backend("cuda-graph-compiled-fp8", cpu)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cuda-graph-compiled-fp8 backend needs")
    with pytest.raises(BackendUnavailable, match="cuda-graph-compiled-fp8 backend"):
        require_fp8(cpu)


def test_fp8_quantizing_refuses_before_copying_or_touching_the_unet(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in tiny_parts.unet.state_dict().items()}
    with pytest.raises(BackendUnavailable):
        with_fp8_unet(tiny_parts)
    assert all(torch.equal(before[k], v) for k, v in tiny_parts.unet.state_dict().items())


def test_fp8_takes_the_large_linear_layers_only() -> None:
    assert quantizable(torch.nn.Linear(1280, 5120))  # a feed-forward layer at SD's 1280-channel level
    assert quantizable(torch.nn.Linear(1024, 640))  # a cross-attention key projection at the 640 level
    assert not quantizable(torch.nn.Linear(320, 320))  # the 320 level stays
    assert not quantizable(torch.nn.Linear(1000, 1000))  # float8 products need multiples of 16
    assert not quantizable(torch.nn.Conv2d(1280, 1280, 1))


def _report(rows: list[tuple[str, float, float | None]], dtype: str = "float16") -> dict[str, Any]:
    """A bench_variants-shaped report: (variant, ms a frame at batch 1, PSNR or None for torch)."""
    return {
        "model": "sd-turbo-random (random-v1)", "size": "512x512", "dtype": dtype,
        "variants": [
            {"variant": name, "batches": {"1": {"ms_per_frame": ms}, "8": {"ms_per_frame": ms / 3}},
             **({} if psnr is None else {"parity": {"psnr_db": psnr, "matches": psnr >= 40.0}})}
            for name, ms, psnr in rows
        ],
    }  # fmt: skip


def test_auto_picks_the_fastest_matching_variant_measured_on_this_gpu_and_torch(tmp_path: Path) -> None:
    gpu, version = "NVIDIA H100 80GB HBM3", "2.11.0+cu130"
    rows = [("torch", 40.0, None), ("cuda-graph", 10.0, float("inf")), ("cuda-graph-compiled", 5.0, 44.0),
            ("cuda-graph-compiled-fp8", 3.0, 31.0), ("cuda-graph-compiled+autotune", 2.0, 50.0)]  # fmt: skip
    path = record(tmp_path, measurement(_report(rows), gpu, version))
    assert path == tmp_path / CHOICE_FILE
    entries = read(path)
    assert entries[0]["best"] == "cuda-graph-compiled+autotune"  # what the kit measured fastest and matching
    choice = pick(entries, gpu, version)
    # fp8 missed the parity bound; the autotuned row is no backend a server can be started with
    assert choice is not None and choice.variant == "cuda-graph-compiled"
    assert "5.0 ms a frame" in choice.why and "PSNR 44.0 dB" in choice.why and gpu in choice.why
    assert pick(entries, "NVIDIA A100-SXM4-80GB", version) is None  # another GPU: nothing measured
    assert pick(entries, gpu, "2.12.0+cu130") is None  # another torch: its kernels may differ

    faster = [("torch", 40.0, None), ("cuda-graph-compiled-fp8", 3.0, 41.0), ("cuda-graph-compiled", 5.0, 44.0)]
    record(tmp_path, measurement(_report(faster), gpu, version))
    entries = read(path)
    assert len(entries) == 2
    assert pick(entries, gpu, version).variant == "cuda-graph-compiled-fp8"  # type: ignore[union-attr]
    no_fp8 = pick(entries, gpu, version, runnable=lambda v: v != "cuda-graph-compiled-fp8")
    assert no_fp8 is not None and no_fp8.variant == "cuda-graph-compiled"
    bf16 = [("torch", 40.0, None), ("cuda-graph", 1.0, 60.0)]
    record(tmp_path, measurement(_report(bf16, dtype="bfloat16"), gpu, version))
    assert pick(read(path), gpu, version).variant == "cuda-graph-compiled-fp8"  # type: ignore[union-attr]  # float16 first


def test_auto_reads_no_file_off_cuda_and_survives_a_broken_one(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / CHOICE_FILE).write_text("{not json")
    assert read(tmp_path / CHOICE_FILE) == [] and "not read" in caplog.text
    assert measured_choice(tmp_path, torch.device("cpu")) is None
    assert measured_choice(None, torch.device("cuda")) is None
    assert resolve_backend("auto", torch.device("cpu"), tmp_path) in ("openvino", "onnx")
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"measurements": "no"}))
    assert read(tmp_path / CHOICE_FILE) == []


# -- on a GPU (skipped without CUDA; the GPU kit's gpu-tests step runs them) -------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_the_triton_group_norm_silu_matches_torch(dtype: torch.dtype, channels_last: bool) -> None:
    pytest.importorskip("triton")
    from livediff.backends.fused_norm import group_norm_silu_triton

    generator = torch.Generator("cuda").manual_seed(0)
    for n, c, h, w, groups in ((1, 320, 64, 64, 32), (4, 640, 32, 32, 32), (2, 1280, 8, 8, 32), (3, 48, 7, 5, 4)):
        norm = torch.nn.GroupNorm(groups, c).to("cuda", dtype)
        with torch.no_grad():
            norm.weight.normal_(generator=generator)
            norm.bias.normal_(generator=generator)
        x = (torch.randn(n, c, h, w, device="cuda", generator=generator) * 2 + 0.5).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        add = torch.randn(n, c, 1, 1, device="cuda", generator=generator).to(dtype)
        for extra in (None, add):
            want = group_norm_silu_reference(x.float(), norm.float(), None if extra is None else extra.float())
            got = group_norm_silu_triton(x, norm, extra)
            assert got.stride() == x.stride() and got.dtype == dtype
            bound = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype] * max(
                1.0, float(want.abs().max())
            )
            assert float((got.float() - want).abs().max()) <= bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_the_fused_norm_backend_matches_eager_torch(tmp_path: Path) -> None:
    from livediff.models import load_model
    from tests.test_fast_path import psnr

    parts = load_model("tiny", "cuda", torch.float16)
    config = EngineSettings(model="tiny", device="cuda", height=128, width=128, engines_dir=tmp_path)
    eager = StreamEngine(config.replace(backend="torch"), parts=parts)
    fused = StreamEngine(config.replace(backend="cuda-graph-fused-norm"), parts=parts)
    assert fused.backend.describe()["group_norm_silu"] == "triton"  # type: ignore[attr-defined]
    a, b = eager.open_stream(StreamParams(seed=1)), fused.open_stream(StreamParams(seed=1))
    for frame in [torch.from_numpy(f) for f in SyntheticCamera(128, 128, seed=5).frames(4)]:
        assert psnr(eager.step([(a, frame)]).outputs[0], fused.step([(b, frame)]).outputs[0]) >= 40.0
