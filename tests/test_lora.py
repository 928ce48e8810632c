"""Per-stream LoRAs: loading (diffusers and kohya files, built-ins, errors), the per-row product in
one UNet call against PEFT's own LoRA forward, mixed batches against solo runs, live changes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from livediff.backends.multi_lora import LORA_SCALES, MultiLoRA
from livediff.backends.unet_extras import ExtrasUNet, UNetExtras
from livediff.config import EngineSettings, LoRAParams, StreamParams
from livediff.engine.stream import StreamEngine
from livediff.errors import ConfigError, ModelLoadError
from livediff.models.builtin import TINY_UNET
from livediff.models.lora import load_lora, random_lora
from livediff.server.params import ParamError, parse_query, parse_update


def _kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A diffusers-keyed LoRA in kohya's layout: `lora_unet_<path with _>.lora_down/up.weight` and `.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        path, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def lora_files(tiny_parts: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A diffusers-format file (rank 4), a kohya-format file (rank 8, alpha 4) and a folder holding the first."""
    folder = tmp_path_factory.mktemp("loras")
    diffusers_file = folder / "style.safetensors"
    save_file(random_lora(tiny_parts.unet, 4, seed=1), diffusers_file)
    kohya_file = folder / "kohya.safetensors"
    save_file(_kohya(random_lora(tiny_parts.unet, 8, seed=2), alpha=4.0), kohya_file)
    (folder / "dir").mkdir()
    save_file(random_lora(tiny_parts.unet, 4, seed=3), folder / "dir" / "pytorch_lora_weights.safetensors")
    return {"diffusers": diffusers_file, "kohya": kohya_file, "folder": folder / "dir"}


def _inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((rows, 4, 8, 8), generator=generator)
    embeds = torch.randn((rows, 77, TINY_UNET["cross_attention_dim"]), generator=generator)
    return latents, torch.full((rows,), 499.0), embeds


def test_loading_keeps_the_unet_as_it_was(tiny_parts: Any, lora_files: dict[str, Path]) -> None:
    before = {k: v.clone() for k, v in tiny_parts.unet.state_dict().items()}
    kinds = {type(m) for m in tiny_parts.unet.modules()}
    for source in (str(lora_files["diffusers"]), str(lora_files["kohya"]), str(lora_files["folder"]), "tiny"):
        lora = load_lora("x", source, tiny_parts.unet)
        assert lora.layers and any(layer.down.dim() == 4 for layer in lora.layers.values())  # convs too
    after = tiny_parts.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {type(m) for m in tiny_parts.unet.modules()} == kinds and not getattr(tiny_parts.unet, "peft_config", None)


@pytest.mark.parametrize("strategy", ["segmented", "gather", "dense"])
@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_each_row_matches_peft_with_its_own_lora_and_scale(tiny_parts: Any, lora_files: dict[str, Path],
                                                          kind: str, strategy: str) -> None:  # fmt: skip
    """Rows of one call (no LoRA; the file's at 1; at -0.7; the file's and `tiny` at 0.5 and 1.5)
    against diffusers/PEFT running the same file alone, one adapter set per call (`set_adapters`)."""
    source = str(lora_files[kind])
    unet = copy.deepcopy(tiny_parts.unet)
    loras = [load_lora("file", source, unet), load_lora("tiny", "tiny", unet)]
    feature = MultiLoRA(loras, unet)
    feature.strategy = strategy
    model = ExtrasUNet(unet, UNetExtras((feature,)))
    rows = [(0.0, 0.0), (1.0, 0.0), (-0.7, 0.0), (0.5, 1.5)]
    latents, timesteps, embeds = _inputs(len(rows))
    with torch.inference_mode():
        mixed, _ = model.call(latents, timesteps, embeds, {LORA_SCALES: torch.tensor(rows)})
        plain = unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    reference = copy.deepcopy(tiny_parts.unet)
    reference.load_lora_adapter(_state(source), prefix="unet", adapter_name="file", network_alphas=_alphas(source))
    reference.load_lora_adapter(random_lora(tiny_parts.unet, 4, seed=_seed("tiny")), prefix="unet", adapter_name="tiny")
    for i, (file_scale, tiny_scale) in enumerate(rows):
        with torch.inference_mode():
            if file_scale == tiny_scale == 0.0:
                expected = plain[i]
            else:
                reference.set_adapters(["file", "tiny"], weights=[file_scale, tiny_scale])
                expected = reference(latents[i : i + 1], timesteps[i : i + 1], encoder_hidden_states=embeds[i : i + 1],
                                     return_dict=False)[0][0]  # fmt: skip
        torch.testing.assert_close(mixed[i], expected, atol=2e-4, rtol=1e-3)
    assert torch.equal(mixed[0], plain[0])  # the row without a LoRA is the plain call's row
    assert (mixed[1] - plain[1]).abs().mean() > 1e-2  # and the LoRA rows are not


def _state(source: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    return StableDiffusionLoraLoaderMixin.lora_state_dict(source)[0]  # type: ignore[no-any-return]


def _alphas(source: str) -> dict[str, float] | None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    return StableDiffusionLoraLoaderMixin.lora_state_dict(source)[1]  # type: ignore[no-any-return]


def _seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


@pytest.fixture(scope="module")
def engine(tiny_parts: Any) -> StreamEngine:
    settings = EngineSettings(model="tiny", height=64, width=64, loras=(("ink", "tiny"), ("film", "random:8")))
    return StreamEngine(settings, parts=copy.deepcopy(tiny_parts))


def _frame() -> torch.Tensor:
    return torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.int() - b.int()).abs().float().mean())


PARAMS = [
    StreamParams(),
    StreamParams(loras=(LoRAParams("ink"),)),
    StreamParams(loras=(LoRAParams("film", -0.5), LoRAParams("ink", 2.0))),
    StreamParams(loras=(LoRAParams("film", 1.5),), guidance=2.0),
]


def test_a_mixed_batch_gives_each_stream_its_solo_frame(engine: StreamEngine) -> None:
    image = _frame()
    solo = [engine.step([(engine.open_stream(p), image)]).outputs[0] for p in PARAMS]
    mixed = engine.step([(engine.open_stream(p), image) for p in PARAMS]).outputs
    for alone, together in zip(solo, mixed):
        assert int((alone.int() - together.int()).abs().max()) <= 2  # uint8 rounding of batched float sums
    assert all(_diff(solo[0], other) > 10 for other in solo[1:3])  # the LoRAs change the picture


def test_stream_batch_rows_carry_their_loras(tiny_parts: Any) -> None:
    settings = EngineSettings(model="tiny", height=64, width=64, stream_batch=True, loras=(("ink", "tiny"),))
    engine = StreamEngine(settings, parts=copy.deepcopy(tiny_parts))
    image = _frame()
    params = [StreamParams(steps=2, strength=0.8), StreamParams(steps=2, strength=0.8, loras=(LoRAParams("ink"),))]
    solo = []
    for p in params:
        stream = engine.open_stream(p)
        solo.append([engine.step([(stream, image)]).outputs[0] for _ in range(2)][-1])
    streams = [engine.open_stream(p) for p in params]
    mixed = [engine.step([(s, image) for s in streams]).outputs for _ in range(2)][-1]
    for alone, together in zip(solo, mixed):
        assert int((alone.int() - together.int()).abs().max()) <= 2
    assert _diff(solo[0], solo[1]) > 10


def test_a_scale_change_applies_on_the_next_frame_without_touching_the_weights(engine: StreamEngine) -> None:
    image = _frame()
    feature = engine.lora_feature
    assert feature is not None
    buffers = {path: (layer.down.data_ptr(), layer.up.data_ptr(), layer.down.clone())
               for path, layer in feature.layers.items()}  # fmt: skip
    stream = engine.open_stream(StreamParams(loras=(LoRAParams("ink", 1.0),)))
    first = engine.step([(stream, image)]).outputs[0]
    for scale in (0.25, -1.0):
        params = stream.params.replace(loras=(LoRAParams("ink", scale),))
        engine.update(stream, params)
        changed = engine.step([(stream, image)]).outputs[0]
        fresh = engine.step([(engine.open_stream(params), image)]).outputs[0]
        assert torch.equal(changed, fresh) and _diff(changed, first) > 1
    engine.update(stream, stream.params.replace(loras=()))
    plain = engine.step([(engine.open_stream(StreamParams()), image)]).outputs[0]
    assert torch.equal(engine.step([(stream, image)]).outputs[0], plain)
    for path, layer in feature.layers.items():
        down_ptr, up_ptr, down = buffers[path]
        assert (layer.down.data_ptr(), layer.up.data_ptr()) == (down_ptr, up_ptr) and torch.equal(layer.down, down)


@pytest.mark.parametrize("strategy", ["segmented", "gather"])
def test_a_scale_change_does_not_recompile(tiny_parts: Any, strategy: str) -> None:
    """torch.compile of the LoRA UNet call: new scales for the same rows reuse the compiled frames
    (dynamo's count of compiled frames stays put); a new layout of rows is the only recompile."""
    import torch._dynamo

    unet = copy.deepcopy(tiny_parts.unet)
    feature = MultiLoRA([load_lora("ink", "tiny", unet), load_lora("film", "random:8", unet)], unet)
    feature.strategy = strategy
    model = ExtrasUNet(unet, UNetExtras((feature,)))
    torch._dynamo.reset()
    compiled = torch.compile(model.call, backend="eager", dynamic=False)
    latents, timesteps, embeds = _inputs(3)
    counters = torch._dynamo.utils.counters
    with torch.inference_mode():
        compiled(latents, timesteps, embeds, {LORA_SCALES: torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]])})
        frames = counters["stats"]["unique_graphs"]
        for scales in ([[0.3, 0.0], [0.0, -1.2], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]):
            out, _ = compiled(latents, timesteps, embeds, {LORA_SCALES: torch.tensor(scales)})
            eager, _ = model.call(latents, timesteps, embeds, {LORA_SCALES: torch.tensor(scales)})
            torch.testing.assert_close(out, eager)
    assert frames > 0 and counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()


def test_streams_naming_unknown_loras_are_refused_by_field(engine: StreamEngine, tiny_parts: Any) -> None:
    with pytest.raises(ConfigError, match=r"^loras\[1\]\.name 'nope' is not one of this engine's LoRAs: ink, film"):
        engine.open_stream(StreamParams(loras=(LoRAParams("ink"), LoRAParams("nope"))))
    stream = engine.open_stream(StreamParams(loras=(LoRAParams("ink"),)))
    with pytest.raises(ConfigError, match=r"^loras\[0\]\.name"):
        engine.update(stream, StreamParams(loras=(LoRAParams("gone"),)))
    assert stream.params.loras == (LoRAParams("ink"),)  # the stream keeps its params
    plain = StreamEngine(EngineSettings(model="tiny", height=64, width=64), parts=tiny_parts)
    with pytest.raises(ConfigError, match=r"^loras\[0\]\.name needs an engine with LoRAs.*--lora NAME=SOURCE"):
        plain.open_stream(StreamParams(loras=(LoRAParams("ink"),)))


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"loras": [{"name": "ink", "scale": 2.5}]}, "loras[0].scale"),
        ({"loras": [{"name": "ink"}, {"name": "film", "scale": -3}]}, "loras[1].scale"),
        ({"loras": [{"name": "ink", "scale": "strong"}]}, "loras[0].scale"),
        ({"loras": [{"name": "ink", "weight": 1}]}, "loras[0].weight"),
        ({"loras": [{"scale": 1}]}, "loras[0].name"),
        ({"loras": [{"name": 3}]}, "loras[0].name"),
        ({"loras": [{"name": "bad name!"}]}, "loras[0].name"),
        ({"loras": ["ink"]}, "loras[0]"),
        ({"loras": {"name": "ink"}}, "loras"),
        ({"loras": [{"name": "ink"}] * 5}, "loras"),
    ],
)
def test_bad_lora_values_name_the_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ParamError) as error:
        parse_update(StreamParams(), bad)
    assert error.value.field == field


def test_lora_params_from_json_and_query_strings() -> None:
    params, _ = parse_update(StreamParams(), {"loras": [{"name": "ink", "scale": -0.5}, {"name": "film"}]})
    assert params.loras == (LoRAParams("ink", -0.5), LoRAParams("film", 1.0))
    assert parse_update(params, {"loras": None})[0].loras == ()
    assert parse_query({"loras": "ink:0.8,film"}) == {"loras": [{"name": "ink", "scale": 0.8}, {"name": "film"}]}
    with pytest.raises(ParamError) as error:
        parse_query({"loras": "ink:loud"})
    assert error.value.field == "loras" and "NAME[:SCALE]" in error.value.message


def test_lora_files_that_cannot_serve_are_one_line_naming_the_file(tiny_parts: Any, tmp_path: Path) -> None:
    other = UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (48, 96)})
    save_file(random_lora(other, 4, seed=0), tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    (tmp_path / "empty").mkdir()
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "te.safetensors")
    cases = {
        str(tmp_path / "other.safetensors"): "could not be loaded",
        str(tmp_path / "junk.safetensors"): "could not be loaded",
        str(tmp_path / "model.ckpt"): "only .safetensors",
        str(tmp_path / "empty"): "found none",
        str(tmp_path / "te.safetensors"): "no UNet layers",
        "owner/not-cached": "HF_HUB_OFFLINE",
        "nowhere.safetensors": "is not a built-in",
        "random:0": "rank must be",
    }
    for source, words in cases.items():
        with pytest.raises(ModelLoadError) as error:
            load_lora("style", source, tiny_parts.unet)
        message = str(error.value)
        assert "\n" not in message and words in message and ("style" in message or source in message), message
    assert not getattr(tiny_parts.unet, "peft_config", None)  # a failed load leaves the UNet as it was


def test_cli_lora_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from livediff.cli import lora_entries

    assert lora_entries(argparse.Namespace(lora=["ink=tiny,film=a/b", "x=./y.safetensors"])) == (
        ("ink", "tiny"), ("film", "a/b"), ("x", "./y.safetensors"))  # fmt: skip
    with pytest.raises(ConfigError, match="^--lora: 'ink' is not NAME=SOURCE"):
        lora_entries(argparse.Namespace(lora=["ink"]))
    with pytest.raises(ConfigError, match="named twice"):
        EngineSettings(loras=(("ink", "tiny"), ("ink", "tiny")))


def test_bench_lora_reports_every_way_against_plain() -> None:
    from livediff.bench import BenchPlan
    from livediff.bench_lora import format_lora, run_lora_bench

    settings = EngineSettings(model="tiny", height=64, width=64, loras=(("a", "tiny"), ("b", "random:8")))
    report = run_lora_bench(settings, BenchPlan(frames=2, warmup=1, batch=2), streams=(2,))
    assert [row["config"] for row in report["runs"]] == ["none", "loras"]
    assert report["runs"][1]["loras"] == [["a"], ["b"]] and report["runs"][1]["vs_none"] > 0
    unet = report["unet"]
    for way in ("segmented", "gather", "dense"):  # the same predictions as PEFT's, whatever their speed
        assert unet[f"{way}_max_abs_diff_from_peft"] < 1e-4 and unet[f"{way}_vs_plain_p50"] > 0
    assert report["streams"][0]["loras"] == ["a", "b"] and report["streams"][0]["speedup_p50"] > 0
    assert unet["gflop"]["dense"] > unet["gflop"]["gather"] > unet["gflop"]["plain"] > 0  # LoRA rows add work
    text = format_lora(report)
    assert "PEFT adapter_names" in text and "2 streams (a, b)" in text and "the floor of the LoRA rows' cost" in text


def test_lora_steps_are_recorded_and_a_switch_or_rescale_never_records_again(tiny_parts: Any) -> None:
    """`cuda-graph` (its host stand-in recorder): a mixed batch with LoRA rows is recorded and its
    frames equal eager torch's; switching a stream's LoRA or rescaling one replays the same recording."""
    from livediff.backends.cuda_graph import CudaGraphBackend
    from livediff.backends.unet_extras import unet_extras
    from tests.test_cuda_graph import STAGES, HostReplay

    config = EngineSettings(model="tiny", height=64, width=64, loras=(("ink", "tiny"), ("film", "random:8")))
    parts = copy.deepcopy(tiny_parts)
    eager, recorded = StreamEngine(config, parts=parts), StreamEngine(config, parts=parts)
    recorder = HostReplay()
    recorded.backend = CudaGraphBackend(parts, capture=recorder, extras=unet_extras(config, parts))
    pairs = [(eager.open_stream(p), recorded.open_stream(p)) for p in PARAMS]
    image = _frame()

    def step() -> list[torch.Tensor]:
        want = eager.step([(a, image) for a, _ in pairs]).outputs
        got = recorded.step([(b, image) for _, b in pairs]).outputs
        for w, g in zip(want, got):
            assert torch.equal(w, g)
        return got

    for _ in range(3):  # eager, recorded, replayed
        before = step()
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1 and recorder.recorded == len(STAGES) and recorder.replayed == 2 * len(STAGES)
    (layout,) = graphs.layouts
    assert layout[-1] == ("lora", (0, 1, 2, 1))  # how many LoRAs each row applies
    changes = {1: (LoRAParams("film", 0.7),), 2: (LoRAParams("film", 1.2), LoRAParams("ink", -0.3)),
               3: (LoRAParams("ink", -0.5),)}  # fmt: skip
    for row, loras in changes.items():
        for engine, stream in zip((eager, recorded), pairs[row]):
            engine.update(stream, stream.params.replace(loras=loras))
    after = step()
    assert recorder.recorded == len(STAGES)  # switched and rescaled LoRAs: replayed, never recorded
    assert torch.equal(after[0], before[0]) and all(_diff(after[r], before[r]) > 1 for r in changes)


def test_stream_batch_lora_steps_replay_matching_eager(tiny_parts: Any) -> None:
    """Stream Batch under `cuda-graph` (host stand-in): each row's LoRAs repeated over its pipeline
    steps, recorded once, a rescale replayed, frames equal to eager torch's."""
    from livediff.backends.cuda_graph import CudaGraphBackend
    from livediff.backends.unet_extras import unet_extras
    from tests.test_cuda_graph import STAGES, HostReplay

    config = EngineSettings(model="tiny", height=64, width=64, stream_batch=True, loras=(("ink", "tiny"),))
    parts = copy.deepcopy(tiny_parts)
    eager, recorded = StreamEngine(config, parts=parts), StreamEngine(config, parts=parts)
    recorder = HostReplay()
    recorded.backend = CudaGraphBackend(parts, capture=recorder, extras=unet_extras(config, parts))
    params = [StreamParams(steps=2, strength=0.8), StreamParams(steps=2, strength=0.8, loras=(LoRAParams("ink"),))]
    pairs = [(eager.open_stream(p), recorded.open_stream(p)) for p in params]
    image = _frame()
    for index in range(5):
        if index == 4:
            for engine, stream in zip((eager, recorded), pairs[1]):
                engine.update(stream, stream.params.replace(loras=(LoRAParams("ink", -1.5),)))
        want = eager.step([(a, image) for a, _ in pairs]).outputs
        got = recorded.step([(b, image) for _, b in pairs]).outputs
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    graphs = recorded.backend.graphs  # type: ignore[attr-defined]
    # the first step starts the pipelines, the second runs eagerly, the third records, all later replay
    assert len(graphs.layouts) == 1 and recorder.recorded == len(STAGES) and recorder.replayed == 3 * len(STAGES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lora_steps_replay_from_cuda_graphs_matching_eager(tmp_path: Path) -> None:
    """Real CUDA graphs: LoRA rows read from the recording's static inputs (no host value baked in),
    a LoRA switch and rescale replayed, frames as eager torch's."""
    from tests.test_fast_path import _cuda_engine, _worst

    loras = (("ink", "tiny"), ("film", "random:8"))
    eager = _cuda_engine("torch", tmp_path, loras=loras)
    graphed = _cuda_engine("cuda-graph", tmp_path, loras=loras)
    from livediff.synthetic import SyntheticCamera

    frames = [torch.from_numpy(f) for f in SyntheticCamera(128, 128, seed=5).frames(8)]
    first = StreamParams(prompt="a red fox", seed=1, loras=(LoRAParams("ink"),))
    changes = [first.replace(loras=(LoRAParams("film", 0.6),)), first.replace(loras=(LoRAParams("film", -1.5),)),
               first.replace(loras=(LoRAParams("ink", 2.0),))]  # fmt: skip
    others = [StreamParams(seed=2), StreamParams(seed=3, loras=(LoRAParams("film", 1.0), LoRAParams("ink", 0.5)))]
    worst = _worst(eager, graphed, [first, *others], frames, changes)
    assert worst >= 40.0, f"PSNR {worst:.1f} dB"
    graphs = graphed.backend.graphs  # type: ignore[attr-defined]
    assert len(graphs.layouts) == 1  # recorded at the second frame, replayed through every switch and rescale


def test_torch_compile_of_the_fixed_plan_never_recompiles_on_a_switch_or_rescale(tiny_parts: Any) -> None:
    """What `cuda-graph-compiled` compiles: the UNet call with a fixed-shape LoRA plan (rows, slots,
    scales as tensors) reuses dynamo's compiled frames when the slots and scales change, and equals
    the host-planned eager call."""
    import torch._dynamo

    from livediff.backends.multi_lora import LORA_ROW_SCALES, LORA_ROWS, LORA_SLOTS

    unet = copy.deepcopy(tiny_parts.unet)
    feature = MultiLoRA([load_lora("ink", "tiny", unet), load_lora("film", "random:8", unet)], unet)
    model = ExtrasUNet(unet, UNetExtras((feature,)))
    torch._dynamo.reset()
    compiled = torch.compile(model.call, backend="eager", dynamic=False)
    latents, timesteps, embeds = _inputs(3)
    counters = torch._dynamo.utils.counters
    frames = 0
    with torch.inference_mode():
        for matrix in ([[1.0, 0.0], [0.0, 0.0], [0.0, 0.5]], [[0.0, -1.2], [0.0, 0.0], [2.0, 0.0]],
                       [[0.0, 0.3], [0.0, 0.0], [0.0, 1.9]]):  # fmt: skip
            rows = feature.fixed_rows(torch.tensor(matrix), torch.device("cpu"))
            assert rows is not None and rows.slots is not None and rows.scales is not None and rows.rows == (0, 2)
            values = {LORA_SCALES: rows.matrix, LORA_ROWS: torch.tensor(rows.rows), LORA_SLOTS: rows.slots,
                      LORA_ROW_SCALES: rows.scales}  # fmt: skip
            out, _ = compiled(latents, timesteps, embeds, values)
            eager, _ = model.call(latents, timesteps, embeds, {LORA_SCALES: rows.matrix})
            torch.testing.assert_close(out, eager)
            frames = frames or counters["stats"]["unique_graphs"]
    assert frames > 0 and counters["stats"]["unique_graphs"] == frames
    torch._dynamo.reset()
