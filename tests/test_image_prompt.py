"""Image prompts (IP-Adapter) per stream: loading (the built-in, files, errors), each row of one UNet
call against diffusers' own IP-Adapter UNet at that row's scale, mixed batches against solo runs,
live changes on the next frame, the frame capture, and the `cuda-graph` bookkeeping (a scale or
image change replays, never records)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file

from livediff.backends.cuda_graph import CudaGraphBackend
from livediff.backends.image_prompt import IP_EMBEDS, IP_ROWS, IP_SCALES, ImagePrompt
from livediff.backends.unet_extras import ExtrasUNet, UNetExtras, unet_extras
from livediff.config import EngineSettings, ImagePromptParams, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import ConfigError, ModelLoadError
from livediff.models.ip_adapter import flat_state, load_ip_adapter, tiny_image_encoder, tiny_state
from livediff.synthetic import SyntheticCamera
from tests.test_cuda_graph import STAGES, HostReplay

SIZE = 64


@pytest.fixture(scope="module")
def frames() -> list[torch.Tensor]:
    return [torch.from_numpy(f) for f in SyntheticCamera(SIZE, SIZE, seed=3).frames(6)]


@pytest.fixture(scope="module")
def pictures() -> list[torch.Tensor]:
    """Reference images of other sizes than the frames (the encoder resizes them)."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator) for h, w in ((80, 50), (33, 97))]


@pytest.fixture(scope="module")
def engine(tiny_parts: Any) -> StreamEngine:
    """An engine with the built-in adapter, on its own copy of the model (its processors go on the UNet)."""
    settings = EngineSettings(model="tiny", height=SIZE, width=SIZE, ip_adapter="tiny")
    return StreamEngine(settings, parts=copy.deepcopy(tiny_parts))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Frames of one stream from steps of different batch sizes: equal up to the uint8 rounding of
    batched float sums (the LoRA tests' bound)."""
    return int((a.int() - b.int()).abs().max()) <= 2


@pytest.fixture(scope="module")
def adapter_file(tiny_parts: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in adapter written as h94/IP-Adapter lays out its `models/`: a `.safetensors` file
    in the original keys, the CLIP vision encoder in `image_encoder/` beside it."""
    folder = tmp_path_factory.mktemp("ip")
    encoder, _ = tiny_image_encoder(seed=5)
    encoder.save_pretrained(folder / "image_encoder")
    save_file(flat_state(tiny_state(tiny_parts.unet, encoder.config.projection_dim, seed=2)), folder / "ip.safetensors")
    return folder / "ip.safetensors"


def _session(engine: StreamEngine, params: StreamParams, upload: torch.Tensor | None = None) -> Any:
    stream = engine.open_stream(params.replace(image_prompt=None))
    if upload is not None:
        engine.set_uploaded_image(stream, upload)
    engine.update(stream, params)
    return stream


def test_a_file_loads_through_diffusers_conversion_and_the_unet_stays_as_it_was(
    tiny_parts: Any, adapter_file: Path
) -> None:
    before = {k: v.clone() for k, v in tiny_parts.unet.state_dict().items()}
    processors = {k: type(v) for k, v in tiny_parts.unet.attn_processors.items()}
    adapter = load_ip_adapter(str(adapter_file), tiny_parts.unet)
    state = tiny_state(tiny_parts.unet, adapter.encoder.config.projection_dim, seed=2)
    assert adapter.tokens == 4 and adapter.cross_dim == tiny_parts.unet.config.cross_attention_dim
    first = sorted(adapter.layers)[0]
    assert len(adapter.layers) == len(state["ip_adapter"]) // 2 and adapter.layers[first][0].shape[1] == 32
    assert torch.equal(adapter.projection.image_embeds.weight, state["image_proj"]["proj.weight"])
    after = tiny_parts.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: type(v) for k, v in tiny_parts.unet.attn_processors.items()} == processors


def test_bad_adapters_are_one_line_naming_the_source(tiny_parts: Any, adapter_file: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "ip.bin"
    pickled.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"only \.safetensors files are read"):
        load_ip_adapter(str(pickled), tiny_parts.unet)
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(adapter_file.read_bytes())
    with pytest.raises(ModelLoadError, match=r"no image_encoder folder beside it"):
        load_ip_adapter(str(alone), tiny_parts.unet)
    with pytest.raises(ModelLoadError, match=r"is not a built-in \(tiny\), a \.safetensors file, nor a hub id"):
        load_ip_adapter("no-such-thing", tiny_parts.unet)
    plus = tmp_path / "plus"
    (plus / "image_encoder").mkdir(parents=True)
    save_file({"image_proj.latents": torch.zeros(1, 16, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(64, 32)},
              plus / "ip.safetensors")  # fmt: skip
    (plus / "image_encoder" / "config.json").write_text(
        (adapter_file.parent / "image_encoder" / "config.json").read_text()
    )
    with pytest.raises(ModelLoadError, match=r"could not be loaded|only the base IP-Adapter"):
        load_ip_adapter(str(plus / "ip.safetensors"), tiny_parts.unet)
    other = copy.deepcopy(tiny_state(tiny_parts.unet, 32, seed=2))  # image tokens 48 wide: another model family
    other["image_proj"] = {"proj.weight": torch.zeros(4 * 48, 32), "proj.bias": torch.zeros(4 * 48),
                           "norm.weight": torch.ones(48), "norm.bias": torch.zeros(48)}  # fmt: skip
    family = tmp_path / "family"
    family.mkdir()
    (family / "image_encoder").symlink_to(adapter_file.parent / "image_encoder")
    save_file(flat_state(other), family / "ip.safetensors")
    with pytest.raises(ModelLoadError, match=r"48 wide, this model's text embeddings 32 \(an IP-Adapter for another"):
        load_ip_adapter(str(family / "ip.safetensors"), tiny_parts.unet)


def test_each_row_matches_diffusers_ip_adapter_unet_at_its_own_scale(
    tiny_parts: Any, pictures: list[torch.Tensor]
) -> None:
    """One call, rows at scales 0, 1 and 0.6 with their own images, against diffusers' UNet with
    the same adapter loaded (`_load_ip_adapter_weights`, one scale per call) run row by row."""
    unet = copy.deepcopy(tiny_parts.unet)
    unet.set_attn_processor(AttnProcessor2_0())  # as diffusers loads it: other tests' engines leave theirs
    adapter = load_ip_adapter("tiny", unet)
    reference = copy.deepcopy(unet)
    reference._load_ip_adapter_weights([tiny_state(unet, 32, seed=1)], low_cpu_mem_usage=False)
    model = ExtrasUNet(unet, UNetExtras((ImagePrompt(adapter),)))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([999.0, 500.0, 10.0])
    embeds = torch.randn(3, 77, 32, generator=generator)
    images = [pictures[0], pictures[1], pictures[0]]
    pixels = adapter.image_processor([i.numpy() for i in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        clip = adapter.encoder(pixel_values=pixels).image_embeds
        scales = [0.0, 1.0, 0.6]
        mixed, _ = model.call(latents, timesteps, embeds, {IP_EMBEDS: adapter.projection(clip),
                                                           IP_SCALES: torch.tensor(scales)})  # fmt: skip
        plain = unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        for row, scale in enumerate(scales):
            reference.set_ip_adapter_scale(scale) if hasattr(reference, "set_ip_adapter_scale") else None
            for processor in reference.attn_processors.values():
                if hasattr(processor, "scale"):
                    processor.scale = [scale]
            one = slice(row, row + 1)
            want = reference(latents[one], timesteps[one], encoder_hidden_states=embeds[one],
                             added_cond_kwargs={"image_embeds": [clip[one, None]]}, return_dict=False)[0]  # fmt: skip
            assert (want[0] - mixed[row]).abs().max() < 1e-4, row
        assert torch.equal(mixed[0], plain[0])  # scale 0: exactly the plain row
        assert (mixed[1] - plain[1]).abs().mean() > 1e-2
        only, _ = model.call(latents, timesteps, embeds, {IP_EMBEDS: adapter.projection(clip),
                                                          IP_SCALES: torch.tensor(scales),
                                                          IP_ROWS: torch.tensor([1, 2])})  # fmt: skip
    assert torch.equal(only[0], plain[0])  # a row left out of ip_rows runs the plain arithmetic
    assert (only[1:] - mixed[1:]).abs().max() < 1e-5


def test_mixed_batch_rows_equal_their_solo_runs(engine: StreamEngine, frames: list[torch.Tensor],
                                                pictures: list[torch.Tensor]) -> None:  # fmt: skip
    """No image prompt, image A at 1, image B at 0.5, image A at 0 and with guidance: one step each
    alone, then all four in one step; the scale-0 row is the plain one exactly."""
    upload = ImagePromptParams("upload", 1.0)
    cases = [
        (StreamParams(seed=1), None),
        (StreamParams(seed=2, image_prompt=upload), pictures[0]),
        (StreamParams(seed=3, image_prompt=upload.__class__("upload", 0.5)), pictures[1]),
        (StreamParams(seed=1, image_prompt=ImagePromptParams("upload", 0.0)), pictures[0]),
    ]
    solo = [engine.step([(_session(engine, p, u), f)]).outputs[0] for (p, u), f in zip(cases, frames)]
    streams = [_session(engine, p, u) for p, u in cases]
    mixed = engine.step(list(zip(streams, frames[:4]))).outputs
    for want, got in zip(solo, mixed):
        assert _close(want, got)
    plain = engine.step([(_session(engine, StreamParams(seed=1), None), frames[3])]).outputs[0]
    assert torch.equal(plain, solo[3])  # scale 0 is no image prompt
    with_image = engine.step([(_session(engine, cases[1][0], pictures[0]), frames[3])]).outputs[0]
    assert (with_image.float() - plain.float()).abs().mean() > 2  # the image prompt changes the picture
    guided = StreamParams(seed=4, guidance=2.0, image_prompt=upload)
    alone = engine.step([(_session(engine, guided, pictures[1]), frames[4])]).outputs[0]
    together = engine.step([(_session(engine, guided, pictures[1]), frames[4]),
                            (_session(engine, StreamParams(), None), frames[0])]).outputs  # fmt: skip
    assert _close(alone, together[0])


def test_stream_batch_rows_carry_their_image_prompts(tiny_parts: Any, frames: list[torch.Tensor],
                                                     pictures: list[torch.Tensor]) -> None:  # fmt: skip
    settings = EngineSettings(model="tiny", height=SIZE, width=SIZE, stream_batch=True, ip_adapter="tiny")
    engine = StreamEngine(settings, parts=copy.deepcopy(tiny_parts))
    params = [StreamParams(steps=2, strength=0.8),
              StreamParams(steps=2, strength=0.8, image_prompt=ImagePromptParams("upload", 0.8))]  # fmt: skip
    solo = [_session(engine, p, pictures[0]) for p in params]
    both = [_session(engine, p, pictures[0]) for p in params]
    for frame in frames[:3]:
        want = [engine.step([(s, frame)]).outputs[0] for s in solo]
        got = engine.step([(s, frame) for s in both]).outputs
        assert all(_close(w, g) for w, g in zip(want, got))


def test_scale_and_image_changes_apply_on_the_next_frame_and_only_an_image_change_encodes(
    engine: StreamEngine, frames: list[torch.Tensor], pictures: list[torch.Tensor]
) -> None:
    stream = _session(engine, StreamParams(image_prompt=ImagePromptParams("upload", 1.0)), pictures[0])
    tokens = stream.image_tokens
    first = engine.step([(stream, frames[0])]).outputs[0]
    engine.update(stream, stream.params.replace(image_prompt=ImagePromptParams("upload", 0.3)))
    assert stream.image_tokens is tokens  # a scale change encodes nothing
    weaker = engine.step([(stream, frames[0])]).outputs[0]
    assert not torch.equal(first, weaker)
    expected = engine.step([(_session(engine, stream.params, pictures[0]), frames[0])]).outputs[0]
    assert torch.equal(weaker, expected)  # the next frame is the new scale's, exactly
    engine.set_uploaded_image(stream, pictures[1])
    assert stream.image_tokens is tokens  # an upload alone changes nothing until it is asked for
    engine.update(stream, stream.params.replace(image_prompt=ImagePromptParams("upload", 0.3, version=1)))
    assert stream.image_tokens is not tokens
    other = engine.step([(stream, frames[0])]).outputs[0]
    assert torch.equal(other, engine.step([(_session(engine, stream.params, pictures[1]), frames[0])]).outputs[0])
    engine.update(stream, stream.params.replace(image_prompt=None))
    plain = engine.step([(stream, frames[0])]).outputs[0]
    assert torch.equal(plain, engine.step([(_session(engine, StreamParams(), None), frames[0])]).outputs[0])


def test_a_frame_image_prompt_captures_the_stream_frame_once(engine: StreamEngine, frames: list[torch.Tensor]) -> None:
    """`image: frame` before any frame is taken from the first one; later frames do not change it;
    a new `version` captures the latest frame. Each equals an upload of that frame."""
    stream = engine.open_stream(StreamParams(image_prompt=ImagePromptParams("frame", 1.0)))
    assert stream.capture_pending and stream.image_tokens is None
    outputs = [engine.step([(stream, frame)]).outputs[0] for frame in frames[:3]]
    twin = _session(engine, StreamParams(image_prompt=ImagePromptParams("upload", 1.0)), frames[0])
    assert torch.equal(outputs[2], engine.step([(twin, frames[2])]).outputs[0])  # still the first frame's image
    engine.update(stream, stream.params.replace(image_prompt=ImagePromptParams("frame", 1.0, version=1)))
    now = engine.step([(stream, frames[3])]).outputs[0]
    twin = _session(engine, StreamParams(image_prompt=ImagePromptParams("upload", 1.0)), frames[2])
    assert torch.equal(now, engine.step([(twin, frames[3])]).outputs[0])  # the frame before the request


def test_image_prompt_refusals_name_the_field(engine: StreamEngine, tiny_parts: Any) -> None:
    stream = engine.open_stream(StreamParams())
    with pytest.raises(ConfigError, match=r"^image_prompt\.image 'upload': no image was uploaded"):
        engine.update(stream, StreamParams(prompt="x", image_prompt=ImagePromptParams("upload")))
    assert stream.params == StreamParams()  # the stream keeps its params
    plain = StreamEngine(EngineSettings(model="tiny", height=SIZE, width=SIZE), parts=copy.deepcopy(tiny_parts))
    with pytest.raises(ConfigError, match=r"^image_prompt needs an engine started with an IP-Adapter"):
        plain.open_stream(StreamParams(image_prompt=ImagePromptParams()))
    with pytest.raises(ConfigError, match=r"^image_prompt\.scale must be a number in \[0, 2\]"):
        ImagePromptParams("frame", 2.5)
    with pytest.raises(ConfigError, match=r"^image_prompt\.image must be one of frame, upload"):
        ImagePromptParams("camera")
    with pytest.raises(ConfigError, match=r"^image_prompt image must be \(H, W, 3\) uint8"):
        engine.set_uploaded_image(stream, torch.zeros(4, 4))


def test_image_prompt_steps_are_recorded_and_scale_or_image_changes_never_record_again(
    tiny_parts: Any, frames: list[torch.Tensor], pictures: list[torch.Tensor]
) -> None:
    config = EngineSettings(model="tiny", height=SIZE, width=SIZE, ip_adapter="tiny")
    parts = copy.deepcopy(tiny_parts)
    eager, recorded = StreamEngine(config, parts=parts), StreamEngine(config, parts=parts)
    recorder = HostReplay()
    recorded.backend = CudaGraphBackend(parts, capture=recorder, extras=unet_extras(config, parts))
    params = [StreamParams(seed=1, image_prompt=ImagePromptParams("upload", 1.0)), StreamParams(seed=2)]
    pairs = [(_session(eager, p, pictures[0]), _session(recorded, p, pictures[0])) for p in params]

    def step(frame: torch.Tensor) -> None:
        want = eager.step([(a, frame) for a, _ in pairs]).outputs
        got = recorded.step([(b, frame) for _, b in pairs]).outputs
        assert all(torch.equal(w, g) for w, g in zip(want, got))

    for frame in frames[:3]:
        step(frame)
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1 and recorder.recorded == len(STAGES)
    (layout,) = graphs.layouts
    assert layout[-1] == (True, False)  # which rows have an image prompt
    changes = [ImagePromptParams("upload", 0.4), ImagePromptParams("upload", 1.7), ImagePromptParams("upload", 1.7, 1)]
    for change, frame in zip(changes, frames[3:]):
        for engine, stream in zip((eager, recorded), pairs[0]):
            engine.set_uploaded_image(stream, pictures[1])
            engine.update(stream, stream.params.replace(image_prompt=change))
        step(frame)
    assert recorder.recorded == len(STAGES)  # new scales and a new image: replayed, never recorded


def test_an_adapter_that_cannot_load_stops_serve_with_one_line(tmp_path: Path) -> None:
    from tests.test_cli import livediff

    pickled = tmp_path / "ip.bin"
    pickled.write_bytes(b"\0")
    process = livediff("serve", "--model", "tiny", "--size", "64", "--backend", "torch", "--ip-adapter", str(pickled),
                       "--host", "127.0.0.1", "--port", "0", "--engines-dir", str(tmp_path / "engines"))  # fmt: skip
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "http://" not in out + err, (out, err)
    errors = [line for line in err.splitlines() if "IP-Adapter" in line]
    assert len(errors) == 1 and errors[0] == (
        f"livediff: error: IP-Adapter {pickled}: only .safetensors files are read (no pickled checkpoints)"
    ), err
    assert "Traceback" not in err


def test_torch_compile_reuses_its_graphs_for_new_scales_and_images(tiny_parts: Any) -> None:
    """torch.compile of the image-prompt UNet call: new scales and new image tokens for the same rows
    reuse the compiled frames (dynamo's count of compiled frames stays put), each equal to eager."""
    import torch._dynamo

    unet = copy.deepcopy(tiny_parts.unet)
    model = ExtrasUNet(unet, UNetExtras((ImagePrompt(load_ip_adapter("tiny", unet)),)))
    torch._dynamo.reset()
    compiled = torch.compile(model.call, backend="eager", dynamic=False)
    generator = torch.Generator().manual_seed(3)
    latents, timesteps = torch.randn(3, 4, 8, 8, generator=generator), torch.tensor([999.0, 500.0, 10.0])
    embeds = torch.randn(3, 77, 32, generator=generator)
    rows = torch.tensor([0, 2])
    counters = torch._dynamo.utils.counters
    with torch.inference_mode():
        first = {IP_EMBEDS: torch.randn(3, 4, 32, generator=generator), IP_SCALES: torch.tensor([1.0, 0.0, 0.5]),
                 IP_ROWS: rows}  # fmt: skip
        compiled(latents, timesteps, embeds, first)
        frames = counters["stats"]["unique_graphs"]
        for scales in ([0.3, 0.0, 1.9], [2.0, 0.0, 0.0]):
            values = {IP_EMBEDS: torch.randn(3, 4, 32, generator=generator), IP_SCALES: torch.tensor(scales),
                      IP_ROWS: rows}  # fmt: skip
            out, _ = compiled(latents, timesteps, embeds, values)
            eager, _ = model.call(latents, timesteps, embeds, values)
            torch.testing.assert_close(out, eager)
    assert frames > 0 and counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()
