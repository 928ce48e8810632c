"""The causal Wan transformer, its rotary positions and the streaming autoencoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from livediff.errors import ModelLoadError
from livediff.models.tae import TINY_SHAPE, TaeState, build_autoencoder
from livediff.models.video import is_video_model, load_video_model
from livediff.models.wan import TINY_VIDEO, WAN_1_3B, CausalWan, Row, build_transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_chunk_with_no_cache_is_diffusers_wan_forward() -> None:
    """With an empty cache, positions from 0 and the prompt's K/V computed once, `forward_chunk` is
    exactly diffusers' `WanTransformer3DModel.forward`: the same weights, layout and arithmetic."""
    model = build_transformer(TINY_VIDEO).eval()
    causal = CausalWan(model)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 16, 3, 8, 8), generator=generator)
    text = torch.randn((2, 16, 64), generator=generator)
    timesteps = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        expected = model(latents, timesteps, text, return_dict=False)[0]
        rows = [Row(causal.cross_kv(text[b : b + 1]), (), (), torch.arange(3)) for b in range(2)]
        flow, kept = causal.forward_chunk(latents, timesteps, rows, keep=True)
    assert torch.equal(flow, expected)
    assert len(kept) == TINY_VIDEO["num_layers"] and kept[0][0].shape == (2, 3 * 16, 2, 32)


def test_rotary_frequencies_are_wans_at_any_position() -> None:
    model = build_transformer(TINY_VIDEO)
    causal = CausalWan(model)
    table = WanRotaryPosEmbed(32, (1, 2, 2), 1024)
    cos, sin = table(torch.zeros((1, 16, 6, 8, 8)))  # 6 frames of 4x4 tokens
    mine_cos, mine_sin = causal.rope.frames(torch.arange(6), 4, 4)
    assert torch.allclose(mine_cos, cos[0].float(), atol=1e-6) and torch.allclose(mine_sin, sin[0].float(), atol=1e-6)
    # a shift by d composes with position p into position p + d
    far_cos, far_sin = causal.rope.frames(torch.tensor([5000]), 1, 1)
    near_cos, near_sin = causal.rope.frames(torch.tensor([7]), 1, 1)
    from livediff.models.wan import rotate

    key = torch.randn((1, 1, 32))
    shift_cos, shift_sin = causal.rope.shift(7 - 5000, torch.device("cpu"))
    moved = rotate(rotate(key, far_cos, far_sin), shift_cos, shift_sin)
    assert torch.allclose(moved, rotate(key, near_cos, near_sin), atol=1e-4)


def test_the_13b_configuration_is_wan_2_1_13b() -> None:
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.42e9, rel=0.02)
    assert (model.config.num_layers, model.config.num_attention_heads, model.config.attention_head_dim) == (30, 12, 128)
    assert (model.config.ffn_dim, model.config.text_dim, tuple(model.config.patch_size)) == (8960, 4096, (1, 2, 2))


def test_streaming_autoencoder_chunk_by_chunk_equals_the_whole_video() -> None:
    """Memories carried in `TaeState` make chunks of 5, 4, 4 frames encode and decode as 13 at once."""
    ae = build_autoencoder(TINY_SHAPE).eval()
    video = torch.rand((1, 13, 3, 32, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = ae.encode(video, [TaeState()])
        state = TaeState()
        parts = [ae.encode(video[:, a:b], [state]) for a, b in ((0, 5), (5, 9), (9, 13))]
        assert whole.shape == (1, 4, 16, 4, 4)
        assert [p.shape[1] for p in parts] == [2, 1, 1]
        assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)
        decoded_whole = ae.decode(whole, [TaeState()])
        state = TaeState()
        decoded = [ae.decode(whole[:, a:b], [state]) for a, b in ((0, 2), (2, 3), (3, 4))]
    assert [d.shape[1] for d in decoded] == [5, 4, 4] and decoded_whole.shape == (1, 13, 3, 32, 32)
    assert torch.allclose(torch.cat(decoded, dim=1), decoded_whole, atol=1e-5)


def test_the_builtins_are_video_models_and_sd_ids_are_not() -> None:
    assert is_video_model("tiny-video") and is_video_model("wan-1.3b-random")
    assert not is_video_model("tiny") and not is_video_model("stabilityai/sd-turbo")


def test_a_folder_with_another_transformer_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "transformer" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelLoadError, match=r"config\.json: expected _class_name WanTransformer3DModel"):
        load_video_model(str(tmp_path))
    (tmp_path / "transformer" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="expected a WanTransformer3DModel config"):
        load_video_model(str(tmp_path))


def test_an_unknown_name_says_how_to_run_without_a_download() -> None:
    with pytest.raises(ModelLoadError, match="--model tiny-video"):
        load_video_model("no-such-model.bin")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_video_model("nobody/no-causal-wan")


def test_auto_dtype_is_bfloat16_on_cuda_and_on_cpus_with_native_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livediff.engine import device

    native, emulated = tmp_path / "native", tmp_path / "emulated"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert device.cpu_has_native_bf16(str(native)) and not device.cpu_has_native_bf16(str(emulated))
    assert not device.cpu_has_native_bf16(str(tmp_path / "missing"))

    cpu = torch.device("cpu")
    assert device.resolve_video_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert device.resolve_video_dtype("float32", cpu) == torch.float32
    reads = device.cpu_has_native_bf16
    for path, expected in ((native, torch.bfloat16), (emulated, torch.float32)):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda path=path: reads(str(path)))
        assert device.resolve_video_dtype("auto", cpu) == expected
