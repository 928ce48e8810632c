"""ControlNets and depth estimators: loading (built-in, folder, hub id), fitting the UNet, residual
shapes, and the control images the preprocessors make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from livediff.backends.control_residuals import ControlNetResiduals, ControlResiduals, flatten
from livediff.backends.modules import DepthNetwork
from livediff.engine import preprocessors
from livediff.errors import ModelLoadError
from livediff.models import ModelParts
from livediff.models.builtin import SD21_UNET
from livediff.models.controlnet import (
    ControlNetParts,
    _architecture,
    builtin_controlnet_dir,
    load_controlnet,
    residual_layout,
)
from livediff.models.depth import DepthParts, builtin_depth_dir, load_depth_model

SIZE = 64


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_parts: ModelParts) -> ControlNetParts:
    return load_controlnet("tiny", tiny_parts.unet)


@pytest.fixture(scope="module")
def tiny_depth() -> DepthParts:
    return load_depth_model("tiny")


def _inputs(parts: ModelParts, rows: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 4, SIZE // 8, SIZE // 8, generator=generator),
        torch.linspace(900.0, 300.0, rows),
        torch.randn(rows, 77, parts.unet.config.cross_attention_dim, generator=generator),
    )


def test_tiny_controlnet_is_built_once_and_its_residuals_have_the_layouts_shapes(
    tiny_parts: ModelParts, tiny_controlnet: ControlNetParts
) -> None:
    assert isinstance(tiny_controlnet.model, ControlNetModel)
    assert tiny_controlnet.revision.startswith("builtin-v")
    assert (builtin_controlnet_dir("tiny") / "config.json").is_file()
    again = load_controlnet("tiny", tiny_parts.unet)
    for a, b in zip(tiny_controlnet.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    layout = residual_layout(tiny_parts.unet, SIZE, SIZE)
    assert layout == residual_layout(tiny_controlnet.model, SIZE, SIZE)
    latents, timesteps, embeds = _inputs(tiny_parts)
    with torch.inference_mode():
        down, mid = tiny_controlnet.model(latents, timesteps, embeds, torch.rand(2, 3, SIZE, SIZE), return_dict=False)
    assert tuple(tuple(r.shape[1:]) for r in (*down, mid)) == layout.shapes
    assert flatten(down, mid).shape == (2, layout.total)
    split_down, split_mid = layout.split(flatten(down, mid))
    assert all(torch.equal(a, b) for a, b in zip((*split_down, split_mid), (*down, mid)))


def test_the_tiny_controlnet_steers_the_unet_and_zero_residuals_change_nothing(
    tiny_parts: ModelParts, tiny_controlnet: ControlNetParts
) -> None:
    from livediff.backends.unet_extras import ExtrasUNet, UNetExtras

    layout = residual_layout(tiny_parts.unet, SIZE, SIZE)
    unet = ExtrasUNet(tiny_parts.unet, UNetExtras((ControlResiduals(layout),)))
    controlnet = ControlNetResiduals(tiny_controlnet.model)
    latents, timesteps, embeds = _inputs(tiny_parts)
    blank = torch.zeros(2, 3, SIZE, SIZE)
    square = blank.clone()
    square[:, :, 16:48, 16:48] = 1.0
    with torch.inference_mode():
        plain = tiny_parts.unet(latents, timesteps, embeds, return_dict=False)[0]
        zero = unet(latents, timesteps, embeds, torch.zeros(2, layout.total))[0]
        with_blank = unet(latents, timesteps, embeds, controlnet(latents, timesteps, embeds, blank, torch.ones(2)))[0]
        with_square = unet(latents, timesteps, embeds, controlnet(latents, timesteps, embeds, square, torch.ones(2)))[0]
        scaled_out = controlnet(latents, timesteps, embeds, square, torch.zeros(2))
    assert torch.equal(zero, plain)
    assert not scaled_out.any()
    spread = plain.std().item()
    # the control image moves the prediction by a good part of its spread (the tiny model's residuals
    # are calibrated to half the features they join): a ControlNet the tests can see
    assert (with_square - with_blank).abs().mean().item() > 0.05 * spread
    assert (with_blank - plain).abs().mean().item() > 0.05 * spread


def test_sd_turbo_random_controlnet_has_the_sd21_unets_residuals() -> None:
    with torch.device("meta"):  # the architecture alone: no 360M random weights to fill
        controlnet = ControlNetModel(**_architecture(SD21_UNET))
        unet = UNet2DConditionModel(**SD21_UNET)
    layout = residual_layout(controlnet, 512, 512)
    assert layout == residual_layout(unet, 512, 512)
    assert len(layout.down) == 12 and layout.mid == (1280, 8, 8)
    assert controlnet.config.conditioning_embedding_out_channels == (16, 32, 96, 256)


def test_a_local_controlnet_folder_loads_with_a_content_fingerprint(tiny_parts: ModelParts, tmp_path: Path) -> None:
    copy = tmp_path / "my-controlnet"
    shutil.copytree(builtin_controlnet_dir("tiny"), copy)
    loaded = load_controlnet(str(copy), tiny_parts.unet)
    assert loaded.revision.startswith("sha256-") and loaded.ref == str(copy)


def test_a_controlnet_for_another_unet_is_refused_naming_both_shapes(tiny_parts: ModelParts, tmp_path: Path) -> None:
    folder = tmp_path / "wide"
    config = _architecture(json.loads((builtin_controlnet_dir("tiny") / "config.json").read_text()))
    ControlNetModel(**{**config, "block_out_channels": (32, 96)}).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=r"does not fit this model's UNet: its residual channels") as error:
        load_controlnet(str(folder), tiny_parts.unet)
    assert "are [32, 32, 32, 96, 96], the UNet's [32, 32, 32, 64, 64]" in str(error.value)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            "someone/no-such-controlnet",
            "ControlNet 'someone/no-such-controlnet' is not a built-in (tiny, "
            "sd-turbo-random), a local folder, nor in the Hugging Face cache, and HF_HUB_OFFLINE is set",
        ),
        ("no-such-thing", "not a built-in (tiny, sd-turbo-random)"),
        ("a/b/c", "nor a hub id"),
    ],
)
def test_controlnets_that_are_not_there_fail_naming_them(tiny_parts: ModelParts, ref: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_controlnet(ref, tiny_parts.unet)


def test_a_folder_without_a_controlnet_config_is_refused(tiny_parts: ModelParts, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers ControlNet folder"):
        load_controlnet(str(tmp_path), tiny_parts.unet)


# -- preprocessors -----------------------------------------------------------------------------------


def _square_frame(size: int = SIZE, at: int = 16) -> torch.Tensor:
    frame = np.full((size, size, 3), 40, dtype=np.uint8)
    frame[at : size - at, at : size - at] = (220, 180, 60)
    return torch.from_numpy(frame)


def test_canny_marks_the_edges_of_a_square_and_nothing_else() -> None:
    images = preprocessors.canny([_square_frame(), torch.full((SIZE, SIZE, 3), 90, dtype=torch.uint8)],
                                 torch.device("cpu"), torch.float32)  # fmt: skip
    assert images.shape == (2, 3, SIZE, SIZE)
    edges = images[0, 0]
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[SIZE // 2, 14:19].any() and not edges[SIZE // 2, 20:44].any()  # the border, not the inside
    assert not images[1].any()  # a flat frame has no edges
    assert torch.equal(images[0, 0], images[0, 2])


def test_depth_maps_are_in_the_unit_range_and_follow_the_picture(tiny_depth: DepthParts) -> None:
    assert (builtin_depth_dir("tiny") / "preprocessor_config.json").is_file()
    assert tiny_depth.input_size(256, 256) == (112, 112)
    assert tiny_depth.input_size(64, 96) == (70, 98)  # never enlarged; multiples of 14
    frames = torch.stack([_square_frame(), _square_frame(at=24)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        maps = preprocessors.depth(frames, tiny_depth, DepthNetwork(tiny_depth.model))
    assert maps.shape == (2, 3, SIZE, SIZE)
    assert maps.min().item() == 0.0 and abs(maps.amax(dim=(1, 2, 3)) - 1).max().item() < 1e-5
    assert (maps[0] - maps[1]).abs().mean().item() > 0.02


def test_depth_runs_in_bfloat16_as_the_cpu_engines_do() -> None:
    model = load_depth_model("tiny", dtype=torch.bfloat16)
    frames = torch.stack([_square_frame()]).permute(0, 3, 1, 2).to(torch.bfloat16) / 127.5 - 1
    with torch.inference_mode():
        maps = preprocessors.depth(frames, model, DepthNetwork(model.model))
    assert maps.dtype == torch.bfloat16 and maps.shape == (1, 3, SIZE, SIZE) and maps.max().item() == 1.0


def test_an_unknown_depth_model_says_how_to_run_without_it() -> None:
    with pytest.raises(ModelLoadError, match=r"depth model 'someone/no-depth' .* `--depth-model tiny`"):
        load_depth_model("someone/no-depth")


def test_a_depth_folder_needs_its_processor_config(tmp_path: Path) -> None:
    shutil.copytree(builtin_depth_dir("tiny"), tmp_path / "depth")
    assert load_depth_model(str(tmp_path / "depth")).revision.startswith("sha256-")
    (tmp_path / "depth" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no preprocessor_config.json"):
        load_depth_model(str(tmp_path / "depth"))
