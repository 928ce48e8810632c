"""Tests for livediff.backends: ONNX export parity, the engine cache, ONNX Runtime and OpenVINO in the engine, TensorRT.

The tiny built-in model is exported once per session (~30 s on 2 cores) into a session-wide engine
cache that the other tests reuse. GPU tests skip without CUDA (and without TensorRT or
onnxruntime-gpu); on this kind of host the BackendUnavailable errors are tested instead.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch

from livediff.backends import create_backend, onnx_backend
from livediff.backends.build import build_engines
from livediff.backends.cache import COMPONENTS, SIDECAR, EngineCache, EngineKey, slugify
from livediff.backends.onnx_backend import (
    OPSET,
    OnnxBackend,
    OrtRunner,
    ParityError,
    check_parity,
    onnx_key,
    sample_inputs,
    torch_module,
)
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.engine.device import torch_threads
from livediff.errors import BackendUnavailable, ConfigError
from livediff.models import ModelParts, load_model

SIZE = 64
CUDA = torch.cuda.is_available()
ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="session")
def parts(tiny_parts: ModelParts) -> ModelParts:
    """The tiny model on the CPU in float32, shared with the other test files (conftest)."""
    return tiny_parts


@pytest.fixture(scope="session")
def parts_bf16() -> ModelParts:
    """The tiny model on the CPU in bfloat16 (what `--dtype bfloat16` loads)."""
    return load_model("tiny", "cpu", torch.bfloat16)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    engines = tmp_path_factory.mktemp("engines")
    return EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, engines_dir=engines)


@pytest.fixture(scope="session")
def built(settings: EngineSettings, parts: ModelParts) -> tuple[list[Path], list[str]]:
    """What the onnx backend runs on the CPU (the fused graphs), built once, and the progress lines."""
    messages: list[str] = []
    return build_engines(settings, parts, progress=messages.append), messages


@pytest.fixture(scope="session")
def exported(settings: EngineSettings, parts: ModelParts, built: tuple[list[Path], list[str]]) -> list[Path]:
    """The plain exports the fused graphs were made from (in the cache already: reused)."""
    return [onnx_backend.ensure_onnx(settings, parts, c, progress=lambda _: None).path for c in COMPONENTS]


# -- export parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["export", "fused"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_onnx_export_matches_torch(
    component: str, graph: str, built: tuple[list[Path], list[str]], exported: list[Path], parts: ModelParts
) -> None:
    path = (exported if graph == "export" else built[0])[COMPONENTS.index(component)]
    # Batch 5: neither the export sample's 2 nor the build check's 3, so the batch axis is really dynamic.
    inputs = sample_inputs(parts, component, SIZE, SIZE, batch=5, dtype=torch.float32, seed=7)
    with torch.inference_mode():
        expected = torch_module(parts, component)(*inputs)
    actual = OrtRunner(path, torch.device("cpu"))(*inputs)
    diff = (expected - actual).abs().max().item()
    # float32 on CPU on both sides: the same math, summed in another order by other kernels (MLAS
    # against ATen/oneDNN), ~1e-7 relative per op. Measured <= 5e-6 here with outputs up to ~4;
    # 1e-4 leaves 20x headroom, while a wrong graph (op semantics, timesteps, scaling) is off by > 0.1.
    assert diff < 1e-4, f"{component} {graph}: ONNX Runtime vs torch max abs diff {diff:.3g} (tolerance 1e-4)"


def test_the_fused_graphs_use_ort_kernels_and_live_apart(built: tuple[list[Path], list[str]],
                                                         exported: list[Path]) -> None:  # fmt: skip
    unet_fused, unet_export = built[0][1], exported[1]
    ops = lambda path: {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}  # noqa: E731
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops(unet_fused)
    assert "MultiHeadAttention" not in ops(unet_export)  # the portable graph TensorRT builds from
    assert len({p.parent for p in [*built[0], *exported]}) == 6  # six artifacts, six cache folders


def test_onnx_files_have_a_dynamic_batch_and_opset(built: tuple[list[Path], list[str]]) -> None:
    for path in built[0]:
        model = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET >= 17
        for tensor in [*model.graph.input, *model.graph.output]:
            batch = tensor.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.dim_value, f"{path}: {tensor.name} has a static batch"


def test_build_reports_parity_and_builds(built: tuple[list[Path], list[str]]) -> None:
    paths, messages = built
    text = "\n".join(messages)
    for component, path in zip(COMPONENTS, paths):
        assert f"exporting {component}" in text
        assert f"{component}: export matches torch on ONNX Runtime, max abs diff" in text
        assert f"{component}: fused for ONNX Runtime:" in text
        assert f"{component}: fused graph matches torch on ONNX Runtime, max abs diff" in text
        assert f"{component}: built {path}" in text


def test_check_parity_raises_clearly() -> None:
    expected = torch.zeros(2, 4)
    assert check_parity("x", expected, expected + 1e-5, "fp32") == pytest.approx(1e-5)
    with pytest.raises(ParityError, match=r"unet: max abs diff from torch 0\.5 exceeds"):
        check_parity("unet", expected, expected + 0.5, "fp32")
    with pytest.raises(ParityError, match="nan"):
        check_parity("unet", expected, expected * float("nan"), "fp16")
    with pytest.raises(ParityError, match="shape"):
        check_parity("unet", expected, expected[:1], "fp32")


# -- the engine cache ------------------------------------------------------------------------------

BASE_KEY = EngineKey(
    model="tiny", revision="builtin-v1", component="unet", height=64, width=64, batch="dynamic",
    precision="fp32", runtime="onnx-opset18-torch2.13.0", device="cpu",
)  # fmt: skip


def test_key_changes_with_every_field(tmp_path: Path) -> None:
    changed: dict[str, Any] = {
        "model": "stabilityai/sd-turbo", "revision": "builtin-v2", "component": "vae_decoder", "height": 128,
        "width": 96, "batch": "1-4-8", "precision": "fp16", "runtime": "tensorrt-10.9.0", "device": "sm89",
        "extras": "bank-v1",
    }  # fmt: skip
    assert set(changed) == {f.name for f in dataclasses.fields(EngineKey)}, "a new key field needs a case here"
    cache = EngineCache(tmp_path)
    for name, value in changed.items():
        other = dataclasses.replace(BASE_KEY, **{name: value})
        assert other.digest != BASE_KEY.digest, name
        assert cache.folder(other) != cache.folder(BASE_KEY), name


def test_key_digest_is_stable() -> None:
    # Pinned: the name must not depend on the process (no hash() randomisation) or on field order.
    assert BASE_KEY.digest == "6f090a366432408e"
    assert EngineKey(**dict(reversed(BASE_KEY.fields().items()))).digest == BASE_KEY.digest  # type: ignore[arg-type]


def test_onnx_key_follows_settings_and_model(settings: EngineSettings, parts: ModelParts) -> None:
    unet, decoder = onnx_key(settings, parts, "unet"), onnx_key(settings, parts, "vae_decoder")
    assert (unet.model, unet.revision, unet.batch, unet.precision, unet.device) == (
        "tiny",
        "builtin-v1",
        "dynamic",
        "fp32",
        "cpu",
    )
    assert onnx_key(settings.replace(height=128), parts, "unet").digest != unet.digest
    assert onnx_key(settings.replace(width=128), parts, "unet").digest != unet.digest
    assert onnx_key(settings.replace(max_batch=8), parts, "unet") == unet  # one file serves every batch
    retrained = dataclasses.replace(parts, revision="sha256-0123456789abcdef")
    assert onnx_key(settings, retrained, "unet").digest != unet.digest
    other_vae = dataclasses.replace(parts, vae_ref="full")
    assert onnx_key(settings, other_vae, "vae_decoder").digest != decoder.digest  # --vae swaps the VAE...
    assert onnx_key(settings, other_vae, "unet") == unet  # ...and leaves the UNet


def test_a_cpu_export_of_rounded_weights_has_its_own_key(
    settings: EngineSettings, parts: ModelParts, parts_bf16: ModelParts
) -> None:
    # Both are float32 graphs, but one holds the bfloat16-rounded weights: they must not share a file.
    for component in COMPONENTS:
        full, rounded = onnx_key(settings, parts, component), onnx_key(settings, parts_bf16, component)
        assert full.precision == rounded.precision == "fp32"
        assert rounded.revision == full.revision + "+weights=bf16" and rounded.digest != full.digest


def test_cache_layout_and_sidecar(built: tuple[list[Path], list[str]], settings: EngineSettings) -> None:
    path = built[0][COMPONENTS.index("unet")]
    assert path.parent.parent == settings.engines_dir / "tiny"
    assert path.parent.name.startswith("unet-64x64-fp32-")
    stored = (path.parent / SIDECAR).read_text()
    assert '"component": "unet"' in stored and '"revision": "builtin-v1"' in stored
    assert slugify("stabilityai/sd-turbo") == "stabilityai-sd-turbo"
    assert slugify("/home/me/My Models/turbo") == "home-me-my-models-turbo"


def test_second_build_reuses_without_rewriting(
    built: tuple[list[Path], list[str]], exported: list[Path], settings: EngineSettings, parts: ModelParts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    paths = built[0]
    before = [(p.stat().st_mtime_ns, p.stat().st_ino) for p in paths]

    def no_export(*args: object) -> None:
        raise AssertionError("exported or fused again")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    monkeypatch.setattr(onnx_backend.ort_fusions, "optimize_for_ort", no_export)
    messages: list[str] = []
    start = time.perf_counter()
    again = build_engines(settings, parts, progress=messages.append)
    elapsed = time.perf_counter() - start
    assert again == paths
    assert [(p.stat().st_mtime_ns, p.stat().st_ino) for p in paths] == before
    assert messages == [line for c, p, e in zip(COMPONENTS, paths, exported)
                        for line in (f"{c}: reused {e}", f"{c}: reused {p}")]  # fmt: skip
    assert elapsed < 2.0, f"a reuse took {elapsed:.1f} s (the export takes ~30 s)"


def test_cache_commits_only_finished_builds(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def failing(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        cache.get_or_build(BASE_KEY, "model.onnx", failing)
    assert cache.lookup(BASE_KEY, "model.onnx") is None
    assert list((tmp_path / "tiny").iterdir()) == []  # no staging folder left behind

    first = cache.get_or_build(BASE_KEY, "model.onnx", _writer("graph"))
    assert first.built and first.path.read_text() == "graph"
    second = cache.get_or_build(BASE_KEY, "model.onnx", lambda path: pytest.fail("rebuilt"))
    assert second == dataclasses.replace(first, built=False)


def _writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text)

    return write


def test_cache_keeps_the_artifact_of_a_racing_builder(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def slow(path: Path) -> None:  # another process commits the same key while this one builds
        cache.get_or_build(BASE_KEY, "model.onnx", _writer("theirs"))
        path.write_text("ours")

    result = cache.get_or_build(BASE_KEY, "model.onnx", slow)
    assert not result.built and result.path.read_text() == "theirs"
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [BASE_KEY.name]


# -- the ONNX backend in the engine ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream_batch", "params"),
    [
        (False, StreamParams(strength=0.5, steps=1)),
        (False, StreamParams(strength=0.8, steps=2, guidance=3.0, negative_prompt="blurry")),
        (True, StreamParams(strength=1.0, steps=3)),
    ],
    ids=["one-step", "guidance", "stream-batch"],
)
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_compiled_backend_in_engine_matches_torch(
    built: tuple[list[Path], list[str]], settings: EngineSettings, parts: ModelParts,
    stream_batch: bool, params: StreamParams, backend: str,
) -> None:  # fmt: skip
    if backend == "openvino":
        pytest.importorskip("openvino")
    # The session's engine cache (already built) rather than a fresh tmp_path: a second export would
    # double the file's run time and test nothing new; the build itself is tested above.
    engine_settings = settings.replace(stream_batch=stream_batch)
    engines = {b: StreamEngine(engine_settings.replace(backend=b), parts) for b in (backend, "torch")}
    assert engines[backend].backend.name == {"onnx": "onnx-cpu", "openvino": "openvino-fp32"}[backend]
    generator = torch.Generator().manual_seed(3)
    frames = [torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator) for _ in range(2)]
    outputs = {}
    for name, engine in engines.items():
        streams = [engine.open_stream(params), engine.open_stream(params.replace(seed=7))]
        for _ in range(3):  # fills the stream-batch pipeline; compares steady state
            result = engine.step(list(zip(streams, frames)))
        outputs[name] = torch.stack(result.outputs).int()
    diff = (outputs[backend] - outputs["torch"]).abs().max().item()
    assert engines[backend].backend.torch_threads == 1 and engines["torch"].backend.torch_threads is None
    # uint8 frames: latents agree to ~1e-5, so only a value at a rounding boundary may move by one level.
    assert diff <= 1, f"{backend} vs torch engine output differs by {diff} levels"


def test_torch_threads_are_set_for_a_block_and_restored_after() -> None:
    before = torch.get_num_threads()
    seen = []
    with pytest.raises(RuntimeError), torch_threads(1):
        seen.append(torch.get_num_threads())
        raise RuntimeError("a failed step")
    with torch_threads(None):
        seen.append(torch.get_num_threads())
    assert seen == [1, before] and torch.get_num_threads() == before


def test_onnx_backend_runs_a_bfloat16_model_on_cpu(settings: EngineSettings, parts_bf16: ModelParts) -> None:
    backend = OnnxBackend(settings, parts_bf16, progress=lambda line: None)  # float32 graphs of the rounded weights
    latents = sample_inputs(parts_bf16, "vae_decoder", SIZE, SIZE, batch=2, dtype=torch.bfloat16)[0]
    decoded = backend.decode(latents)
    assert decoded.dtype == torch.bfloat16
    with torch.inference_mode():
        expected = torch_module(parts_bf16, "vae_decoder")(latents)
    diff = (decoded.float() - expected.float()).abs().max().item()
    assert diff < 1e-1, f"float32 ONNX vs bfloat16 torch max abs diff {diff:.3g}"  # bfloat16 ulp at 1 is ~8e-3


def test_create_backend_builds_onnx(
    built: tuple[list[Path], list[str]], settings: EngineSettings, parts: ModelParts
) -> None:
    assert isinstance(create_backend(settings, parts), OnnxBackend)


# -- OpenVINO --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openvino_built(
    settings: EngineSettings, parts: ModelParts, exported: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[EngineSettings, list[Path], list[str]]:
    """Float32 OpenVINO models compiled into a cache of their own that starts with the session's
    ONNX exports (whatever order the tests run in), and the progress lines."""
    pytest.importorskip("openvino")
    engines = tmp_path_factory.mktemp("openvino-engines")
    for onnx_file in exported:
        shutil.copytree(onnx_file.parent, engines / "tiny" / onnx_file.parent.name)
    ov_settings = settings.replace(backend="openvino", engines_dir=engines)
    messages: list[str] = []
    return ov_settings, build_engines(ov_settings, parts, progress=messages.append), messages


def test_openvino_build_checks_each_network_and_reuses(
    openvino_built: tuple[EngineSettings, list[Path], list[str]], exported: list[Path], parts: ModelParts
) -> None:
    ov_settings, paths, messages = openvino_built
    text = "\n".join(messages)
    for component, path, onnx_file in zip(COMPONENTS, paths, exported):
        onnx_copy = ov_settings.engines_dir / "tiny" / onnx_file.parent.name / onnx_file.name
        assert f"{component}: reused {onnx_copy}" in text  # compiled from the export ONNX Runtime runs
        assert f"{component}: OpenVINO fp32 matches torch, max abs diff" in text
        assert f"{component}: built {path}" in text and path.name == "model.blob"
        assert path.parent.name.startswith(f"{component}-64x64-fp32-")
    again: list[str] = []
    assert build_engines(ov_settings, parts, progress=again.append) == paths
    assert again == [f"{c}: reused {p}" for c, p in zip(COMPONENTS, paths)]


def test_openvino_matches_torch(openvino_built: tuple[EngineSettings, list[Path], list[str]],
                                parts: ModelParts) -> None:  # fmt: skip
    from livediff.backends.openvino_backend import OpenVinoBackend

    backend = create_backend(openvino_built[0], parts)
    assert isinstance(backend, OpenVinoBackend) and backend.name == "openvino-fp32"
    for component, method in {"vae_encoder": "encode", "unet": "unet", "vae_decoder": "decode"}.items():
        inputs = sample_inputs(parts, component, SIZE, SIZE, batch=5, dtype=torch.float32, seed=7)
        with torch.inference_mode():
            expected = torch_module(parts, component)(*inputs)
        actual = getattr(backend, method)(*inputs)
        diff = (expected - actual).abs().max().item()
        assert diff < 1e-4, f"{component}: OpenVINO vs torch max abs diff {diff:.3g}"  # as ONNX Runtime, above


def test_openvino_runs_bfloat16_where_the_cpu_can(settings: EngineSettings, parts_bf16: ModelParts) -> None:
    ov = pytest.importorskip("openvino")
    from livediff.backends.openvino_backend import OpenVinoBackend, run_precision

    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert run_precision(ov, torch.bfloat16) == ("bf16" if bf16 else "fp32")
    assert run_precision(ov, torch.float32) == "fp32"
    messages: list[str] = []
    backend = OpenVinoBackend(settings.replace(backend="openvino"), parts_bf16, progress=messages.append)
    assert backend.name == ("openvino-bf16" if bf16 else "openvino-fp32")
    if bf16:  # built: the conversion checked in float32, then the bf16 model within its own tolerance
        assert sum("OpenVINO fp32 matches torch" in m for m in messages) == 3
        assert sum("OpenVINO bf16 matches torch" in m for m in messages) == 3
    latents = sample_inputs(parts_bf16, "vae_decoder", SIZE, SIZE, batch=2, dtype=torch.bfloat16, seed=2)[0]
    decoded = backend.decode(latents)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == (2, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = torch_module(parts_bf16, "vae_decoder").float()(latents.float())
    diff = (decoded.float() - expected).abs().max().item()
    assert diff < 1e-1 * max(1.0, expected.abs().max().item()), f"bf16 decode off by {diff:.3g}"


def test_openvino_unavailable_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    from livediff.backends.openvino_backend import require_openvino

    with pytest.raises(BackendUnavailable, match=r"openvino backend needs the engine on the CPU \(its device is cuda"):
        require_openvino(torch.device("cuda"))
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'livediff\[openvino\]'"):
        require_openvino(torch.device("cpu"))


def test_auto_runs_openvino_in_bfloat16_where_the_cpu_has_it(settings: EngineSettings) -> None:
    """What `livediff serve` runs on a CPU by default: the fastest set-up this host has."""
    ov = pytest.importorskip("openvino")
    from livediff.backends.openvino_backend import cpu_has_bf16

    bf16 = cpu_has_bf16(ov)
    engine = StreamEngine(settings.replace(backend="auto"))  # loads the model in the dtype auto picked
    assert engine.settings.backend == "openvino"
    assert engine.dtype == engine.parts.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert engine.backend.name == ("openvino-bf16" if bf16 else "openvino-fp32")
    frame = torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8)
    (output,) = engine.step([(engine.open_stream(), frame)]).outputs
    assert output.shape == frame.shape and output.dtype == torch.uint8 and not torch.equal(output, frame)


def test_build_engines_builds_what_serve_runs_by_default(settings: EngineSettings, capsys) -> None:  # type: ignore[no-untyped-def]
    from livediff.cli import main

    argv = ["build-engines", "--model", "tiny", "--size", str(SIZE), "--engines-dir", str(settings.engines_dir)]
    assert main(argv) == 0
    artifact = "model.blob" if importlib.util.find_spec("openvino") else "model.onnx"
    # one built-or-reused line per network for what serve runs (an OpenVINO blob built here is
    # preceded by its ONNX export's own line; run alone, no earlier test built them)
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if (": built " in line or ": reused " in line) and line.endswith(artifact)]
    assert [line.split(":")[0] for line in lines] == list(COMPONENTS), out


def test_auto_without_openvino_or_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from livediff.backends import resolve_backend
    from livediff.engine.device import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("onnx", cpu) == "onnx" and resolve_backend("torch", cuda) == "torch"
    assert resolve_backend("auto", cuda) == "cuda-graph"  # a TensorRT build takes minutes: only when asked
    assert resolve_dtype("auto", cuda, "torch") == torch.float16
    assert resolve_dtype("auto", cpu, "onnx") == resolve_dtype("auto", cpu, "torch") == torch.float32
    assert resolve_dtype("bfloat16", cpu, "onnx") == torch.bfloat16
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    assert resolve_backend("auto", cpu) == "onnx"


def test_engine_refuses_a_model_loaded_in_another_dtype(parts: ModelParts) -> None:
    with pytest.raises(ConfigError, match="dtype bfloat16 asked for, but the model given was loaded in torch.float32"):
        StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE, dtype="bfloat16"), parts)


# -- CUDA and TensorRT -----------------------------------------------------------------------------


@pytest.mark.skipif(CUDA and HAS_TENSORRT, reason="TensorRT can run here: tested by test_tensorrt_matches_torch")
def test_tensorrt_unavailable_is_clear(parts: ModelParts, tmp_path: Path) -> None:
    from livediff.backends.tensorrt_backend import TensorRTBackend

    settings = EngineSettings(model="tiny", backend="tensorrt", height=SIZE, width=SIZE, engines_dir=tmp_path / "e")
    for attempt in (lambda: TensorRTBackend(settings, parts), lambda: build_engines(settings, parts)):
        with pytest.raises(BackendUnavailable) as info:
            attempt()
        message = str(info.value)
        assert "tensorrt backend needs" in message
        assert ("CUDA GPU" in message) == (parts.device.type != "cuda")
        assert ("pip install tensorrt" in message) == (not HAS_TENSORRT)
    assert not settings.engines_dir.exists(), "raised after starting work"


@pytest.mark.skipif(not CUDA or ORT_CUDA, reason="needs CUDA without onnxruntime-gpu")
def test_onnx_on_cuda_without_onnxruntime_gpu_is_clear(tmp_path: Path) -> None:
    parts = load_model("tiny", "cuda", torch.float16)
    settings = EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, engines_dir=tmp_path / "e")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        OnnxBackend(settings, parts)
    assert not settings.engines_dir.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and ORT_CUDA), reason="needs CUDA and onnxruntime-gpu")
def test_onnx_on_cuda_matches_torch(tmp_path: Path) -> None:
    parts = load_model("tiny", "cuda", torch.float16)
    settings = EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, engines_dir=tmp_path)
    _check_backend_on_cuda(OnnxBackend(settings, parts), parts)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_tensorrt_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from livediff.backends.tensorrt_backend import TensorRTBackend

    parts = load_model("tiny", "cuda", torch.float16)
    settings = EngineSettings(model="tiny", backend="tensorrt", height=SIZE, width=SIZE, engines_dir=tmp_path)
    _check_backend_on_cuda(TensorRTBackend(settings, parts), parts)
    messages: list[str] = []
    TensorRTBackend(settings, parts, progress=messages.append)
    assert all(": reused " in line for line in messages), messages


def _check_backend_on_cuda(backend: object, parts: ModelParts) -> None:
    """Each network of `backend` against torch in float16 (one ulp at 1 is ~1e-3; it compounds over layers)."""
    calls = {"vae_encoder": "encode", "unet": "unet", "vae_decoder": "decode"}
    for component, method in calls.items():
        inputs = sample_inputs(parts, component, SIZE, SIZE, batch=3, dtype=torch.float16, seed=5)
        if component == "vae_encoder":  # the engine sends channels_last frames on CUDA
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last),)
        with torch.inference_mode():
            expected = torch_module(parts, component)(*inputs).float()
            actual = getattr(backend, method)(*inputs).float()
        diff = (expected - actual).abs().max().item()
        assert diff < 5e-2 * max(1.0, expected.abs().max().item()), f"{component}: max abs diff {diff:.3g}"
