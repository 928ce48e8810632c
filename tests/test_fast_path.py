"""Every feature on the fast path, on the CPU: ControlNets and motion-aware strength recorded into a
layout's stages, a param change never recording again; the `cuda-graph-compiled` variant (inductor's
kernels inside the recorded stages) against eager torch, never recompiling on a param change; its
compile cache saved and loaded in fresh processes; the SDPA kernel choice over the kernels here.

A CUDA graph cannot be captured here: `HostReplay` (test_cuda_graph.py) stands in for the capture,
the bookkeeping around it is the backend's own. The same on a GPU is in test_cuda.py's gpu tests
and the GPU kit's `variants` step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from livediff.backends.attention import SdpaChoice, attention_calls, choose, measure
from livediff.backends.compiled_graph import CompiledGraphBackend
from livediff.backends.cuda_graph import CudaGraphBackend
from livediff.backends.unet_extras import unet_extras
from livediff.config import ControlParams, EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.synthetic import SyntheticCamera
from tests.test_cuda_graph import STAGES, HostReplay

SIZE = 64
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE, seed=5).frames(8)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 frames (peak 255); inf when identical."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _ready(engine: StreamEngine, params: StreamParams) -> None:
    for future in engine.control_loads(params).values():
        future.result(timeout=300)


def test_controlnet_and_motion_steps_are_recorded_and_a_param_change_never_records_again(tiny_parts, frames) -> None:  # type: ignore[no-untyped-def]
    config = EngineSettings(model="tiny", height=SIZE, width=SIZE, controlnets=(("edges", "tiny"),))
    eager, recorded = StreamEngine(config, parts=tiny_parts), StreamEngine(config, parts=tiny_parts)
    recorder = HostReplay()
    recorded.backend = CudaGraphBackend(tiny_parts, capture=recorder, extras=unet_extras(config, tiny_parts))
    canny = StreamParams(prompt="a red fox", seed=1, controlnet=(ControlParams("edges", "canny", 0.8),))
    moving = StreamParams(prompt="a city", seed=2, motion_strength=(0.3, 0.7))
    for engine in (eager, recorded):
        _ready(engine, canny)
    pairs = [(eager.open_stream(p), recorded.open_stream(p)) for p in (canny, moving)]

    def step(frame: torch.Tensor) -> None:
        want = eager.step([(a, frame) for a, _ in pairs]).outputs
        got = recorded.step([(b, frame) for _, b in pairs]).outputs
        assert all(torch.equal(w, g) for w, g in zip(want, got))

    for frame in frames[:3]:
        step(frame)
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1 and recorder.recorded == len(STAGES)
    (layout,) = graphs.layouts
    assert layout[-1] == ((("edges", (True,)),), ())  # which ControlNet on which row, at which step
    replayed = recorder.replayed
    changes = [
        canny.replace(prompt="a snowy street"),
        canny.replace(strength=0.8),
        canny.replace(seed=9),
        canny.replace(controlnet=(ControlParams("edges", "canny", 0.3),)),
    ]
    for change, frame in zip(changes, frames[3:]):
        for engine, stream in zip((eager, recorded), pairs[0]):
            engine.update(stream, change)
        step(frame)
    assert recorder.recorded == len(STAGES)  # prompt, strength, seed, ControlNet scale: replayed, not recorded
    assert recorder.replayed == replayed + len(changes) * len(STAGES)
    for engine, stream in zip((eager, recorded), pairs[0]):  # another ControlNet set is another layout
        engine.update(stream, canny.replace(controlnet=()))
    step(frames[7])
    assert len(graphs.layouts) == 1 and recorder.recorded == len(STAGES)  # met once: eager


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor compiles the tiny UNet's C++ in 1-2 min on 2 idle cores, far longer when shared
def test_the_compiled_variant_matches_eager_and_a_param_change_never_recompiles(tiny_parts, frames) -> None:  # type: ignore[no-untyped-def]
    config = EngineSettings(model="tiny", height=SIZE, width=SIZE)
    eager, compiled = StreamEngine(config, parts=tiny_parts), StreamEngine(config, parts=tiny_parts)
    recorder = HostReplay()
    backend = CompiledGraphBackend(tiny_parts, capture=recorder, size=(SIZE, SIZE))
    compiled.backend = backend
    assert backend.name == "cuda-graph-compiled" and "math" in backend.sdpa.order
    params = StreamParams(prompt="a red fox", seed=1)
    a, b = eager.open_stream(params), compiled.open_stream(params)
    worst = math.inf
    for frame in frames[:3]:
        want, got = eager.step([(a, frame)]).outputs[0], compiled.step([(b, frame)]).outputs[0]
        worst = min(worst, psnr(want, got))
    assert worst >= 40.0, f"PSNR {worst:.1f} dB against eager torch"
    compiled_shapes = {name: set(s) for name, s in backend.compile_seconds().items()}
    assert set(compiled_shapes) == {"vae_encoder", "unet", "vae_decoder"}
    frames_compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for change, frame in zip([params.replace(prompt="a city"), params.replace(strength=0.8),
                              params.replace(seed=4)], frames[3:]):  # fmt: skip
        eager.update(a, change)
        compiled.update(b, change)
        want, got = eager.step([(a, frame)]).outputs[0], compiled.step([(b, frame)]).outputs[0]
        assert psnr(want, got) >= 40.0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_compiled  # no recompile
    assert {name: set(s) for name, s in backend.compile_seconds().items()} == compiled_shapes
    assert recorder.recorded == len(STAGES)  # and no re-record


_ROUND_TRIP = r"""
import json, sys, torch
from pathlib import Path
from livediff.backends.compiled_graph import CompiledGraphBackend
from livediff.models import load_model
parts = load_model("tiny")
backend = CompiledGraphBackend(parts, capture=lambda run: (run(), lambda: None), engines_dir=Path(sys.argv[1]),
                               measure_attention=False, size=(64, 64))
backend.decode(torch.zeros(1, 4, 8, 8))
backend.warmed()
counters = torch._dynamo.utils.counters["inductor"]
print(json.dumps({"loaded": backend.cache.loaded, "path": str(backend.cache.path),
                  "hits": counters["fxgraph_cache_hit"], "misses": counters["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_compile_cache_saves_and_a_fresh_process_compiles_from_it(tmp_path: Path) -> None:
    def run(inductor_dir: str) -> dict[str, Any]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_dir), "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(tmp_path / "engines")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    cold = run("inductor-a")
    assert not cold["loaded"] and cold["misses"] >= 1 and Path(cold["path"]).is_file()
    assert Path(cold["path"]).parent.parent.name == "tiny"  # engines/<model>/inductor-64x64-fp32-<digest>/
    key = json.loads((Path(cold["path"]).parent / "key.json").read_text())
    assert key["device"] == "cpu" and key["torch_version"] == torch.__version__ and key["height"] == 64
    warm = run("inductor-b")  # a fresh inductor cache: only the engine cache can serve it
    assert warm["loaded"] and warm["hits"] >= 1 and warm["misses"] == 0


def test_the_compiled_variant_is_refused_off_cuda_before_a_model_loads() -> None:
    from livediff.backends import resolve_backend
    from livediff.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="cuda-graph-compiled backend needs the engine on a CUDA GPU"):
        resolve_backend("cuda-graph-compiled", torch.device("cpu"))
    assert resolve_backend("cuda-graph-compiled", torch.device("cuda")) == "cuda-graph-compiled"


def test_the_sdpa_choice_orders_the_kernels_that_match_by_their_time(tiny_parts) -> None:  # type: ignore[no-untyped-def]
    unet = tiny_parts.unet
    latents, timesteps = torch.zeros(1, 4, 8, 8), torch.full((1,), 500.0)
    embeds = torch.zeros(1, 77, unet.config.cross_attention_dim)
    calls = attention_calls(lambda: unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False))
    assert calls and all(len(shape[0]) == 4 for shape in calls)  # (batch, heads, tokens, head size)
    measured = measure(calls, torch.device("cpu"), repeats=1)
    assert all(isinstance(ms, float) for ms in measured["math"].values())  # math takes everything
    assert all(isinstance(r, str) for r in measured["cudnn"].values())  # a CUDA kernel: refused here, and said
    choice = choose(calls, measured)
    assert "math" in choice.order and "cudnn" not in choice.order and "cudnn" in choice.refused
    with choice.context():
        unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)  # runs under the chosen order
    # on hand-built timings: the sum over calls weighted by count decides, a kernel that refused a shape comes last
    two: Counter[Any] = Counter({"a": 3, "b": 1})
    ranked = choose(two, {"x": {"a": 1.0, "b": 10.0}, "y": {"a": 3.0, "b": 1.0}, "z": {"a": 0.1, "b": "unsupported"}})
    assert ranked.order == ["y", "x", "z"] and ranked.ms == {"x": 13.0, "y": 10.0}
    assert ranked.refused["z"].startswith("1 of 2 shapes: unsupported")
    assert SdpaChoice().describe() == {"order": [], "ms": {}, "refused": {}}


# -- on a GPU (skipped without CUDA; the GPU kit's gpu-tests step runs them) -------------------------

GPU_SIZE = 128


def _cuda_engine(backend: str, tmp_path: Path, **settings: Any) -> StreamEngine:
    from livediff.models import load_model

    parts = load_model("tiny", "cuda", torch.float16)
    config = EngineSettings(model="tiny", device="cuda", height=GPU_SIZE, width=GPU_SIZE, backend=backend,
                            engines_dir=tmp_path / "engines", **settings)  # fmt: skip
    return StreamEngine(config, parts=parts)


def _worst(reference: StreamEngine, other: StreamEngine, params: list[StreamParams], frames: list[torch.Tensor],
           changes: list[StreamParams] | None = None) -> float:  # fmt: skip
    """The worst PSNR of `other`'s frames against `reference`'s, stepping both together; `changes`
    are applied to the first stream one per frame after the third."""
    pairs = [(reference.open_stream(p), other.open_stream(p)) for p in params]
    worst = math.inf
    for index, frame in enumerate(frames):
        if changes and 3 <= index < 3 + len(changes):
            for engine, stream in zip((reference, other), pairs[0]):
                engine.update(stream, changes[index - 3])
        want = reference.step([(a, frame) for a, _ in pairs]).outputs
        got = other.step([(b, frame) for _, b in pairs]).outputs
        worst = min(worst, *(psnr(w, g) for w, g in zip(want, got)))
    return worst


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_controlnet_and_motion_replay_from_cuda_graphs_matching_eager(tmp_path: Path) -> None:
    controlnets = (("edges", "tiny"),)
    eager = _cuda_engine("torch", tmp_path, controlnets=controlnets)
    graphed = _cuda_engine("cuda-graph", tmp_path, controlnets=controlnets)
    canny = StreamParams(prompt="a red fox", seed=1, controlnet=(ControlParams("edges", "canny", 0.8),))
    for engine in (eager, graphed):
        _ready(engine, canny)
    frames = [torch.from_numpy(f) for f in SyntheticCamera(GPU_SIZE, GPU_SIZE, seed=5).frames(8)]
    changes = [canny.replace(prompt="a city"), canny.replace(seed=3),
               canny.replace(controlnet=(ControlParams("edges", "canny", 0.3),))]  # fmt: skip
    worst = _worst(eager, graphed, [canny, StreamParams(seed=2, motion_strength=(0.3, 0.7))], frames, changes)
    assert worst >= 40.0, f"PSNR {worst:.1f} dB"
    graphs = graphed.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1  # one layout, recorded once, replayed through every param change


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bank_steps_replay_from_cuda_graphs_matching_eager_while_the_bank_fills(tmp_path: Path) -> None:
    eager = _cuda_engine("torch", tmp_path, feature_bank=True)
    graphed = _cuda_engine("cuda-graph", tmp_path, feature_bank=True)
    banked = StreamParams(prompt="a red fox", seed=1, temporal_bank=3)
    frames = [torch.from_numpy(f) for f in SyntheticCamera(GPU_SIZE, GPU_SIZE, seed=5).frames(8)]
    changes = [banked.replace(prompt="a city"), banked.replace(temporal_weight=2.0), banked.replace(seed=3)]
    worst = _worst(eager, graphed, [banked, StreamParams(seed=2)], frames, changes)
    assert worst >= 40.0, f"PSNR {worst:.1f} dB"
    graphs = graphed.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1  # recorded at the second frame (1 frame kept), replayed as it filled and changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(1200)
def test_cuda_compiled_variant_matches_eager_and_never_recompiles_on_a_param_change(tmp_path: Path) -> None:
    eager = _cuda_engine("torch", tmp_path, max_batch=2)
    compiled = _cuda_engine("cuda-graph-compiled", tmp_path, max_batch=2)
    assert compiled.backend.name == "cuda-graph-compiled" and compiled.backend.channels_last
    frames = [torch.from_numpy(f) for f in SyntheticCamera(GPU_SIZE, GPU_SIZE, seed=5).frames(8)]
    params = [StreamParams(prompt="a red fox", seed=1), StreamParams(prompt="rain", seed=2, strength=0.7)]
    assert _worst(eager, compiled, params[:1], frames[:3]) >= 40.0
    assert _worst(eager, compiled, params, frames[:3]) >= 40.0
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    changes = [params[0].replace(prompt="a city"), params[0].replace(strength=0.8), params[0].replace(seed=9)]
    assert _worst(eager, compiled, params, frames, changes) >= 40.0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
    assert sorted(layout[0] for layout in compiled.backend.graphs.layouts) == [1, 2]  # type: ignore[attr-defined]
    description = compiled.backend.describe()  # type: ignore[attr-defined]
    assert description["attention"]["order"] and description["compile_cache"]["path"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sdpa_choice_measures_the_fused_kernels() -> None:
    calls: Counter[Any] = Counter({((2, 8, 4096, 40), (2, 8, 4096, 40), "float16", False): 10,
                                   ((2, 8, 4096, 40), (2, 8, 77, 40), "float16", False): 10})  # fmt: skip
    measured = measure(calls, torch.device("cuda"))
    choice = choose(calls, measured)
    assert choice.order and choice.order[0] != "math"  # a fused kernel beats the math one at SD's shapes
    assert all(isinstance(ms, float) for ms in measured[choice.order[0]].values())
