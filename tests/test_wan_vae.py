"""Wan 2.1's VAE (diffusers' `AutoencoderKLWan`, a few channels wide at random weights) in streaming
form: chunk by chunk equals the whole clip, streams batched together never mix their caches, and the
engine runs with it."""

from __future__ import annotations

import pytest
import torch

from livediff.config import EngineSettings, StreamParams
from livediff.engine.video import VideoEngine
from livediff.errors import ConfigError
from livediff.models.video import load_video_model
from livediff.models.wan_vae import TINY_WAN_VAE, WanStreamingVae, WanVaeState, build_wan_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32


@pytest.fixture(scope="module")
def vae() -> WanStreamingVae:
    return WanStreamingVae(build_wan_vae(TINY_WAN_VAE).eval().requires_grad_(False))


def clip(frames: int, seed: int) -> torch.Tensor:
    return torch.rand((1, frames, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def chunks_of(video: torch.Tensor) -> list[torch.Tensor]:
    """5 frames, then 4 each (a live stream's chunks)."""
    return [video[:, :5]] + list(video[:, 5:].split(4, dim=1))


@torch.inference_mode()
def test_chunk_by_chunk_equals_the_whole_clip(vae: WanStreamingVae) -> None:
    video = clip(17, seed=1)
    model = vae.vae
    mean, std = vae._scale(video)
    whole = model.encode(video.transpose(1, 2) * 2 - 1).latent_dist.mode()  # diffusers' own clip loop
    whole = ((whole - mean) / std).transpose(1, 2)  # (1, 5, 16, 4, 4)
    state = vae.new_state()
    chunked = torch.cat([vae.encode(chunk, [state]) for chunk in chunks_of(video)], dim=1)
    assert chunked.shape == whole.shape == (1, 5, 16, SIZE // 8, SIZE // 8)
    assert torch.allclose(chunked, whole, atol=1e-5), (chunked - whole).abs().max()

    decoded = model.decode(whole.transpose(1, 2) * std + mean).sample.clamp(-1, 1).add(1).div(2).transpose(1, 2)
    state = vae.new_state()
    pieces = [vae.decode(whole[:, :2], [state])] + [vae.decode(whole[:, i : i + 1], [state]) for i in range(2, 5)]
    assert [p.shape[1] for p in pieces] == [5, 4, 4, 4]  # a chunk's frames come back with it
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == decoded.shape == video.shape
    assert torch.allclose(streamed, decoded, atol=1e-5), (streamed - decoded).abs().max()


@torch.inference_mode()
def test_two_streams_in_one_call_equal_each_alone(vae: WanStreamingVae) -> None:
    a, b = clip(13, seed=2), clip(13, seed=3)
    solo = []
    for video in (a, b):
        state = vae.new_state()
        latents = [vae.encode(chunk, [state]) for chunk in chunks_of(video)]
        solo.append((torch.cat(latents, dim=1), torch.cat([vae.decode(z, [state]) for z in latents], dim=1)))
    states = [vae.new_state(), vae.new_state()]
    latents = [vae.encode(torch.cat([x, y]), states) for x, y in zip(chunks_of(a), chunks_of(b))]
    decoded = [vae.decode(z, states) for z in latents]
    for row in (0, 1):
        z = torch.cat([chunk[row] for chunk in latents])
        frames = torch.cat([chunk[row] for chunk in decoded])
        assert torch.allclose(z, solo[row][0][0], atol=1e-5)
        assert torch.allclose(frames, solo[row][1][0], atol=1e-5)
    # a stream's first latent frame (1 frame out) beside another's later one (4 frames) cannot share a call
    with pytest.raises(ValueError, match="first latent frames"):
        vae.decode(torch.cat([solo[0][0][:, :1], solo[1][0][:, :1]]), [vae.new_state(), states[1]])


def test_it_serves_the_engine_as_its_autoencoder_and_a_reset_empties_its_caches() -> None:
    parts = load_video_model("tiny-video", autoencoder="wan-vae")
    assert parts.autoencoder_name == "wan-vae"
    engine = VideoEngine(EngineSettings(model="tiny-video", height=64, width=64), parts)
    stream = engine.open_stream(StreamParams(steps=2))
    assert isinstance(stream.tae, WanVaeState)
    frames = [torch.full((64, 64, 3), 40 * i, dtype=torch.uint8) for i in range(5)]
    outs = [engine.step([(stream, frames[: stream.frames_needed])]).outputs[0] for _ in range(3)]
    assert [len(o) for o in outs] == [0, 5, 4] and outs[1][0].shape == (64, 64, 3)
    engine.reset(stream)
    assert stream.tae.enc_cache == [] and stream.tae.dec_cache == [] and stream.frames_needed == 5


def test_an_unknown_autoencoder_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="video_autoencoder"):
        load_video_model("tiny-video", autoencoder="taesd")


def test_a_checkpoint_whose_vae_is_not_wans_is_one_clear_error_before_any_weights_load(tmp_path) -> None:
    import json

    from livediff.errors import ModelLoadError

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelLoadError, match=r"vae/config\.json: expected _class_name AutoencoderKLWan"):
        load_video_model(str(tmp_path))  # auto: a vae/ is there, so it is taken
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"vae/config\.json: expected an AutoencoderKLWan config"):
        load_video_model(str(tmp_path), autoencoder="wan-vae")
