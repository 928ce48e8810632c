"""LoRAs on an exported backend: the UNet exported with the per-row scale matrix as an extra input
(keyed by the LoRA set), checked against torch, and a mixed batch on ONNX Runtime giving each
stream its solo frame and torch's frame.

One engine cache for the file (the tiny model at 64x64: a few minutes of exports on 2 cores, once).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from livediff.backends.multi_lora import LORA_SCALES
from livediff.config import EngineSettings, LoRAParams, StreamParams
from livediff.engine.stream import StreamEngine

pytestmark = pytest.mark.timeout(1800)  # four exports, each checked against torch, on a loaded 2-core machine

LORAS = (("ink", "tiny"), ("film", "random:8"))
PARAMS = [
    StreamParams(),
    StreamParams(loras=(LoRAParams("ink"),)),
    StreamParams(loras=(LoRAParams("film", -0.5), LoRAParams("ink", 2.0))),
    StreamParams(loras=(LoRAParams("film", 1.5),)),
]


@pytest.fixture(scope="module")
def onnx_engine(tiny_parts: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[StreamEngine, list[str]]:
    settings = EngineSettings(model="tiny", backend="onnx", height=64, width=64, loras=LORAS,
                              engines_dir=tmp_path_factory.mktemp("engines"))  # fmt: skip
    engine = StreamEngine(settings, parts=copy.deepcopy(tiny_parts))
    return engine, [p.name for p in settings.engines_dir.rglob("key.json")]


def _frame() -> torch.Tensor:
    return torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_the_lora_unet_is_exported_keyed_by_its_lora_set(onnx_engine: tuple[StreamEngine, list[str]]) -> None:
    engine, _ = onnx_engine
    assert engine.lora_feature is not None
    tag = engine.lora_feature.tag
    assert tag.startswith("lora2r8-") and engine.backend.extras.tag == tag
    folders = {p.parent.name for p in engine.settings.engines_dir.rglob("key.json")}
    assert any(name.startswith(f"unet+{tag}-64x64-fp32-") for name in folders), folders


def test_a_mixed_batch_on_onnx_runtime_matches_solo_and_torch(onnx_engine: tuple[StreamEngine, list[str]],
                                                             tiny_parts: Any) -> None:  # fmt: skip
    engine, _ = onnx_engine
    image = _frame()
    solo = [engine.step([(engine.open_stream(p), image)]).outputs[0] for p in PARAMS]
    mixed = engine.step([(engine.open_stream(p), image) for p in PARAMS]).outputs
    reference = StreamEngine(engine.settings.replace(backend="torch"), parts=copy.deepcopy(tiny_parts))
    torch_frames = [reference.step([(reference.open_stream(p), image)]).outputs[0] for p in PARAMS]
    for alone, together, eager in zip(solo, mixed, torch_frames):
        assert int((alone.int() - together.int()).abs().max()) <= 2
        assert int((alone.int() - eager.int()).abs().max()) <= 2
    assert all(float((solo[0].int() - other.int()).abs().float().mean()) > 10 for other in solo[1:3])


def test_a_scale_change_on_onnx_runtime_needs_no_new_export(onnx_engine: tuple[StreamEngine, list[str]]) -> None:
    engine, _ = onnx_engine
    before = sorted(p.parent.name for p in engine.settings.engines_dir.rglob("key.json"))
    image = _frame()
    stream = engine.open_stream(PARAMS[1])
    first = engine.step([(stream, image)]).outputs[0]
    engine.update(stream, stream.params.replace(loras=(LoRAParams("ink", -1.0),)))
    second = engine.step([(stream, image)]).outputs[0]
    assert float((first.int() - second.int()).abs().float().mean()) > 1
    assert sorted(p.parent.name for p in engine.settings.engines_dir.rglob("key.json")) == before
    values = {LORA_SCALES: torch.zeros((1, 2))}  # all-zero rows through the LoRA graph: the plain prediction
    latents, timesteps = torch.randn((1, 4, 8, 8)), torch.full((1,), 499.0)
    embeds = engine.conditioning.get("x").embeds
    torch.testing.assert_close(engine.backend.unet_with(latents, timesteps, embeds, values)[0],
                               engine.backend.unet(latents, timesteps, embeds), atol=1e-4, rtol=1e-4)  # fmt: skip


def test_a_mixed_batch_on_openvino_matches_onnx_runtime(onnx_engine: tuple[StreamEngine, list[str]],
                                                        tiny_parts: Any) -> None:  # fmt: skip
    """OpenVINO builds its blobs from the same exports (the engine cache the ONNX Runtime engine
    made), so its LoRA graph takes the same per-row scale input: each stream of a mixed batch
    gets ONNX Runtime's frame."""
    pytest.importorskip("openvino")
    engine, _ = onnx_engine
    openvino = StreamEngine(engine.settings.replace(backend="openvino", dtype="float32"),
                            parts=copy.deepcopy(tiny_parts))  # fmt: skip
    assert openvino.backend.extras.tag == engine.backend.extras.tag
    image = _frame()
    expected = engine.step([(engine.open_stream(p), image) for p in PARAMS]).outputs
    mixed = openvino.step([(openvino.open_stream(p), image) for p in PARAMS]).outputs
    for ours, theirs in zip(mixed, expected):
        assert int((ours.int() - theirs.int()).abs().max()) <= 2
