"""LCM-LoRA fused into an SD-family model (`--lcm-lora`): the fused UNet against PEFT's own unfused
LoRA forward (diffusers and kohya files), the LCM scheduler and the revision it brings, the engine
with it (and per-stream LoRAs on top), and each input that cannot load as one line naming the flag."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from livediff.config import EngineSettings, LoRAParams, StreamParams
from livediff.engine.schedule import C_OUT, C_SKIP
from livediff.engine.stream import StreamEngine
from livediff.errors import ConfigError, ModelLoadError
from livediff.models import load_model
from livediff.models.builtin import TINY_UNET
from livediff.models.lora import random_lora


def kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A diffusers-keyed LoRA in kohya's layout: `lora_unet_<path with _>.lora_down/up.weight` and `.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        path, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def unet_output(unet: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    embeds = torch.randn((2, 77, TINY_UNET["cross_attention_dim"]), generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([999.0, 499.0]), embeds, return_dict=False)[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_the_fused_unet_is_peft_s_lora_forward(tiny_parts: Any, tmp_path: Path, layout: str) -> None:
    state = random_lora(tiny_parts.unet, 8, seed=7)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(kohya(state, alpha=4.0) if layout == "kohya" else state, file)

    fused = load_model("tiny", lcm_lora=str(file))
    reference = copy.deepcopy(tiny_parts.unet)
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    keys, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(file))
    if layout == "kohya":
        keys = {k if k.startswith("unet.") else f"unet.{k}": v for k, v in keys.items()}
    reference.load_lora_adapter(keys, prefix="unet", network_alphas=alphas, adapter_name="ref")
    expected = unet_output(reference)
    got = unet_output(fused.unet)
    assert float((got - expected).abs().max()) < 1e-4
    assert float((got - unet_output(tiny_parts.unet)).abs().max()) > 1e-2  # the LoRA does change the UNet
    assert not getattr(fused.unet, "peft_config", None)  # plain modules, the LoRA merged into their weights
    assert isinstance(fused.scheduler, LCMScheduler)
    assert fused.scheduler.config.beta_schedule == tiny_parts.scheduler.config.beta_schedule
    assert fused.lcm_lora == str(file)
    assert fused.revision.startswith(tiny_parts.revision + "+lcm-lora=")


def test_the_revision_follows_the_lora_s_content(tmp_path: Path) -> None:
    a, b = load_model("tiny", lcm_lora="tiny"), load_model("tiny", lcm_lora="random:8")
    assert a.revision != b.revision and a.revision == load_model("tiny", lcm_lora="tiny").revision
    from livediff.backends.onnx_backend import component_revision

    assert "+lcm-lora=" in component_revision(a, "unet")  # compiled engines of plain and fused never mix


def test_an_engine_with_lcm_lora_samples_with_lcm_and_takes_stream_loras_on_top() -> None:
    image = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    plain = StreamEngine(EngineSettings(model="tiny", height=64, width=64))
    lcm = StreamEngine(EngineSettings(model="tiny", height=64, width=64, lcm_lora="tiny", loras=(("ink", "tiny"),)))
    assert float(lcm.schedule.table[C_SKIP, 499]) > 0 and float(plain.schedule.table[C_SKIP].abs().max()) == 0
    assert float(lcm.schedule.table[C_OUT, 0]) == 0  # the consistency boundary condition: at t=0 the sample itself
    params = StreamParams(steps=2)
    out_plain = plain.step([(plain.open_stream(params), image)]).outputs[0]
    out_lcm = lcm.step([(lcm.open_stream(params), image)]).outputs[0]
    out_ink = lcm.step([(lcm.open_stream(params.replace(loras=(LoRAParams("ink", 1.5),))), image)]).outputs[0]

    def diff(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x.int() - y.int()).abs().float().mean())

    assert diff(out_plain, out_lcm) > 5 and diff(out_lcm, out_ink) > 5


def test_parts_without_the_fused_lora_are_refused(tiny_parts: Any) -> None:
    with pytest.raises(ConfigError, match="lcm_lora 'tiny' asked for, but the model given has '' fused"):
        StreamEngine(EngineSettings(model="tiny", height=64, width=64, lcm_lora="tiny"), parts=tiny_parts)


def test_what_cannot_load_is_one_line_naming_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (48, 96)})
    save_file(random_lora(other, 4, seed=0), tmp_path / "sdxl-like.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "lcm.ckpt").write_bytes(b"pickle")
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "te.safetensors")
    save_file({"unet.nowhere.lora_A.weight": torch.zeros(2, 4), "unet.nowhere.lora_B.weight": torch.zeros(4, 2)},
              tmp_path / "elsewhere.safetensors")  # fmt: skip
    cases = {
        str(tmp_path / "sdxl-like.safetensors"): "could not be loaded: RuntimeError",
        str(tmp_path / "junk.safetensors"): "could not be loaded",
        str(tmp_path / "lcm.ckpt"): "only .safetensors",
        str(tmp_path / "te.safetensors"): "no UNet layers",
        str(tmp_path / "elsewhere.safetensors"): "not found in the base model",  # PEFT's own words
        "owner/not-cached-lcm-lora": "HF_HUB_OFFLINE",
        str(tmp_path / "missing.safetensors"): "is not a built-in",
    }
    for source, words in cases.items():
        with pytest.raises(ModelLoadError) as error:
            load_model("tiny", lcm_lora=source)
        message = str(error.value)
        assert message.startswith(f"--lcm-lora {source}") and "\n" not in message and words in message, message


def test_a_video_model_refuses_it() -> None:
    from livediff.engine.video import VideoEngine

    with pytest.raises(ConfigError, match="lcm_lora"):
        VideoEngine(EngineSettings(model="tiny-video", height=64, width=64, lcm_lora="tiny"))


def test_the_cli_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from livediff.cli import build_parser, engine_settings

    args = build_parser().parse_args(
        ["serve", "--model", "./dreamshaper", "--lcm-lora", "latent-consistency/lcm-lora-sdv1-5"]
    )
    assert engine_settings(args).lcm_lora == "latent-consistency/lcm-lora-sdv1-5"
    monkeypatch.setenv("LIVEDIFF_LCM_LORA", "tiny")
    assert engine_settings(build_parser().parse_args(["serve", "--model", "tiny"])).lcm_lora == "tiny"
