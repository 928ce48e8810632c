"""Single-file checkpoints (`--model file.safetensors`): a tiny model written in the original LDM
layout loads through diffusers' `from_single_file` with a config-only folder (no weights in it), gives
the same weights and frames as the folder it came from, and each file that cannot load is one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from livediff.config import EngineSettings, StreamParams
from livediff.engine.stream import StreamEngine
from livediff.errors import ModelLoadError
from livediff.models import builtin_dir, load_model
from livediff.models.lora import random_lora

RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
          "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}  # fmt: skip
TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
       "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}  # fmt: skip
BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)")


def ldm_unet_key(key: str, config: Any) -> str:
    """A diffusers UNet key in the original LDM layout (`input_blocks.N.M`, `in_layers.2` ...): the
    inverse of the renaming diffusers' single-file conversion does."""

    def resnet(rest: str) -> str:
        (prefix,) = [p for p in RESNET if rest.startswith(p)]
        return RESNET[prefix] + rest[len(prefix) :]

    for prefix, ldm in TOP.items():
        if key.startswith(prefix):
            return ldm + key[len(prefix) :]
    if key.startswith("mid_block."):
        kind, index, rest = key.removeprefix("mid_block.").split(".", 2)
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * int(index)}.{resnet(rest)}"
    match = BLOCK.fullmatch(key)
    assert match, key
    side, block, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
    per = config.layers_per_block + 1  # LDM blocks per diffusers block (the resnets, then a resampler)
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        at = block * per + index + 1
        return f"input_blocks.{at}.1.{rest}" if kind == "attentions" else f"input_blocks.{at}.0.{resnet(rest)}"
    if kind == "upsamplers":
        cross = "CrossAttn" in config.up_block_types[block]
        return f"output_blocks.{block * per + per - 1}.{2 if cross else 1}.{rest}"
    at = block * per + index
    return f"output_blocks.{at}.1.{rest}" if kind == "attentions" else f"output_blocks.{at}.0.{resnet(rest)}"


def write_single_file(parts: Any, path: Path) -> Path:
    """`parts`' UNet and text encoder as one SD 1.x single file (`model.diffusion_model.*`, `cond_stage_model.*`)."""
    state = {f"model.diffusion_model.{ldm_unet_key(k, parts.unet.config)}": v.contiguous()
             for k, v in parts.unet.state_dict().items()}  # fmt: skip
    for key, value in parts.text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.{key if key.startswith('text_model.') else 'text_model.' + key}"] = value
    save_file(state, path)
    return path


def config_only(folder: Path, into: Path) -> Path:
    """A copy of a diffusers folder with its configs and tokenizer but no UNet or text-encoder weights
    (what a hub config snapshot holds); the tiny VAE stays (taesd is the model's own there)."""
    for file in folder.rglob("*"):
        if file.is_file() and (file.suffix in (".json", ".txt") or file.parent.name == "vae"):
            (into / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, into / file.relative_to(folder))
    return into


@pytest.fixture(scope="module")
def checkpoint(tiny_parts: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny model as a single file, a config-only folder describing it)."""
    folder = tmp_path_factory.mktemp("single-file")
    return write_single_file(tiny_parts, folder / "tiny-sd15.safetensors"), config_only(
        builtin_dir("tiny"), folder / "config"
    )


def test_a_single_file_loads_the_same_weights_through_from_single_file(
    tiny_parts: Any, checkpoint: tuple[Path, Path]
) -> None:
    file, config = checkpoint
    assert not list(config.glob("unet/*.safetensors"))  # the weights can only come from the file
    parts = load_model(str(file), model_config=str(config))
    for mine, theirs in ((parts.unet, tiny_parts.unet), (parts.text_encoder, tiny_parts.text_encoder)):
        got, want = mine.state_dict(), theirs.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert type(parts.scheduler) is type(tiny_parts.scheduler)
    assert parts.ref == str(file) and parts.revision.startswith("file-")
    fused = load_model(str(file), model_config=str(config), lcm_lora="tiny")  # LCM-LoRA on a community file
    assert type(fused.scheduler).__name__ == "LCMScheduler" and fused.revision.startswith(parts.revision)


def test_an_engine_on_the_file_gives_the_folder_s_frames_to_rounding(checkpoint: tuple[Path, Path]) -> None:
    file, config = checkpoint
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    frames = []
    for settings in (EngineSettings(model="tiny", height=64, width=64),
                     EngineSettings(model=str(file), model_config=str(config), height=64, width=64)):  # fmt: skip
        engine = StreamEngine(settings)
        frames.append(engine.step([(engine.open_stream(StreamParams(steps=2)), image)]).outputs[0])
    # Equal weights; the UNets' outputs still differ by float32 rounding (3e-6 here: the file's modules are
    # built by diffusers' single-file path, the folder's by from_pretrained), so a frame may move by one level.
    assert int((frames[0].int() - frames[1].int()).abs().max()) <= 1
    assert float((frames[0].float() - frames[1].float()).abs().mean()) < 0.05


def test_files_that_cannot_load_are_one_line_naming_the_file(tiny_parts: Any, checkpoint: tuple[Path, Path],
                                                             tmp_path: Path) -> None:  # fmt: skip
    file, config = checkpoint
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file(random_lora(tiny_parts.unet, 4, seed=0), tmp_path / "style.safetensors")
    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    xl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
          "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}  # fmt: skip
    save_file(xl, tmp_path / "sdxl.safetensors")
    wide = config_only(builtin_dir("tiny"), tmp_path / "wide")  # a config of another shape than the file
    unet_config = json.loads((wide / "unet" / "config.json").read_text())
    (wide / "unet" / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [48, 96]}))
    cases: dict[tuple[str, str], str] = {
        (str(tmp_path / "missing.safetensors"), ""): "no such file",
        (str(tmp_path / "model.ckpt"), ""): "only .safetensors single files are read",
        (str(tmp_path / "junk.safetensors"), ""): "is not a safetensors file",
        (str(tmp_path / "style.safetensors"), ""): "is a LoRA, not a model: load it with --lora",
        (str(tmp_path / "other.safetensors"), ""): "holds no Stable Diffusion UNet",
        (str(tmp_path / "sdxl.safetensors"), ""): "is a 'xl_base' checkpoint",
        (str(file), ""): "needs the diffusers config stable-diffusion-v1-5/stable-diffusion-v1-5",  # offline here
        (str(file), str(tmp_path)): "not a diffusers model folder",
        (str(file), str(wide)): "could not be loaded: ",
        ("tiny", str(config)): "describes a single-file --model",
    }
    for (model, model_config), words in cases.items():
        with pytest.raises(ModelLoadError) as error:
            load_model(model, model_config=model_config)
        message = str(error.value)
        assert "\n" not in message and words in message and (model in message or model_config in message), message


def test_the_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from livediff.cli import build_parser, engine_settings

    argv = ["serve", "--model", "./dreamshaper_8.safetensors", "--model-config", "./sd15-config"]
    settings = engine_settings(build_parser().parse_args(argv))
    assert (settings.model, settings.model_config) == ("./dreamshaper_8.safetensors", "./sd15-config")
    monkeypatch.setenv("LIVEDIFF_MODEL_CONFIG", "stabilityai/sd-turbo")
    assert engine_settings(build_parser().parse_args(["serve", "--model", "x.safetensors"])).model_config == (
        "stabilityai/sd-turbo")  # fmt: skip
