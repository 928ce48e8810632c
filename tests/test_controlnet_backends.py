"""ControlNets on the compiled backends: the ControlNet exported on its own, the UNet exported with the
residuals as an extra input (one graph with the feature bank's inputs when both are on), each checked
against torch, keyed in the engine cache, and run on ONNX Runtime and OpenVINO.

One engine cache for the file (the tiny model at 64x64: about a minute of exports on 2 cores, once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from livediff.backends import create_controlnet, onnx_backend
from livediff.backends.build import build_engines
from livediff.backends.control_residuals import RESIDUALS
from livediff.backends.onnx_backend import OrtRunner, onnx_key, sample_inputs, torch_module
from livediff.backends.unet_extras import unet_extras
from livediff.config import EngineSettings
from livediff.models import ModelParts
from livediff.models.controlnet import ControlNetParts, load_controlnet

SIZE = 64


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    engines = tmp_path_factory.mktemp("engines")
    return EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, engines_dir=engines,
                          controlnets=(("edges", "tiny"),), depth_model="tiny")  # fmt: skip


@pytest.fixture(scope="module")
def controlnet(tiny_parts: ModelParts) -> ControlNetParts:
    return load_controlnet("tiny", tiny_parts.unet)


@pytest.fixture(scope="module")
def built(settings: EngineSettings, tiny_parts: ModelParts) -> tuple[list[Path], list[str]]:
    messages: list[str] = []
    return build_engines(settings, tiny_parts, progress=messages.append), messages


@pytest.mark.slow  # exports and checks the plain UNet, the UNet with residual inputs and a ControlNet
def test_build_engines_builds_the_residual_unet_and_the_controlnet_keyed_apart(
    built: tuple[list[Path], list[str]], settings: EngineSettings, tiny_parts: ModelParts, controlnet: ControlNetParts
) -> None:
    paths, messages = built
    assert len(paths) == 6  # encoder, UNet, decoder, the UNet taking residuals, the ControlNet, the depth estimator
    residual_unet, controlnet_graph = paths[3], paths[4]
    assert paths[5].parent.name.startswith("depth-64x64-fp32-")
    assert residual_unet.parent.name.startswith("unet+control-v1-64x64-fp32-")
    assert controlnet_graph.parent.name.startswith("controlnet-64x64-fp32-")
    assert controlnet_graph.parent.parent.name == "tiny"  # the ControlNet's own name keys its folder
    text = "\n".join(messages)
    for label in ("unet+control-v1", "controlnet", "depth"):
        assert f"{label}: export matches torch on ONNX Runtime, max abs diff" in text
        assert f"{label}: fused graph matches torch on ONNX Runtime, max abs diff" in text
    key = onnx_key(settings, tiny_parts.with_controlnet(controlnet), "controlnet")
    assert key.model == "tiny" and key.revision == controlnet.revision and key.component == "controlnet"
    assert '"component": "controlnet"' in (controlnet_graph.parent / "key.json").read_text()


@pytest.mark.slow  # one more UNet export with both the bank's and the residuals' inputs, checked on two runtimes
def test_the_bank_and_the_residuals_share_one_unet_export(settings: EngineSettings, tiny_parts: ModelParts) -> None:
    both = settings.replace(feature_bank=True)
    extras = unet_extras(both, tiny_parts)
    assert extras.tag == "bank-v1+control-v1"
    assert [spec.name for spec in extras.inputs][-1] == RESIDUALS
    keys = {onnx_key(s, tiny_parts, "unet", unet_extras(s, tiny_parts)).name.split("-64x64")[0]
            for s in (settings, both, settings.replace(controlnets=(), feature_bank=True))}  # fmt: skip
    assert keys == {"unet+control-v1", "unet+bank-v1+control-v1", "unet+bank-v1"}
    messages: list[str] = []
    artifact = onnx_backend.ensure_onnx(both, tiny_parts, "unet", messages.append, extras=extras)
    assert artifact.path.parent.name.startswith("unet+bank-v1+control-v1-64x64-fp32-")
    assert "unet+bank-v1+control-v1: export matches torch on ONNX Runtime" in "\n".join(messages)


@pytest.mark.parametrize("graph", ["export", "fused"])
def test_the_exported_residual_unet_matches_torch(
    graph: str, built: tuple[list[Path], list[str]], settings: EngineSettings, tiny_parts: ModelParts
) -> None:
    extras = unet_extras(settings, tiny_parts)
    path = (
        built[0][3]
        if graph == "fused"
        else onnx_backend.ensure_onnx(settings, tiny_parts, "unet", lambda _: None, extras=extras).path
    )
    inputs = sample_inputs(tiny_parts, "unet", SIZE, SIZE, batch=5, dtype=torch.float32, seed=7, extras=extras)
    with torch.inference_mode():
        (expected,) = torch_module(tiny_parts, "unet", extras)(*inputs)
        plain = torch_module(tiny_parts, "unet")(*inputs[:3])
    (actual,) = OrtRunner(path, torch.device("cpu")).run(*inputs)
    assert (expected - actual).abs().max().item() < 1e-4
    assert (expected - plain).abs().max().item() > 0.1  # the residuals are not ignored


@pytest.mark.parametrize("graph", ["export", "fused"])
def test_the_exported_controlnet_matches_torch(graph: str, built: tuple[list[Path], list[str]],
                                               settings: EngineSettings, tiny_parts: ModelParts,
                                               controlnet: ControlNetParts) -> None:  # fmt: skip
    parts = tiny_parts.with_controlnet(controlnet)
    path = (
        built[0][4]
        if graph == "fused"
        else onnx_backend.ensure_onnx(settings, parts, "controlnet", lambda _: None).path
    )
    inputs = sample_inputs(parts, "controlnet", SIZE, SIZE, batch=5, dtype=torch.float32, seed=9)
    with torch.inference_mode():
        expected = torch_module(parts, "controlnet")(*inputs)
    actual = OrtRunner(path, torch.device("cpu"))(*inputs)
    assert (expected - actual).abs().max().item() < 1e-4
    assert not actual[0].any() and actual[1].abs().max().item() > 0.1  # row 0 has scale 0, the others not


def test_openvino_runs_the_controlnet_and_the_residual_unet_as_torch_does(
    built: tuple[list[Path], list[str]], settings: EngineSettings, tiny_parts: ModelParts, controlnet: ControlNetParts
) -> None:
    pytest.importorskip("openvino")
    from livediff.backends.openvino_backend import OvRunner, ensure_blob, require_openvino

    ov_settings = settings.replace(backend="openvino")
    messages: list[str] = []
    run = create_controlnet(ov_settings, tiny_parts, controlnet, progress=messages.append)
    assert "controlnet: OpenVINO fp32 matches torch" in "\n".join(messages)
    parts = tiny_parts.with_controlnet(controlnet)
    inputs = sample_inputs(parts, "controlnet", SIZE, SIZE, batch=4, dtype=torch.float32, seed=3)
    with torch.inference_mode():
        assert (torch_module(parts, "controlnet")(*inputs) - run(*inputs)).abs().max().item() < 1e-4

    extras = unet_extras(ov_settings, tiny_parts)
    blob = ensure_blob(ov_settings, tiny_parts, "unet", messages.append, extras)
    assert "unet+control-v1: OpenVINO fp32 matches torch" in "\n".join(messages)
    inputs = sample_inputs(tiny_parts, "unet", SIZE, SIZE, batch=3, dtype=torch.float32, seed=4, extras=extras)
    with torch.inference_mode():
        (expected,) = torch_module(tiny_parts, "unet", extras)(*inputs)
    (actual,) = OvRunner.load(require_openvino(tiny_parts.device), blob.path, "fp32").run(*inputs)
    assert (expected - actual).abs().max().item() < 1e-4


def test_the_depth_estimator_runs_compiled_as_torch_does(built: tuple[list[Path], list[str]],
                                                         tiny_parts: ModelParts) -> None:  # fmt: skip
    from livediff.models.depth import load_depth_model

    depth = load_depth_model("tiny")
    parts = tiny_parts.with_depth(depth)
    inputs = sample_inputs(parts, "depth", SIZE, SIZE, batch=3, dtype=torch.float32, seed=5)
    assert inputs[0].shape == (3, 3, *depth.input_size(SIZE, SIZE))
    with torch.inference_mode():
        expected = torch_module(parts, "depth")(*inputs)
    actual = OrtRunner(built[0][5], torch.device("cpu"))(*inputs)
    assert expected.shape == actual.shape and (expected - actual).abs().max().item() < 1e-4


@pytest.mark.slow(reason="inductor compiles the depth network on the CPU: ~30 s")
def test_the_depth_estimator_runs_inductor_compiled_under_cuda_graph_compiled(tiny_parts: ModelParts) -> None:
    """`cuda-graph-compiled` records the depth estimator compiled, as it does the ControlNet; on the
    CPU inductor runs too, so its output is checked against torch's here."""
    from livediff.backends import create_depth
    from livediff.models.depth import load_depth_model

    depth = load_depth_model("tiny")
    parts = tiny_parts.with_depth(depth)
    inputs = sample_inputs(parts, "depth", SIZE, SIZE, batch=2, dtype=torch.float32, seed=6)
    settings = EngineSettings(model="tiny", height=SIZE, width=SIZE, backend="cuda-graph-compiled")
    run = create_depth(settings, tiny_parts, depth)
    with torch.inference_mode():
        expected = torch_module(parts, "depth")(*inputs)
        actual = run(*inputs)
    assert getattr(run, "name", None) == "depth"  # the compiled callable, not the eager network
    assert expected.shape == actual.shape and (expected - actual).abs().max().item() < 1e-4
