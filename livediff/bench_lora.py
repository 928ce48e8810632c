"""`livediff bench --lora NAME=SOURCE ...`: what per-stream LoRAs cost, beside the same engine without.

On one engine (its LoRAs from `--lora`), the configurations taking turns frame by frame (so that
the host's busy spells slow all of them alike):

1. `none`: `plan.batch` streams, no LoRA: the plain step.
2. `loras`: the same streams, stream i with the i-th LoRA (round robin) at scale 1: one UNet
   call, each row its own LoRA (`livediff.backends.multi_lora`).

Each row: ms per step (mean and p50), ms per frame and the ratio to `none`.

Then the UNet call alone, batch `plan.batch`, each row another LoRA, five ways taking turns:
plain (no LoRA), livediff's three strategies (`segmented`: one product per slot on its own weights;
`gather`: the rows' weights gathered into batched products; `dense`: every slot for every row, as
the exported graph), and PEFT's mixed-batch forward (the
LoRAs injected into a copy of the UNet by diffusers, each row naming its adapter through PEFT's
`adapter_names`), with the largest difference of livediff's predictions from PEFT's.

With `--streams N`: N streams, each with another LoRA, as one batched step per frame against N
steps one after another, and N streams with none batched (what the LoRAs cost a shared step).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch

from livediff.bench import BenchPlan, engine_line, percentiles, run_rounds
from livediff.bench_controlnet import MixedLane
from livediff.config import EngineSettings, LoRAParams, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import ConfigError
from livediff.synthetic import SyntheticCamera


class ParamsLane:
    """Streams with their own params, all in one step per frame, timed per step."""

    def __init__(self, engine: StreamEngine, params: list[StreamParams], label: str, frames: list[Any]) -> None:
        self.engine = engine
        self.label = label
        self.frames = [torch.from_numpy(frame) for frame in frames]
        self.streams = [engine.open_stream(p.replace(seed=p.seed + i)) for i, p in enumerate(params)]
        self.step_ms: list[float] = []

    def run(self, index: int, record: bool) -> None:
        started = time.perf_counter()
        self.engine.step([(stream, self.frames[index]) for stream in self.streams])
        if record:
            self.step_ms.append((time.perf_counter() - started) * 1000.0)

    def report(self) -> dict[str, Any]:
        return {
            "config": self.label,
            "loras": [[lora.name for lora in s.params.loras] for s in self.streams],
            "step_ms": percentiles(self.step_ms),
            "ms_per_frame": round(sum(self.step_ms) / (len(self.step_ms) * len(self.streams)), 3),
        }


class UNetLane:
    """One UNet call of `rows` rows per turn, run one way (`plain`, `livediff`, `peft`)."""

    def __init__(self, label: str, call: Any) -> None:
        self.label = label
        self.call = call
        self.ms: list[float] = []
        self.output: torch.Tensor | None = None

    def run(self, index: int, record: bool) -> None:
        started = time.perf_counter()
        with torch.inference_mode():
            self.output = self.call()
        if record:
            self.ms.append((time.perf_counter() - started) * 1000.0)

    def report(self) -> dict[str, Any]:
        return {"way": self.label, "ms": percentiles(self.ms), "mean_ms": round(sum(self.ms) / len(self.ms), 3)}


def _peft_call(engine: StreamEngine, names: list[str], latents: torch.Tensor, timesteps: torch.Tensor,
               embeds: torch.Tensor) -> Any:  # fmt: skip
    """A copy of the UNet with the engine's LoRAs injected by diffusers/PEFT, called with PEFT's
    per-row `adapter_names` (its `_mixed_batch_forward`): row i applies `names[i]`."""
    from peft.tuners.lora import LoraLayer

    from livediff.models.lora import diffusers_state

    unet: Any = copy.deepcopy(engine.parts.unet)
    states = [(name, *diffusers_state(name, source, unet)) for name, source in engine.settings.loras]
    for name, state, alphas in states:  # read first: a built-in is made for the UNet without PEFT's layers
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name=name)

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args, {**kwargs, "adapter_names": names}

    for module in unet.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(hook, with_kwargs=True)
    return lambda: unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]


def unet_flops(call: Any) -> float:
    """GFLOP of one `call` as torch's FLOP counter sees it (matrix products and convolutions): what no
    kernel choice can go below, so `gather`'s count over plain's is the floor of a per-row LoRA's cost."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        call()
    return round(counter.get_total_flops() / 1e9, 4)


def unet_comparison(engine: StreamEngine, plan: BenchPlan) -> dict[str, Any]:
    """The UNet call alone: plain, livediff's per-row LoRAs, PEFT's `adapter_names` (see the module docstring)."""
    from livediff.backends.multi_lora import LORA_SCALES

    feature = engine.lora_feature
    assert feature is not None
    rows = plan.batch
    names = [feature.names[i % len(feature.names)] for i in range(rows)]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((rows, *engine.latent_shape), generator=generator).to(engine.device, engine.dtype)
    timesteps = torch.full((rows,), 499.0, device=engine.device)
    embeds = engine.conditioning.get(plan.params.prompt).embeds.expand(rows, -1, -1).contiguous()
    scales = torch.zeros((rows, len(feature.names)))
    for i, name in enumerate(names):
        scales[i, feature.names.index(name)] = 1.0
    chosen = feature.strategy

    def ours(strategy: str) -> Any:
        def call() -> torch.Tensor:
            feature.strategy = strategy
            try:
                return engine.backend.unet_with(latents, timesteps, embeds, {LORA_SCALES: scales})[0]
            finally:
                feature.strategy = chosen

        return call

    lanes = [
        UNetLane("plain", lambda: engine.backend.unet(latents, timesteps, embeds)),
        UNetLane("segmented", ours("segmented")),
        UNetLane("gather", ours("gather")),
        UNetLane("dense", ours("dense")),
        UNetLane("peft", _peft_call(engine, names, latents, timesteps, embeds)),
    ]
    flops = {lane.label: unet_flops(lane.call) for lane in lanes if lane.label in ("plain", "gather", "dense")}
    run_rounds(list(lanes), plan)
    reports = {lane.label: lane.report() for lane in lanes}
    outputs = {lane.label: lane.output for lane in lanes if lane.output is not None}
    plain_p50 = reports["plain"]["ms"]["p50"]
    ways = ("segmented", "gather", "dense", "peft")
    result: dict[str, Any] = {"rows": rows, "loras": names, "strategy": chosen, **reports, "gflop": flops}
    result["gather_gflop_vs_plain"] = round(flops["gather"] / flops["plain"], 3)  # the floor of any per-row way
    result.update({f"{way}_vs_plain_p50": round(reports[way]["ms"]["p50"] / plain_p50, 3) for way in ways})
    for way in ways[:3]:
        result[f"{way}_max_abs_diff_from_peft"] = float((outputs[way].float() - outputs["peft"].float()).abs().max())
    return result


def run_lora_bench(settings: EngineSettings, plan: BenchPlan, streams: tuple[int, ...] = ()) -> dict[str, Any]:
    """One report: the step with and without LoRAs, the UNet call five ways, and the streams comparison."""
    if not settings.loras:
        raise ConfigError("--lora: name the LoRAs to time (NAME=SOURCE, e.g. a=random:16,b=random:16)")
    if settings.backend not in ("torch", "cuda-graph"):
        raise ConfigError("bench --lora times the torch backends (--backend torch or cuda-graph)")
    plan = dataclasses.replace(plan, turn=1)  # lanes alternate frame by frame: a busy spell of the host slows all alike
    engine = StreamEngine(settings)
    names = [name for name, _ in settings.loras]
    base = plan.params.replace(loras=())
    with_loras = [base.replace(loras=(LoRAParams(names[i % len(names)]),)) for i in range(plan.batch)]
    frames = SyntheticCamera(settings.height, settings.width).frames(plan.rounds)
    lanes = [ParamsLane(engine, [base] * plan.batch, "none", frames), ParamsLane(engine, with_loras, "loras", frames)]
    run_rounds(list(lanes), plan)
    none, loras = (lane.report() for lane in lanes)
    loras["vs_none"] = round(loras["ms_per_frame"] / none["ms_per_frame"], 3)
    loras["vs_none_p50"] = round(loras["step_ms"]["p50"] / none["step_ms"]["p50"], 3)
    feature = engine.lora_feature
    assert feature is not None
    report: dict[str, Any] = {
        "model": f"{engine.parts.ref} ({engine.parts.revision})",
        "loras": {name: source for name, source in settings.loras},
        "rank": feature.rank,
        "layers": len(feature.layers),
        "backend": engine.backend.name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "size": f"{settings.width}x{settings.height}",
        "batch": plan.batch,
        "steps": len(plan.params.timesteps),
        "runs": [none, loras],
        "unet": unet_comparison(engine, plan),
    }
    for count in streams:
        mixed = [base.replace(loras=(LoRAParams(names[i % len(names)]),)) for i in range(count)]
        cases = ((mixed, True), (mixed, False), ([base] * count, True))
        together, apart, plain = (MixedLane(engine, params, batched, plan, frames) for params, batched in cases)
        run_rounds([together, apart, plain], plan)
        b, s, p = together.report(), apart.report(), plain.report()
        report.setdefault("streams", []).append({
            "streams": count, "loras": [m.loras[0].name for m in mixed], "batched": b, "sequential": s, "none": p,
            "speedup_p50": round(s["round_ms"]["p50"] / b["round_ms"]["p50"], 2),
            "vs_none_p50": round(b["round_ms"]["p50"] / p["round_ms"]["p50"], 3),
        })  # fmt: skip
    return report


def format_lora(report: dict[str, Any]) -> str:
    """`report` as lines of text."""
    lines = [
        engine_line(report),
        f"LoRAs {', '.join(f'{k}={v}' for k, v in report['loras'].items())}: rank {report['rank']}, "
        f"{report['layers']} layers",
        "",
        f"{'config':<8}{'p50 ms/step':>14}{'p95 ms/step':>14}{'ms/frame':>12}{'vs none (mean, p50)':>24}",
    ]
    for row in report["runs"]:
        ratio = f"{row['vs_none']:.3f}x, {row['vs_none_p50']:.3f}x" if "vs_none" in row else ""
        lines.append(f"{row['config']:<8}{row['step_ms']['p50']:>14.1f}{row['step_ms']['p95']:>14.1f}"
                     f"{row['ms_per_frame']:>12.1f}{ratio:>24}")  # fmt: skip
    unet = report["unet"]
    lines += [
        "",
        f"UNet call alone, {unet['rows']} rows ({', '.join(unet['loras'])}), p50 ms (x plain); the engine runs "
        f"{unet['strategy']}:",
        f"  plain {unet['plain']['ms']['p50']:.1f}, livediff segmented {unet['segmented']['ms']['p50']:.1f} "
        f"({unet['segmented_vs_plain_p50']:.3f}x), livediff gather {unet['gather']['ms']['p50']:.1f} "
        f"({unet['gather_vs_plain_p50']:.3f}x), livediff dense {unet['dense']['ms']['p50']:.1f} "
        f"({unet['dense_vs_plain_p50']:.3f}x), PEFT adapter_names {unet['peft']['ms']['p50']:.1f} "
        f"({unet['peft_vs_plain_p50']:.3f}x)",
        f"  GFLOP per call (torch's counter): plain {unet['gflop']['plain']:.3f}, gather "
        f"{unet['gflop']['gather']:.3f} ({unet['gather_gflop_vs_plain']:.3f}x: the floor of the LoRA rows' cost), "
        f"dense {unet['gflop']['dense']:.3f}",
        f"  largest difference from PEFT's prediction: segmented {unet['segmented_max_abs_diff_from_peft']:.1e}, "
        f"gather {unet['gather_max_abs_diff_from_peft']:.1e}, dense {unet['dense_max_abs_diff_from_peft']:.1e}",
    ]
    for row in report.get("streams", []):
        b, s, p = row["batched"], row["sequential"], row["none"]
        lines.append(
            f"{row['streams']} streams ({', '.join(row['loras'])}): one step {b['round_ms']['p50']:.1f} ms p50 "
            f"({b['fps']:.1f} fps), one after another {s['round_ms']['p50']:.1f} ms ({s['fps']:.1f} fps): "
            f"{row['speedup_p50']:.2f}x; no LoRAs in one step {p['round_ms']['p50']:.1f} ms: LoRAs cost "
            f"{row['vs_none_p50']:.3f}x"
        )
    return "\n".join(lines)
