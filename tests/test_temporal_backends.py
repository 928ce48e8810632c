"""The feature bank on the compiled backends: the UNet exported with the bank's inputs, checked against
torch output by output, keyed apart in the engine cache, and run by the engine on ONNX Runtime and OpenVINO.

One engine cache for the file (the plain graphs and the bank graph of the tiny model at 64x64: a few
minutes of exports on 2 cores, once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from livediff.backends import onnx_backend
from livediff.backends.build import build_engines
from livediff.backends.onnx_backend import OrtRunner, onnx_key, sample_inputs, torch_module
from livediff.backends.unet_extras import unet_extras
from livediff.config import EngineSettings, StreamParams
from livediff.engine import StreamEngine
from livediff.models import ModelParts
from livediff.synthetic import SyntheticCamera

SIZE = 64


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    engines = tmp_path_factory.mktemp("engines")
    return EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, engines_dir=engines,
                          feature_bank=True)  # fmt: skip


@pytest.fixture(scope="module")
def built(settings: EngineSettings, tiny_parts: ModelParts) -> tuple[list[Path], list[str]]:
    messages: list[str] = []
    return build_engines(settings, tiny_parts, progress=messages.append), messages


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    camera = SyntheticCamera(SIZE, SIZE, still_background=True, noise=2.0)
    return [torch.from_numpy(f) for f in camera.frames(4)]


@pytest.mark.slow  # exports the UNet with the bank's inputs and checks it against torch on two runtimes
def test_the_bank_graph_is_built_checked_and_keyed_apart(
    built: tuple[list[Path], list[str]], settings: EngineSettings, tiny_parts: ModelParts
) -> None:
    paths, messages = built
    assert len(paths) == 4  # encoder, UNet, decoder, and the UNet with the bank
    bank_graph = paths[-1]
    assert bank_graph.parent.name.startswith("unet+bank-v1-64x64-fp32-")
    assert bank_graph.parent != paths[1].parent
    text = "\n".join(messages)
    assert "unet+bank-v1: export matches torch on ONNX Runtime, max abs diff" in text
    assert "unet+bank-v1: fused graph matches torch on ONNX Runtime, max abs diff" in text
    extras = unet_extras(settings, tiny_parts)
    plain, with_bank = onnx_key(settings, tiny_parts, "unet"), onnx_key(settings, tiny_parts, "unet", extras)
    assert with_bank.extras == "bank-v1" and "extras" not in plain.fields() and plain.digest != with_bank.digest
    assert '"extras": "bank-v1"' in (bank_graph.parent / "key.json").read_text()


@pytest.mark.parametrize("graph", ["export", "fused"])
def test_the_exported_bank_unet_matches_torch(graph: str, built: tuple[list[Path], list[str]],
                                              settings: EngineSettings, tiny_parts: ModelParts) -> None:  # fmt: skip
    extras = unet_extras(settings, tiny_parts)
    path = (
        built[0][-1]
        if graph == "fused"
        else onnx_backend.ensure_onnx(settings, tiny_parts, "unet", lambda _: None, extras=extras).path
    )
    # batch 5 with 4 bank slots: neither the export's sample (2, 2) nor the build's check (3, 3)
    inputs = sample_inputs(tiny_parts, "unet", SIZE, SIZE, batch=5, dtype=torch.float32, seed=7, extras=extras, bank=4)
    with torch.inference_mode():
        expected = torch_module(tiny_parts, "unet", extras)(*inputs)
    actual = OrtRunner(path, torch.device("cpu")).run(*inputs)
    assert len(actual) == len(expected) == 1 + len(extras.outputs)
    for want, got in zip(expected, actual):
        assert (want - got).abs().max().item() < 1e-4


def test_the_openvino_bank_unet_matches_torch(settings: EngineSettings, tiny_parts: ModelParts,
                                              built: tuple[list[Path], list[str]]) -> None:  # fmt: skip
    pytest.importorskip("openvino")
    from livediff.backends.openvino_backend import OvRunner, ensure_blob, require_openvino

    extras = unet_extras(settings, tiny_parts)
    messages: list[str] = []
    blob = ensure_blob(settings.replace(backend="openvino"), tiny_parts, "unet", messages.append, extras)
    assert "unet+bank-v1: OpenVINO fp32 matches torch" in "\n".join(messages)
    inputs = sample_inputs(tiny_parts, "unet", SIZE, SIZE, batch=4, dtype=torch.float32, seed=8, extras=extras, bank=1)
    with torch.inference_mode():
        expected = torch_module(tiny_parts, "unet", extras)(*inputs)
    actual = OvRunner.load(require_openvino(tiny_parts.device), blob.path, "fp32").run(*inputs)
    for want, got in zip(expected, actual, strict=True):
        assert (want - got).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_the_engine_runs_the_bank_on_compiled_backends(backend: str, settings: EngineSettings, tiny_parts: ModelParts,
                                                       built: tuple[list[Path], list[str]],
                                                       frames: list[torch.Tensor]) -> None:  # fmt: skip
    if backend == "openvino":
        pytest.importorskip("openvino")
    compiled = StreamEngine(settings.replace(backend=backend), tiny_parts)
    reference = StreamEngine(settings.replace(backend="torch"), tiny_parts)
    plain = StreamEngine(settings.replace(backend=backend, feature_bank=False), tiny_parts)
    assert compiled.bank_feature is not None and plain.bank_feature is None

    def run(engine: StreamEngine, params: list[StreamParams]) -> list[torch.Tensor]:
        streams = [engine.open_stream(p) for p in params]
        for frame in frames:
            outputs = engine.step([(s, frame) for s in streams]).outputs
        return [o.int() for o in outputs]

    mixed = [StreamParams(seed=1), StreamParams(seed=2, temporal_bank=2, temporal_weight=2.0)]
    ours, theirs = run(compiled, mixed), run(reference, mixed)
    for a, b in zip(ours, theirs):  # float32 both sides: a level at a rounding boundary may move
        assert (a - b).abs().max().item() <= 1
    # without any bank in the step the plain graph runs: exactly what an engine without the feature gives
    assert torch.equal(run(compiled, [StreamParams(seed=1)])[0], run(plain, [StreamParams(seed=1)])[0])
    # in a step with a bank, the bankless row runs the masked graph: the same math, another summation order
    assert (ours[0] - run(plain, [StreamParams(seed=1), StreamParams(seed=2)])[0]).abs().max().item() <= 1
    # and the bank does change the banked stream's frames
    assert (ours[1] - run(plain, [StreamParams(seed=1), StreamParams(seed=2)])[1]).abs().max().item() > 0
