"""TAEHV's trained-weights files loaded into the streaming autoencoder (`livediff.models.taehv_weights`).

The files here are written in TAEHV's own naming, from its source (madebyollin/taehv, `taehv.py`:
`TAEHV.encoder` and `TAEHV.decoder` are `nn.Sequential`s, so a layer's parameters are named by its
index), at TAEHV's Wan 2.1 widths, with random values. The reference below runs TAEHV's computation
straight from those tensors with `torch.nn.functional`, as its `apply_model_with_memblocks_parallel`
does: all frames at once, each MemBlock given the frame before's input (zeros before the first).
"""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from livediff.errors import ConfigError, ModelLoadError
from livediff.models.tae import TaeState
from livediff.models.taehv_weights import load_taehv, taehv_source
from livediff.models.video import load_video_model

# TAEHV's Wan 2.1 model (`TAEHV("taew2_1.pth")`: patch size 1, 16 latent channels, encoder time
# downscale (True, True, False), decoder time upscale (False, True, True), space upscale all True),
# layer by layer: (kind, in channels, out channels, stride/scale, bias). "conv" is 3x3 padding 1,
# "mem" a MemBlock (conv.0: 2n->n 3x3, ReLU, conv.2: n->n, ReLU, conv.4: n->n; then ReLU of it plus x).
ENCODER = [
    ("conv", 3, 64, 1, True), ("relu",),
    ("tpool", 64, 2), ("conv", 64, 64, 2, False), ("mem", 64), ("mem", 64), ("mem", 64),
    ("tpool", 64, 2), ("conv", 64, 64, 2, False), ("mem", 64), ("mem", 64), ("mem", 64),
    ("tpool", 64, 1), ("conv", 64, 64, 2, False), ("mem", 64), ("mem", 64), ("mem", 64),
    ("conv", 64, 16, 1, True),
]  # fmt: skip
DECODER = [
    ("clamp",), ("conv", 16, 256, 1, True), ("relu",),
    ("mem", 256), ("mem", 256), ("mem", 256), ("up",), ("tgrow", 256, 1), ("conv", 256, 128, 1, False),
    ("mem", 128), ("mem", 128), ("mem", 128), ("up",), ("tgrow", 128, 2), ("conv", 128, 64, 1, False),
    ("mem", 64), ("mem", 64), ("mem", 64), ("up",), ("tgrow", 64, 2), ("conv", 64, 64, 1, False),
    ("relu",), ("conv", 64, 3, 1, True),
]  # fmt: skip


def _he(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5


def taehv_file_state(seed: int = 0, tgrow_first: int = 1) -> dict[str, torch.Tensor]:
    """A state dict named as TAEHV's `TAEHV` module names its parameters, random values.
    `tgrow_first`: the frames the decoder's first TGrow weight is stored for (TAEHV keeps the last)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for half, layers in (("encoder", ENCODER), ("decoder", DECODER)):
        for i, layer in enumerate(layers):
            kind = layer[0]
            if kind == "conv":
                _, n_in, n_out, _, bias = layer
                state[f"{half}.{i}.weight"] = _he((n_out, n_in, 3, 3), g)
                if bias:
                    state[f"{half}.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
            elif kind == "mem":
                n = layer[1]
                for j, n_in in ((0, 2 * n), (2, n), (4, n)):
                    state[f"{half}.{i}.conv.{j}.weight"] = _he((n, n_in, 3, 3), g) * 0.5
                    state[f"{half}.{i}.conv.{j}.bias"] = torch.randn(n, generator=g) * 0.1
            elif kind == "tpool":
                _, n, stride = layer
                state[f"{half}.{i}.conv.weight"] = _he((n, n * stride, 1, 1), g)
            elif kind == "tgrow":
                _, n, stride = layer
                frames = tgrow_first if i == 7 else stride
                state[f"{half}.{i}.conv.weight"] = _he((n * frames, n, 1, 1), g)
    state["decoder.22.bias"] = torch.full((3,), 0.5) + torch.randn(3, generator=g) * 0.05
    state["decoder.22.weight"] = state["decoder.22.weight"] * 0.05
    return state


def taehv_reference(layers: list[tuple], half: str, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """TAEHV's computation of `layers` on a whole clip x (N, T, C, H, W), from `state` alone."""
    n = x.shape[0]
    flat = x.flatten(0, 1)
    for i, layer in enumerate(layers):
        kind, p = layer[0], f"{half}.{i}."
        if kind == "conv":
            flat = F.conv2d(flat, state[p + "weight"], state.get(p + "bias"), stride=layer[3], padding=1)
        elif kind == "relu":
            flat = F.relu(flat)
        elif kind == "clamp":
            flat = torch.tanh(flat / 3) * 3
        elif kind == "up":
            flat = F.interpolate(flat, scale_factor=2.0, mode="nearest")
        elif kind == "tpool":
            stride = layer[2]
            flat = F.conv2d(flat.reshape(-1, stride * flat.shape[1], *flat.shape[2:]), state[p + "conv.weight"])
        elif kind == "tgrow":
            c = flat.shape[1]
            flat = F.conv2d(flat, state[p + "conv.weight"]).reshape(-1, c, *flat.shape[2:])
        elif kind == "mem":
            clip = flat.unflatten(0, (n, -1))
            past = torch.cat([torch.zeros_like(clip[:, :1]), clip[:, :-1]], dim=1).flatten(0, 1)
            h = torch.cat([flat, past], dim=1)
            h = F.relu(F.conv2d(h, state[p + "conv.0.weight"], state[p + "conv.0.bias"], padding=1))
            h = F.relu(F.conv2d(h, state[p + "conv.2.weight"], state[p + "conv.2.bias"], padding=1))
            h = F.conv2d(h, state[p + "conv.4.weight"], state[p + "conv.4.bias"], padding=1)
            flat = F.relu(h + flat)
    return flat.unflatten(0, (n, -1))


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return taehv_file_state()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_taehv_file_lands_tensor_by_tensor_and_runs_taehvs_computation(
    suffix: str, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / f"taew2_1{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    ae = load_taehv(str(path)).eval()
    ours = list(ae.state_dict().values())
    assert len(ours) == len(state) == 128 and sum(t.numel() for t in ours) == sum(t.numel() for t in state.values())
    for name, tensor in state.items():  # each file tensor is exactly one of ours (random values: no two alike)
        assert sum(t.shape == tensor.shape and torch.equal(t, tensor) for t in ours) == 1, name

    # A stream in chunks of 5 and 4 frames; TAEHV sees the clip preceded by 3 copies of its first frame.
    video = torch.rand((1, 9, 3, 32, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tae = TaeState()
        latents = torch.cat([ae.encode(video[:, :5], [tae]), ae.encode(video[:, 5:], [tae])], dim=1)
        held = torch.cat([video[:, :1].expand(-1, 3, -1, -1, -1), video], dim=1)
        expected = taehv_reference(ENCODER, "encoder", state, held)
        assert latents.shape == expected.shape == (1, 3, 16, 4, 6)
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)

        decoded = torch.cat([ae.decode(latents[:, :2], [tae]), ae.decode(latents[:, 2:], [tae])], dim=1)
        frames = taehv_reference(DECODER, "decoder", state, latents)[:, 3:].clamp(0, 1)  # TAEHV trims 3
    assert decoded.shape == frames.shape == (1, 9, 3, 32, 48)
    assert ((frames > 0) & (frames < 1)).float().mean() > 0.5  # not a clamped-flat picture
    torch.testing.assert_close(decoded, frames, rtol=1e-4, atol=1e-4)


def test_a_tgrow_stored_for_more_frames_keeps_its_last_frames_outputs(tmp_path: Path) -> None:
    state = taehv_file_state(seed=2, tgrow_first=2)
    assert state["decoder.7.conv.weight"].shape == (512, 256, 1, 1)
    torch.save(state, tmp_path / "taehv.pth")
    ae = load_taehv(str(tmp_path / "taehv.pth"))
    assert torch.equal(ae.decoder[7].conv.weight, state["decoder.7.conv.weight"][256:])


def test_a_file_of_another_layout_or_width_is_one_error_naming_it(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    other = dict(state)
    other["encoder.17.extra"] = other.pop("encoder.17.bias")  # one missing, one unexpected
    other.pop("decoder.22.bias")
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError) as info:
        load_taehv(str(tmp_path / "other.pth"))
    message = str(info.value)
    assert str(tmp_path / "other.pth") in message and "--video-autoencoder-weights" in message
    assert "2 missing (decoder.22.module.bias, encoder.17.module.bias)" in message
    assert "1 unexpected (encoder.17.module.extra)" in message and "\n" not in message

    narrow = taehv_file_state(seed=3)  # a narrower encoder (32 wide), as another TAEHV-like file
    narrow["encoder.0.weight"] = narrow["encoder.0.weight"][:32]
    save_file(narrow, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ModelLoadError, match=r"1 of another shape \(encoder\.0\.module\.weight \(32, 3, 3, 3\) "
                                             r"for \(64, 3, 3, 3\)\)"):  # fmt: skip
        load_taehv(str(tmp_path / "narrow.safetensors"))


def test_files_that_are_not_weights_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "noise.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError, match=r"noise\.safetensors could not be read as weights"):
        load_taehv(str(tmp_path / "noise.safetensors"))

    with open(tmp_path / "code.pth", "wb") as out:  # a pickle that calls a global (one that could run code)
        pickle.dump({"encoder.0.weight": datetime.timedelta(days=1)}, out, protocol=2)
    with pytest.raises(ModelLoadError, match=r"code\.pth could not be read as weights \(UnpicklingError"):
        load_taehv(str(tmp_path / "code.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ModelLoadError, match=r"list\.pth: expected a state dict"):
        load_taehv(str(tmp_path / "list.pth"))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_taehv(str(tmp_path / "missing.pth"))
    with pytest.raises(ModelLoadError, match="no such file; as a hub file: madebyollin/taehv:taew2_1.pth"):
        load_taehv("madebyollin/taehv/taew2_1.pth")  # a hub file written with a slash
    with pytest.raises(ModelLoadError, match="not auto, random, an existing file, nor a hub file"):
        load_taehv("not-a-repo")


def test_a_real_checkpoint_takes_taehvs_hub_file_by_default_and_says_how_to_run_without_it() -> None:
    assert taehv_source(True, "auto") is None and taehv_source(False, "random") is None
    assert taehv_source(False, "auto") == "madebyollin/taehv:taew2_1.pth"
    assert taehv_source(True, "x.pth") == "x.pth"
    with pytest.raises(ModelLoadError) as info:  # the tests run offline, with an empty cache
        load_taehv("madebyollin/taehv:taew2_1.pth")
    assert "HF_HUB_OFFLINE" in str(info.value) and "--video-autoencoder-weights random" in str(info.value)


def test_a_built_in_runs_a_named_file_and_wan_vae_refuses_one(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    parts = load_video_model("tiny-video", autoencoder_weights=str(tmp_path / "taew2_1.safetensors"))
    assert parts.autoencoder_name == "tae" and parts.autoencoder_weights == str(tmp_path / "taew2_1.safetensors")
    assert load_video_model("tiny-video").autoencoder_weights == "random"
    assert torch.equal(parts.autoencoder.state_dict()["encoder.0.module.weight"], state["encoder.0.weight"])
    with pytest.raises(ConfigError, match="--video-autoencoder-weights .* --video-autoencoder wan-vae takes none"):
        load_video_model("tiny-video", autoencoder="wan-vae", autoencoder_weights=str(tmp_path / "taew2_1.safetensors"))


def test_the_cli_names_the_flag_and_the_file_in_one_line(tmp_path: Path) -> None:
    """`serve` with a file that is not weights stops at start with one line, no traceback."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    done = subprocess.run(
        [sys.executable, "-m", "livediff.cli", "serve", "--model", "tiny-video", "--port", "0",
         "--video-autoencoder-weights", str(bad)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert len(errors) == 1 and f"--video-autoencoder-weights {bad} could not be read as weights" in errors[0], errors


def test_a_checkpoints_taehv_file_is_checked_before_its_transformer_loads(tmp_path: Path) -> None:
    """A causal Wan folder without a vae/ (its transformer's weights absent: they would load after)."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match=r"--video-autoencoder-weights .*bad\.pth could not be read"):
        load_video_model(str(tmp_path), autoencoder_weights=str(tmp_path / "bad.pth"))
    with pytest.raises(ModelLoadError, match=r"madebyollin/taehv.*HF_HUB_OFFLINE"):  # auto: TAEHV's hub file
        load_video_model(str(tmp_path))
