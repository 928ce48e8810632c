"""`livediff bench --ip-adapter SOURCE`: what per-stream image prompts cost, beside the same engine without.

On one engine (its IP-Adapter from `--ip-adapter`), the configurations taking turns frame by frame
(so that the host's busy spells slow all of them alike):

1. `none`: `plan.batch` streams, no image prompt: the plain step.
2. `image`: the same streams, each with its own reference image at its own scale (1, 0.5, 0.8 ...):
   one UNet call, each row its own image tokens and scale (`livediff.backends.image_prompt`).
3. `half`: every other stream with an image prompt, the rest without (rows without pay nothing).

Each row: ms per step (mean and p50), ms per frame and the ratio to `none`. Then the UNet call
alone, batch `plan.batch`, plain against every row with an image prompt; and what an image change
costs once, off the frame path: the image encoder and projection on one image (ms).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from livediff.bench import BenchPlan, engine_line, percentiles, run_rounds
from livediff.bench_lora import UNetLane
from livediff.config import EngineSettings, ImagePromptParams, StreamParams
from livediff.engine import StreamEngine
from livediff.errors import ConfigError
from livediff.models.ip_adapter import encode_images
from livediff.synthetic import SyntheticCamera

SCALES = (1.0, 0.5, 0.8, 1.2)
"""The streams' image-prompt scales, round robin."""


class ImageLane:
    """Streams, some with an image prompt of their own, all in one step per frame, timed per step."""

    def __init__(self, engine: StreamEngine, base: StreamParams, images: list[torch.Tensor | None], label: str,
                 frames: list[torch.Tensor]) -> None:  # fmt: skip
        self.engine = engine
        self.label = label
        self.frames = frames
        self.streams = []
        for i, image in enumerate(images):
            stream = engine.open_stream(base.replace(seed=base.seed + i))
            if image is not None:
                engine.set_uploaded_image(stream, image)
                engine.update(stream, stream.params.replace(image_prompt=ImagePromptParams("upload", SCALES[i % 4])))
            self.streams.append(stream)
        self.imaged = sum(image is not None for image in images)
        self.step_ms: list[float] = []

    def run(self, index: int, record: bool) -> None:
        started = time.perf_counter()
        self.engine.step([(stream, self.frames[index]) for stream in self.streams])
        if record:
            self.step_ms.append((time.perf_counter() - started) * 1000.0)

    def report(self) -> dict[str, Any]:
        return {
            "config": self.label,
            "with_image": self.imaged,
            "step_ms": percentiles(self.step_ms),
            "ms_per_frame": round(sum(self.step_ms) / (len(self.step_ms) * len(self.streams)), 3),
        }


def unet_comparison(engine: StreamEngine, plan: BenchPlan, images: list[torch.Tensor]) -> dict[str, Any]:
    """The UNet call alone, `plan.batch` rows: plain against each row with its own image and scale."""
    from livediff.backends.image_prompt import IP_EMBEDS, IP_SCALES

    feature = engine.image_feature
    assert feature is not None
    rows = plan.batch
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((rows, *engine.latent_shape), generator=generator).to(engine.device, engine.dtype)
    timesteps = torch.full((rows,), 499.0, device=engine.device)
    embeds = engine.conditioning.get(plan.params.prompt).embeds.expand(rows, -1, -1).contiguous()
    tokens = encode_images(feature.adapter, [images[i % len(images)] for i in range(rows)]).to(
        engine.device, engine.dtype
    )
    values = {IP_EMBEDS: tokens, IP_SCALES: torch.tensor([SCALES[i % 4] for i in range(rows)], device=engine.device)}
    lanes = [
        UNetLane("plain", lambda: engine.backend.unet(latents, timesteps, embeds)),
        UNetLane("image", lambda: engine.backend.unet_with(latents, timesteps, embeds, values)[0]),
    ]
    run_rounds(list(lanes), plan)
    reports = {lane.label: lane.report() for lane in lanes}
    return {"rows": rows, **reports, "image_vs_plain_p50": round(reports["image"]["ms"]["p50"] /
                                                                   reports["plain"]["ms"]["p50"], 3)}  # fmt: skip


def encoder_ms(engine: StreamEngine, image: torch.Tensor, times: int = 5) -> dict[str, float]:
    """What one image change costs once, on the engine's thread: encoder + projection of one image."""
    feature = engine.image_feature
    assert feature is not None
    encode_images(feature.adapter, [image])  # warm
    ms = []
    for _ in range(times):
        started = time.perf_counter()
        encode_images(feature.adapter, [image])
        ms.append((time.perf_counter() - started) * 1000.0)
    return percentiles(ms)


def run_ip_adapter_bench(settings: EngineSettings, plan: BenchPlan) -> dict[str, Any]:
    """One report: the step with and without image prompts, the UNet call both ways, the encoder's cost."""
    if not settings.ip_adapter:
        raise ConfigError("--ip-adapter: name the IP-Adapter to time (a file, a hub id, or tiny)")
    if settings.backend not in ("torch", "cuda-graph"):
        raise ConfigError("bench --ip-adapter times the torch backends (--backend torch or cuda-graph)")
    plan = dataclasses.replace(plan, turn=1)  # lanes alternate frame by frame: a busy spell of the host slows all alike
    engine = StreamEngine(settings)
    frames = [torch.from_numpy(f) for f in SyntheticCamera(settings.height, settings.width).frames(plan.rounds)]
    pictures = [torch.from_numpy(f) for f in SyntheticCamera(320, 240, seed=9).frames(plan.batch)]
    base = plan.params.replace(image_prompt=None)
    lanes = [
        ImageLane(engine, base, [None] * plan.batch, "none", frames),
        ImageLane(engine, base, list(pictures), "image", frames),
        ImageLane(engine, base, [p if i % 2 == 0 else None for i, p in enumerate(pictures)], "half", frames),
    ]
    run_rounds(list(lanes), plan)
    none, *others = (lane.report() for lane in lanes)
    for row in others:
        row["vs_none"] = round(row["ms_per_frame"] / none["ms_per_frame"], 3)
        row["vs_none_p50"] = round(row["step_ms"]["p50"] / none["step_ms"]["p50"], 3)
    feature = engine.image_feature
    assert feature is not None
    return {
        "model": f"{engine.parts.ref} ({engine.parts.revision})",
        "ip_adapter": settings.ip_adapter,
        "tokens": feature.adapter.tokens,
        "layers": len(feature.adapter.layers),
        "backend": engine.backend.name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "size": f"{settings.width}x{settings.height}",
        "batch": plan.batch,
        "steps": len(plan.params.timesteps),
        "runs": [none, *others],
        "unet": unet_comparison(engine, plan, pictures),
        "encoder_ms": encoder_ms(engine, pictures[0]),
    }


def format_ip_adapter(report: dict[str, Any]) -> str:
    """`report` as lines of text."""
    lines = [
        engine_line(report),
        f"IP-Adapter {report['ip_adapter']}: {report['tokens']} image tokens, {report['layers']} "
        "cross-attention layers",
        "",
        f"{'config':<8}{'images':>8}{'p50 ms/step':>14}{'p95 ms/step':>14}{'ms/frame':>12}{'vs none (mean, p50)':>24}",
    ]
    for row in report["runs"]:
        ratio = f"{row['vs_none']:.3f}x, {row['vs_none_p50']:.3f}x" if "vs_none" in row else ""
        lines.append(f"{row['config']:<8}{row['with_image']:>8}{row['step_ms']['p50']:>14.1f}"
                     f"{row['step_ms']['p95']:>14.1f}{row['ms_per_frame']:>12.1f}{ratio:>24}")  # fmt: skip
    unet = report["unet"]
    lines += [
        "",
        f"UNet call alone, {unet['rows']} rows, p50 ms: plain {unet['plain']['ms']['p50']:.1f}, every row with "
        f"its own image and scale {unet['image']['ms']['p50']:.1f} ({unet['image_vs_plain_p50']:.3f}x)",
        f"an image change, once, on the engine's thread (encoder + projection, one image): "
        f"{report['encoder_ms']['p50']:.1f} ms p50",
    ]
    return "\n".join(lines)
