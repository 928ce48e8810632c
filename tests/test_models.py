from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextModel

from livediff.errors import ModelLoadError
from livediff.models import builtin_dir, load_model, resolve_auto


def test_tiny_is_an_sd_shaped_model_loaded_from_its_saved_folder(tiny_parts) -> None:
    assert isinstance(tiny_parts.unet, UNet2DConditionModel)
    assert isinstance(tiny_parts.vae, AutoencoderTiny)
    assert isinstance(tiny_parts.text_encoder, CLIPTextModel)
    assert tiny_parts.revision.startswith("builtin-v")
    folder = builtin_dir("tiny")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert tiny_parts.unet.config.cross_attention_dim == tiny_parts.text_encoder.config.hidden_size


def test_tiny_is_the_same_model_every_time(tiny_parts) -> None:
    again = load_model("tiny")
    for a, b in zip(tiny_parts.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)


def test_local_folder_loads_and_its_fingerprint_follows_its_content(tmp_path: Path) -> None:
    copy = tmp_path / "my-model"
    shutil.copytree(builtin_dir("tiny"), copy)
    first = load_model(str(copy))
    assert first.revision.startswith("sha256-")
    assert load_model(str(copy)).revision == first.revision
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 32', '"sample_size": 16'))
    assert load_model(str(copy)).revision != first.revision


def test_unknown_hub_id_fails_with_a_message_naming_it_and_the_way_out() -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model("someone/no-such-model")
    message = str(error.value)
    assert "someone/no-such-model" in message
    assert "--model tiny" in message and "`hf download someone/no-such-model`" in message
    assert "HF_HUB_OFFLINE" in message  # the tests run offline: said, not "could not be downloaded"


@pytest.mark.parametrize("ref", ["no-such-thing", "./missing/folder", "a/b/c"])
def test_malformed_refs_fail_clearly(ref: str) -> None:
    with pytest.raises(ModelLoadError, match="--model tiny"):
        load_model(ref)


def test_folder_without_unet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(str(tmp_path))


def test_auto_picks_tiny_on_cpu() -> None:
    assert resolve_auto("auto", torch.device("cpu")) == "tiny"
    assert resolve_auto("auto", torch.device("cuda")) == "stabilityai/sd-turbo"
    assert resolve_auto("tiny", torch.device("cuda")) == "tiny"
