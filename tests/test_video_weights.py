"""Causal Wan weights in Wan's original layout (`--video-weights`), as StreamDiffusionV2 ships them.

The files here are written in Wan's ORIGINAL key layout from a table of our own (`ORIGINAL_NAMES`),
taken from the module tree of Wan 2.1's model code (github.com/Wan-Video/Wan2.1,
`wan/modules/model.py`: `WanModel`, `WanAttentionBlock`, `WanSelfAttention`, `Head`), which the causal
systems keep (StreamDiffusionV2's `models/wan/causal_model.py` has the same attribute names), and not
by running diffusers' converter backwards: the loader's use of the converter is what is under test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from livediff.errors import ModelLoadError
from livediff.models.video import is_video_model, load_video_model
from livediff.models.wan import TINY_VIDEO, build_transformer
from livediff.models.wan_vae import TINY_WAN_VAE, build_wan_vae
from livediff.models.wan_weights import locate_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent

ORIGINAL_NAMES = {
    # WanModel: patch_embedding = Conv3d(in_dim, dim, patch_size)
    "patch_embedding": "patch_embedding",
    # text_embedding = Sequential(Linear(text_dim, dim), GELU, Linear(dim, dim)): indices 0 and 2
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    # time_embedding = Sequential(Linear(freq_dim, dim), SiLU, Linear(dim, dim)): indices 0 and 2
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    # time_projection = Sequential(SiLU, Linear(dim, 6 * dim)): index 1
    "condition_embedder.time_proj": "time_projection.1",
    # WanAttentionBlock: self_attn = WanSelfAttention (q, k, v, o Linear; norm_q, norm_k WanRMSNorm)
    "blocks.{n}.attn1.to_q": "blocks.{n}.self_attn.q",
    "blocks.{n}.attn1.to_k": "blocks.{n}.self_attn.k",
    "blocks.{n}.attn1.to_v": "blocks.{n}.self_attn.v",
    "blocks.{n}.attn1.to_out.0": "blocks.{n}.self_attn.o",
    "blocks.{n}.attn1.norm_q": "blocks.{n}.self_attn.norm_q",
    "blocks.{n}.attn1.norm_k": "blocks.{n}.self_attn.norm_k",
    # cross_attn = WanT2VCrossAttention (a WanSelfAttention: the same names)
    "blocks.{n}.attn2.to_q": "blocks.{n}.cross_attn.q",
    "blocks.{n}.attn2.to_k": "blocks.{n}.cross_attn.k",
    "blocks.{n}.attn2.to_v": "blocks.{n}.cross_attn.v",
    "blocks.{n}.attn2.to_out.0": "blocks.{n}.cross_attn.o",
    "blocks.{n}.attn2.norm_q": "blocks.{n}.cross_attn.norm_q",
    "blocks.{n}.attn2.norm_k": "blocks.{n}.cross_attn.norm_k",
    # norm3 = WanLayerNorm(elementwise_affine=True) before the cross-attention (cross_attn_norm);
    # norm1 and norm2 (before self-attention and FFN) have no parameters
    "blocks.{n}.norm2": "blocks.{n}.norm3",
    # ffn = Sequential(Linear(dim, ffn_dim), GELU, Linear(ffn_dim, dim)): indices 0 and 2
    "blocks.{n}.ffn.net.0.proj": "blocks.{n}.ffn.0",
    "blocks.{n}.ffn.net.2": "blocks.{n}.ffn.2",
    # modulation = Parameter (1, 6, dim)
    "blocks.{n}.scale_shift_table": "blocks.{n}.modulation",
    # Head: head = Linear(dim, out_dim * prod(patch)); modulation = Parameter (1, 2, dim)
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
"""diffusers' `WanTransformer3DModel` module -> Wan 2.1's original module (`{n}`: the block)."""


def original_name(name: str) -> str:
    """Wan's original name of a diffusers state-dict key, from `ORIGINAL_NAMES` alone."""
    for layers in (False, True):
        for ours, theirs in ORIGINAL_NAMES.items():
            if ("{n}" in ours) != layers:
                continue
            for n in range(TINY_VIDEO["num_layers"]) if layers else (None,):
                module = ours.format(n=n)
                if name.startswith(module + ".") and name.count(".") == module.count(".") + 1:
                    return theirs.format(n=n) + name[len(module) :]
                if name == module:  # a bare parameter (scale_shift_table)
                    return theirs.format(n=n)
    raise AssertionError(f"ORIGINAL_NAMES has no entry for {name}")


def original_layout(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    return {original_name(k): v.detach().clone() for k, v in model.state_dict().items()}


def save_as_streamdiffusionv2(state: dict[str, torch.Tensor], path: Path) -> Path:
    """`{"generator_ema": {"model.blocks.0.self_attn.q.weight": ...}}`: the trainer's wrapper holds
    the transformer as `model`, its EMA copy saved under `generator_ema`."""
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state.items()}}, path)
    return path


def source_model() -> WanTransformer3DModel:
    return build_transformer(TINY_VIDEO, seed=7).eval()


def assert_same_state(loaded: WanTransformer3DModel, source: WanTransformer3DModel) -> None:
    mine, theirs = loaded.state_dict(), source.state_dict()
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def assert_same_forward(loaded: WanTransformer3DModel, source: WanTransformer3DModel) -> None:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn((1, 16, 2, 8, 8), generator=generator)
    text = torch.randn((1, 16, TINY_VIDEO["text_dim"]), generator=generator)
    with torch.no_grad():
        expected = source(latents, torch.tensor([500.0]), text, return_dict=False)[0]
        got = loaded(latents, torch.tensor([500.0]), text, return_dict=False)[0]
    assert torch.equal(got, expected)


def test_the_table_names_every_tensor_and_the_original_names_are_wans() -> None:
    """Every tensor of the tiny model has an original name, all different, and they are the names
    StreamDiffusionV2's files carry (spot-checked against the module tree of Wan's model code)."""
    state = original_layout(source_model())
    assert len(state) == len(source_model().state_dict())
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.norm_k.weight", "blocks.0.ffn.0.weight",
                 "blocks.1.modulation", "blocks.0.norm3.bias", "head.head.weight", "head.modulation",
                 "text_embedding.0.weight", "time_projection.1.bias", "patch_embedding.weight"):  # fmt: skip
        assert name in state, name


def test_streamdiffusionv2_nesting_loads_exactly(tmp_path: Path) -> None:
    """A `generator_ema` pickle with the wrapper's `model.` prefix: the transformer's state equals the
    source's tensor for tensor, and so does a forward pass."""
    source = source_model()
    path = save_as_streamdiffusionv2(original_layout(source), tmp_path / "model.pt")
    assert is_video_model("tiny-video", str(path)) and is_video_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(path))
    parts = load_video_model("tiny-video", weights=str(path))
    assert_same_state(parts.transformer.model, source)
    assert_same_forward(parts.transformer.model, source)
    assert parts.revision.startswith("builtin-v1+weights-")


@pytest.mark.parametrize("layout", ["causvid-generator", "ema-over-generator", "fsdp-ema", "flat-safetensors"])
def test_other_nestings_load_exactly(tmp_path: Path, layout: str) -> None:
    """CausVid's `{"generator": {"model.*"}}`; Self-Forcing's file with both `generator` and
    `generator_ema` (the EMA one is taken) and FSDP's `_fsdp_wrapped_module.` segments in it; a flat
    `.safetensors` of the original names."""
    source = source_model()
    state = original_layout(source)
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / ("model.safetensors" if layout == "flat-safetensors" else "model.pt")
    if layout == "causvid-generator":
        torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, path)
    elif layout == "ema-over-generator":
        torch.save({"generator": {f"model.{k}": v for k, v in other.items()},
                    "generator_ema": {f"model.{k}": v for k, v in state.items()}, "step": 600}, path)  # fmt: skip
    elif layout == "fsdp-ema":
        # FSDP wraps the transformer and each of its blocks: model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.*
        wrapped = {"model._fsdp_wrapped_module." + re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module.", k): v
                   for k, v in state.items()}  # fmt: skip
        torch.save({"generator_ema": wrapped}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    parts = load_video_model("tiny-video", weights=str(path))
    assert_same_state(parts.transformer.model, source)


def test_bfloat16_weights_are_cast_to_the_runs_dtype(tmp_path: Path) -> None:
    source = source_model()
    state = {k: v.to(torch.bfloat16) for k, v in original_layout(source).items()}
    path = save_as_streamdiffusionv2(state, tmp_path / "model.pt")
    parts = load_video_model("tiny-video", weights=str(path))
    loaded = parts.transformer.model.state_dict()
    assert all(v.dtype == torch.float32 for v in loaded.values())
    rounded = source.blocks[0].attn1.to_q.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded["blocks.0.attn1.to_q.weight"], rounded)


def test_a_file_missing_a_block_is_one_error_naming_it(tmp_path: Path) -> None:
    state = {k: v for k, v in original_layout(source_model()).items() if not k.startswith("blocks.1.")}
    path = save_as_streamdiffusionv2(state, tmp_path / "model.pt")
    with pytest.raises(ModelLoadError) as error:
        load_video_model("tiny-video", weights=str(path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--video-weights {path} is not a causal Wan transformer")
    assert "tiny-video (2 layers, width 64)" in message and "27 missing (blocks.1." in message
    assert "unexpected" not in message and "another shape" not in message


def test_a_file_of_another_shape_is_one_error_naming_the_shapes(tmp_path: Path) -> None:
    """A wider, deeper model's file (as a 14B file on a 1.3B base): unexpected blocks, other shapes."""
    bigger = build_transformer(dict(TINY_VIDEO, num_layers=3, attention_head_dim=48))
    path = save_as_streamdiffusionv2(original_layout_of(bigger), tmp_path / "model.pt")
    with pytest.raises(ModelLoadError) as error:
        load_video_model("tiny-video", weights=str(path))
    message = str(error.value)
    assert "\n" not in message and "unexpected (blocks.2." in message
    assert "of another shape (" in message and "(96, 96) for (64, 64)" in message and "missing" not in message


def original_layout_of(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    """`original_layout` for a model with more blocks than the table's loop covers."""
    names = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":  # map block n through block 0's entry
            zeroed = ".".join(["blocks", "0", *parts[2:]])
            names[original_name(zeroed).replace("blocks.0.", f"blocks.{parts[1]}.", 1)] = value
        else:
            names[original_name(key)] = value
    return names


def test_files_that_are_not_wan_weights_are_one_error(tmp_path: Path) -> None:
    unet = tmp_path / "unet.pt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}}, unet)
    with pytest.raises(ModelLoadError, match=r"missing \(.*unexpected \(input_blocks\.0\.0\.weight\)"):
        load_video_model("tiny-video", weights=str(unet))
    empty = tmp_path / "empty.pt"
    torch.save({"step": 3, "optimizer": {}}, empty)
    with pytest.raises(ModelLoadError, match=r"holds no tensors \(looked under generator_ema, generator, state_dict"):
        load_video_model("tiny-video", weights=str(empty))
    code = tmp_path / "code.pt"
    torch.save({"generator_ema": {"x": torch.zeros(1)}, "config": object()}, code)  # not plain data
    with pytest.raises(ModelLoadError, match=r"could not be read: UnpicklingError"):
        load_video_model("tiny-video", weights=str(code))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"--video-weights .*notes\.txt: expected a \.pt, .* file"):
        locate_weights(str(text))
    with pytest.raises(ModelLoadError, match=r"--video-weights .*missing\.pt: no such file"):
        locate_weights(str(tmp_path / "missing.pt"))


def test_a_hub_file_is_fetched_alone_and_said_when_it_cannot_be(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as error:
        locate_weights("jerryfeng/StreamDiffusionV2:wan_causal_dmd_v2v/model.pt")
    message = str(error.value)
    assert message.startswith("--video-weights jerryfeng/StreamDiffusionV2:wan_causal_dmd_v2v/model.pt: ")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    assert "`hf download jerryfeng/StreamDiffusionV2 wan_causal_dmd_v2v/model.pt`" in message  # that file alone
    with pytest.raises(ModelLoadError, match="as a hub file: jerryfeng/StreamDiffusionV2:wan_causal_dmd_v2v/model.pt"):
        locate_weights("jerryfeng/StreamDiffusionV2/wan_causal_dmd_v2v/model.pt")  # written with a slash


def test_a_hub_file_in_the_cache_loads_and_one_not_in_it_says_how_to_fetch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`owner/name:path/in/repo.pt` read from the Hugging Face cache (laid out as the hub client keeps
    it: a ref naming a commit, that commit's snapshot folder), offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--causal-wan"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    inside = repo / "snapshots" / commit / "wan_causal_dmd_v2v"
    inside.mkdir(parents=True)
    source = source_model()
    save_as_streamdiffusionv2(original_layout(source), inside / "model.pt")
    parts = load_video_model("tiny-video", weights="someone/causal-wan:wan_causal_dmd_v2v/model.pt")
    assert_same_state(parts.transformer.model, source)
    with pytest.raises(ModelLoadError) as error:
        locate_weights("someone/causal-wan:wan_causal_dmd_v2v_14b/model.pt")
    message = str(error.value)
    assert message.startswith("--video-weights someone/causal-wan:wan_causal_dmd_v2v_14b/model.pt: ")
    assert "`hf download someone/causal-wan wan_causal_dmd_v2v_14b/model.pt`" in message and "\n" not in message


def test_weights_given_as_the_model_say_to_use_video_weights(tmp_path: Path) -> None:
    from livediff.models.single_file import checkpoint_family

    path = tmp_path / "self_forcing_dmd.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in original_layout(source_model()).items()}, str(path))
    expected = rf"holds Wan transformer weights: give them as --video-weights {re.escape(str(path))} with a Wan 2\.1"
    with pytest.raises(ModelLoadError, match=expected):
        checkpoint_family(path)
    pickle = tmp_path / "model.pt"
    save_as_streamdiffusionv2(original_layout(source_model()), pickle)
    with pytest.raises(ModelLoadError, match=r"such as StreamDiffusionV2's model\.pt, go in --video-weights"):
        checkpoint_family(pickle)


def tiny_base_folder(root: Path) -> Path:
    """A diffusers-layout Wan 2.1 T2V folder at the tiny configuration: `transformer/config.json`
    only (the weights come from the file), a small UMT5 text encoder of the transformer's text
    width, a word-level fast tokenizer, and a few-channel Wan VAE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    build_transformer(TINY_VIDEO).save_config(root / "transformer")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "snow", "city", "at", "night"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(3)
    encoder_config = UMT5Config(vocab_size=len(words), d_model=TINY_VIDEO["text_dim"], d_kv=16, d_ff=64,
                                num_layers=1, num_heads=2, relative_attention_num_buckets=8)  # fmt: skip
    UMT5EncoderModel(encoder_config).save_pretrained(root / "text_encoder")
    build_wan_vae(TINY_WAN_VAE).save_pretrained(root / "vae")
    return root


def test_a_base_folder_gives_config_text_encoder_and_vae(tmp_path: Path) -> None:
    """`--model FOLDER --video-weights FILE`: the transformer is the file's (exactly), built from the
    folder's `transformer/config.json` (which has no weights); the folder's UMT5 encodes prompts and
    its VAE is the autoencoder."""
    source = source_model()
    path = save_as_streamdiffusionv2(original_layout(source), tmp_path / "model.pt")
    base = tiny_base_folder(tmp_path / "base")
    assert not is_video_model(str(tmp_path / "nothing")) and is_video_model(str(base))
    parts = load_video_model(str(base), weights=str(path))
    assert_same_state(parts.transformer.model, source)
    assert_same_forward(parts.transformer.model, source)
    assert parts.autoencoder_name == "wan-vae" and "+weights-" in parts.revision
    states = parts.encode_prompt("a red fox in snow")
    assert states.shape == (1, 512, TINY_VIDEO["text_dim"])
    assert states[0, :5].abs().sum(-1).min() > 0 and not states[0, 5:].any()  # 5 words, then zeros
    assert not torch.equal(states, parts.encode_prompt("a city at night"))


def test_a_base_of_another_shape_names_the_base(tmp_path: Path) -> None:
    path = save_as_streamdiffusionv2(original_layout(source_model()), tmp_path / "model.pt")
    base = tiny_base_folder(tmp_path / "base")
    config_path = base / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_layers": 3}))
    expected = rf"--video-weights {re.escape(str(path))} is not a causal Wan transformer of {re.escape(str(base))} "
    with pytest.raises(ModelLoadError, match=expected + r"\(3 layers, width 64\).*: 27 missing \(blocks\.2\."):
        load_video_model(str(base), weights=str(path))
    needs_a_base = r"--video-weights needs --model set to a Wan 2\.1 T2V base.*'tiny' is neither"
    with pytest.raises(ModelLoadError, match=needs_a_base):
        load_video_model("tiny", weights=str(path))  # an image model


def test_the_cli_says_a_bad_weights_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    torch.save({"generator_ema": {"model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)}}, bad)
    process = subprocess.run(
        [sys.executable, "-m", "livediff.cli", "serve", "--model", "tiny-video", "--video-weights", str(bad),
         "--size", "64", "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert process.returncode != 0 and "Traceback" not in process.stderr, process.stderr
    errors = [line for line in process.stderr.splitlines() if "--video-weights" in line]
    assert len(errors) == 1 and errors[0].startswith(f"livediff: error: --video-weights {bad} is not a causal Wan")
    assert "of another shape (blocks.0.attn1.to_q.weight (2, 2) for (64, 64))" in errors[0], errors[0]


@pytest.mark.parametrize("stream_batch", [True, False])
def test_the_engine_conditions_the_transformer_on_1000_sigma(stream_batch: bool) -> None:
    """Causal Wan weights are trained at timestep t = 1000 sigma of the noise their input carries
    (Wan's flow-matching scheduler; StreamDiffusionV2's and Self-Forcing's samplers look sigma up
    from t so): the engine hands the transformer that, not the unshifted schedule value."""
    from livediff.config import EngineSettings, StreamParams, VideoSettings
    from livediff.engine.video import VideoEngine

    video = VideoSettings(stream_batch=stream_batch)
    engine = VideoEngine(
        EngineSettings(model="tiny-video", height=64, width=64, video=video), load_video_model("tiny-video")
    )
    seen: list[float] = []
    forward = engine.model.forward_chunk

    def spy(x: torch.Tensor, t: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.extend(float(v) for v in t)
        return forward(x, t, *args, **kwargs)

    engine.model.forward_chunk = spy  # type: ignore[method-assign]
    params = StreamParams(steps=2, strength=0.8)
    stream = engine.open_stream(params)
    generator = torch.Generator().manual_seed(0)
    for frames in (5, 4, 4):
        engine.step([(stream, [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=generator)
                               for _ in range(frames)])])  # fmt: skip
    expected = [pytest.approx(1000 * engine.sigma(t), abs=1e-3) for t in params.timesteps]
    assert params.timesteps == (799, 399) and all(1000 * engine.sigma(t) > t for t in params.timesteps)
    assert [t for t in seen if t > 0][:2] == expected  # the first chunk's two steps, in order
    allowed = [0.0, *(1000 * engine.sigma(t) for t in params.timesteps)]
    assert all(any(abs(v - a) < 1e-3 for a in allowed) for v in seen)  # nothing else, context passes at 0
