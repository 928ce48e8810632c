"""Image prompts on an exported backend: the UNet exported with per-row image tokens and scales as
extra inputs (keyed by the adapter), checked against torch, and a mixed batch on ONNX Runtime
giving each stream its solo frame and torch's frame; a scale change needs no new export."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from livediff.backends.image_prompt import IP_EMBEDS, IP_SCALES
from livediff.config import EngineSettings, ImagePromptParams, StreamParams
from livediff.engine.stream import StreamEngine

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]  # an export checked against torch on a loaded machine

SIZE = 64
PARAMS = [
    StreamParams(seed=1),
    StreamParams(seed=2, image_prompt=ImagePromptParams("upload", 1.0)),
    StreamParams(seed=3, image_prompt=ImagePromptParams("upload", 0.5)),
    StreamParams(seed=4, image_prompt=ImagePromptParams("upload", 0.0)),
]


@pytest.fixture(scope="module")
def onnx_engine(tiny_parts: Any, tmp_path_factory: pytest.TempPathFactory) -> StreamEngine:
    settings = EngineSettings(model="tiny", backend="onnx", height=SIZE, width=SIZE, ip_adapter="tiny",
                              engines_dir=tmp_path_factory.mktemp("engines"))  # fmt: skip
    return StreamEngine(settings, parts=copy.deepcopy(tiny_parts))


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator) for _ in range(3)]


def _session(engine: StreamEngine, params: StreamParams, picture: torch.Tensor) -> Any:
    stream = engine.open_stream(params.replace(image_prompt=None))
    engine.set_uploaded_image(stream, picture)
    engine.update(stream, params)
    return stream


def test_a_mixed_batch_on_onnx_runtime_matches_solo_and_torch(onnx_engine: StreamEngine, tiny_parts: Any) -> None:
    engine = onnx_engine
    assert engine.image_feature is not None and engine.backend.extras.tag == engine.image_feature.tag
    folders = {p.parent.name for p in engine.settings.engines_dir.rglob("key.json")}
    assert any(name.startswith(f"unet+{engine.image_feature.tag}-") for name in folders), folders
    frame, picture, other = _images()
    pictures = [picture, picture, other, picture]
    solo = [engine.step([(_session(engine, p, q), frame)]).outputs[0] for p, q in zip(PARAMS, pictures)]
    mixed = engine.step([(_session(engine, p, q), frame) for p, q in zip(PARAMS, pictures)]).outputs
    reference = StreamEngine(engine.settings.replace(backend="torch"), parts=copy.deepcopy(tiny_parts))
    eager = [reference.step([(_session(reference, p, q), frame)]).outputs[0] for p, q in zip(PARAMS, pictures)]
    for alone, together, want in zip(solo, mixed, eager):
        assert int((alone.int() - together.int()).abs().max()) <= 2
        assert int((alone.int() - want.int()).abs().max()) <= 2
    assert float((solo[0].int() - solo[1].int()).abs().float().mean()) > 2  # the image prompt changes the picture


def test_a_scale_change_on_onnx_runtime_needs_no_new_export(onnx_engine: StreamEngine) -> None:
    engine = onnx_engine
    before = sorted(p.parent.name for p in engine.settings.engines_dir.rglob("key.json"))
    frame, picture, _ = _images()
    stream = _session(engine, PARAMS[1], picture)
    first = engine.step([(stream, frame)]).outputs[0]
    engine.update(stream, stream.params.replace(image_prompt=ImagePromptParams("upload", 1.8)))
    second = engine.step([(stream, frame)]).outputs[0]
    assert float((first.int() - second.int()).abs().float().mean()) > 1
    assert sorted(p.parent.name for p in engine.settings.engines_dir.rglob("key.json")) == before
    assert engine.image_feature is not None
    values = engine.image_feature.neutral(1, engine.device, engine.dtype)  # scale 0: the plain prediction
    values[IP_EMBEDS] = torch.randn_like(values[IP_EMBEDS])
    assert not values[IP_SCALES].any()
    latents, timesteps = torch.randn((1, 4, 8, 8)), torch.full((1,), 499.0)
    embeds = engine.conditioning.get("x").embeds
    torch.testing.assert_close(engine.backend.unet_with(latents, timesteps, embeds, values)[0],
                               engine.backend.unet(latents, timesteps, embeds), atol=1e-4, rtol=1e-4)  # fmt: skip
