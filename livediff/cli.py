"""`livediff` command line: one Settings object from flags and `LIVEDIFF_*` environment variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livediff.admission import CONNECT_GRACE_S
from livediff.config import BACKENDS, DTYPES, LIVE_SIZE, MAX_STEPS, EngineSettings, StreamParams, VideoSettings
from livediff.errors import ConfigError, LivediffError

log = logging.getLogger("livediff")

IMAGE_BENCH_WARMUP = 5
"""`bench --warmup` for image models when not given (frames)."""
BACKEND_NAMES = (
    "auto",
    "torch",
    "torch.compile",
    "cuda-graph",
    "cuda-graph-compiled",
    "cuda-graph-fused-norm",
    "cuda-graph-compiled-fp8",
    "onnx",
    "openvino",
    "tensorrt",
)
"""What --backend accepts: `EngineSettings.backend`, with `torch.compile` for the torch backend compiled."""


def _env(name: str, default: Any) -> Any:
    """The default of flag `--name`: `LIVEDIFF_NAME` from the environment when set."""
    return os.environ.get("LIVEDIFF_" + name.upper().replace("-", "_"), default)


def _size(text: str) -> tuple[int, int] | str:
    """`auto`, `512` or `WIDTHxHEIGHT`, each a multiple of 8; `auto` is resolved with the device."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        width, _, height = text.lower().partition("x")
        w, h = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use auto, 512 or 640x480") from None
    for value in (w, h):
        if value < 64 or value % 8:
            raise argparse.ArgumentTypeError(f"{value} must be a multiple of 8 and at least 64")
    return w, h


def _number_range(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` within [low, high], else an error saying which and why."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{value:g} is out of range {low:g}..{high:g}"
                if kind is float
                else f"{value} is out of range {low}..{high}"
            )
        return value

    return parse


def _int_range(low: int, high: int) -> Callable[[str], int]:
    return _number_range(int, low, high)


def _float_range(low: float, high: float) -> Callable[[str], float]:
    return _number_range(float, low, high)


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (each flag also reads LIVEDIFF_<FLAG>)")
    group.add_argument(
        "--model",
        default=_env("model", "auto"),
        help="auto (sd-turbo on CUDA, tiny on CPU), tiny, sd-turbo-random, a hub id, a folder or a single-file "
        "SD 1.x/SD-Turbo .safetensors checkpoint (see --model-config); causal video "
        "models: tiny-video, wan-1.3b-random, a causal Wan folder or hub id, or a Wan 2.1 T2V base with "
        "--video-weights (docs/video-models.md)",
    )
    group.add_argument(
        "--model-config",
        default=_env("model_config", ""),
        metavar="FOLDER_OR_ID",
        help="for a single-file --model (.safetensors): the diffusers config that describes it; default: "
        "stable-diffusion-v1-5/stable-diffusion-v1-5 for SD 1.x files, stabilityai/sd-turbo for SD 2.x",
    )
    group.add_argument("--vae", default=_env("vae", "taesd"), help="taesd (fast), full, or a VAE id/folder")
    group.add_argument("--device", default=_env("device", "auto"), help="auto, cpu, cuda, cuda:N")
    group.add_argument(
        "--dtype",
        default=_env("dtype", "auto"),
        choices=DTYPES,
        help="auto: float16 on CUDA (bfloat16 for video models), bfloat16 for openvino and video models on a "
        "CPU with bf16 instructions, else float32",
    )
    group.add_argument(
        "--size",
        type=_size,
        default=_env("size", "auto"),
        help="frame size, 512 or WIDTHxHEIGHT (multiples of 8); auto: what the device runs live, "
        f"{LIVE_SIZE['cuda']} on CUDA, {LIVE_SIZE['cpu']} on a CPU",
    )
    group.add_argument(
        "--max-batch",
        type=_int_range(1, 64),
        default=_env("max_batch", 4),
        help="most frames (one per session) in one engine step",
    )
    group.add_argument(
        "--stream-batch",
        action="store_true",
        default=_env("stream_batch", "") == "1",
        help="denoise consecutive frames' steps in one UNet batch",
    )
    group.add_argument(
        "--engines-dir",
        type=Path,
        default=Path(_env("engines_dir", "engines")),
        help="the compiled-engine cache (ONNX files, OpenVINO blobs, TensorRT plans)",
    )
    group.add_argument(
        "--feature-bank",
        action=argparse.BooleanOptionalAction,
        default=_env("feature_bank", "") in ("1", "true", "yes"),
        help="make the temporal feature bank available to sessions (their `temporal` param); "
        "compiled backends build a second UNet graph for it",
    )
    group.add_argument(
        "--controlnet",
        action="append",
        metavar="NAME[=SOURCE]",
        help="a ControlNet sessions may name (their `controlnet` param), loaded when first named; "
        "SOURCE: a hub id, a folder, or tiny / sd-turbo-random (built in, random weights), and "
        "with no SOURCE the model's built-in one; repeat or comma separate for more (also "
        "LIVEDIFF_CONTROLNET). bench: each NAME is a control image to time (canny, depth, previous)",
    )
    group.add_argument(
        "--lora",
        action="append",
        metavar="NAME=SOURCE",
        help="a LoRA sessions may apply (their `loras` param), loaded at start; SOURCE: a .safetensors "
        "file (diffusers or kohya keys), a folder, a hub id, or tiny / random:RANK (built in, random); "
        "repeat or comma separate for more (also LIVEDIFF_LORA)",
    )
    group.add_argument(
        "--lcm-lora",
        default=_env("lcm_lora", ""),
        metavar="SOURCE",
        help="an LCM-LoRA fused into the model at start, with the LCM scheduler: makes an SD 1.5 checkpoint "
        "few-step (latent-consistency/lcm-lora-sdv1-5); a .safetensors file, a folder, a hub id, or tiny "
        "(built in, random)",
    )
    group.add_argument(
        "--video-autoencoder",
        choices=["auto", "tae", "wan-vae"],
        default=_env("video_autoencoder", "auto"),
        help="a video model's autoencoder: tae (fast), wan-vae (Wan 2.1's VAE, streamed), auto: wan-vae "
        "for a checkpoint with a vae/, else tae",
    )
    group.add_argument(
        "--video-weights",
        default=_env("video_weights", ""),
        metavar="FILE",
        help="causal Wan transformer weights in Wan's original layout (StreamDiffusionV2's, CausVid's, "
        "Self-Forcing's model.pt): a file or a hub file owner/name:path/in/repo.pt; --model is then the "
        "Wan 2.1 T2V base (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) that gives its config, text encoder and VAE",
    )
    group.add_argument(
        "--video-autoencoder-weights",
        default=_env("video_autoencoder_weights", "auto"),
        metavar="SOURCE",
        help="the tae autoencoder's weights: auto (TAEHV's trained madebyollin/taehv:taew2_1.pth for a real "
        "checkpoint, random for a built-in), random, or a TAEHV .pth/.safetensors file or hub file "
        "(owner/name:FILE); a file makes --video-autoencoder auto pick tae",
    )
    defaults = VideoSettings()
    group.add_argument(
        "--video-sink",
        type=_int_range(0, 8),
        default=_env("video_sink", defaults.sink),
        metavar="N",
        help="a video model's cache: latent frames kept for good from a stream's start (attention sinks), 0-8",
    )
    group.add_argument(
        "--video-window",
        type=_int_range(MAX_STEPS, 64),
        default=_env("video_window", defaults.window),
        metavar="N",
        help=f"a video model's cache: the most recent latent frames kept after the sinks, {MAX_STEPS}-64 "
        "(each holds 4 camera frames)",
    )
    group.add_argument(
        "--video-shift",
        type=_float_range(0.1, 20.0),
        default=_env("video_shift", defaults.shift),
        metavar="S",
        help="a video model's flow-matching timestep shift, 0.1-20: 5 as Wan 2.1 samples; 1 for weights "
        "trained on an unwarped schedule (StreamDiffusionV2's, CausVid's)",
    )
    group.add_argument(
        "--ip-adapter",
        default=_env("ip_adapter", ""),
        metavar="SOURCE",
        help="the IP-Adapter sessions' image prompts use (their `image_prompt` param), loaded at start; "
        "SOURCE: a .safetensors file with its image_encoder folder beside it, a hub id (owner/name or "
        "owner/name:FILE), or tiny (built in, random). bench: time image prompts against plain",
    )
    group.add_argument(
        "--depth-model",
        default=_env("depth_model", ""),
        help="the depth estimator of the `depth` control image: a transformers depth-estimation "
        "hub id (depth-anything/Depth-Anything-V2-Small-hf), a folder, or tiny (built in, random)",
    )
    group.add_argument(
        "--steps",
        type=_int_range(1, MAX_STEPS),
        default=_env("steps", 1),
        help=f"denoising steps per frame, 1..{MAX_STEPS}",
    )
    group.add_argument(
        "--strength",
        type=_unit_interval,
        default=_env("strength", 0.5),
        help="how far each frame is noised before denoising, (0, 1]: 0.5 keeps the layout",
    )
    group.add_argument(
        "--prompt", default=_env("prompt", StreamParams.prompt), help="the prompt new sessions start with"
    )


def engine_settings(args: argparse.Namespace, backend: str = "torch") -> EngineSettings:
    """The engine flags as settings; `backend` is one of BACKEND_NAMES."""
    if backend not in BACKEND_NAMES:
        raise ConfigError(f"--backend: {backend!r} is not one of {', '.join(BACKEND_NAMES)}")
    size = args.size if isinstance(args.size, tuple) else _size(str(args.size))
    if not isinstance(size, tuple):  # auto
        size = args.size = _live_size(args.device)  # resolved once: bench builds settings per backend
    width, height = size
    return EngineSettings(
        model=args.model, vae=args.vae, device=args.device, dtype=args.dtype, height=height, width=width,
        backend=backend.removesuffix(".compile"), compile=backend == "torch.compile", max_batch=args.max_batch,
        stream_batch=args.stream_batch, engines_dir=args.engines_dir, feature_bank=args.feature_bank,
        controlnets=controlnet_entries(args), depth_model=args.depth_model, loras=lora_entries(args),
        lcm_lora=args.lcm_lora, model_config=args.model_config,
        video_autoencoder=args.video_autoencoder, video_weights=getattr(args, "video_weights", ""),
        video_autoencoder_weights=getattr(args, "video_autoencoder_weights", "auto"),
        ip_adapter=getattr(args, "ip_adapter", ""),
        video=VideoSettings(sink=args.video_sink, window=args.video_window, shift=args.video_shift),
    )  # fmt: skip


def controlnet_entries(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """--controlnet (or LIVEDIFF_CONTROLNET) as (name, source) pairs; a NAME alone takes the model's
    built-in ControlNet (`tiny`, `sd-turbo-random`), which only the built-in models have."""
    from livediff.models.controlnet import BUILDERS as BUILTIN_CONTROLNETS

    texts = args.controlnet if args.controlnet else [_env("controlnet", "")]
    entries = []
    for item in (part.strip() for text in texts for part in text.split(",")):
        if not item:
            continue
        name, _, source = item.partition("=")
        if not source:
            model = "tiny" if args.model == "auto" and _live_device(args.device) == "cpu" else args.model
            if model not in BUILTIN_CONTROLNETS:
                raise ConfigError(f"--controlnet: {item!r} names no source: give NAME=SOURCE (a hub id or a folder); "
                                  f"only the built-in models ({', '.join(BUILTIN_CONTROLNETS)}) have a built-in "
                                  "ControlNet")  # fmt: skip
            source = model
        entries.append((name.strip(), source.strip()))
    return tuple(entries)


def lora_entries(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """--lora (or LIVEDIFF_LORA) as (name, source) pairs; `ConfigError` naming the flag for an entry without both."""
    texts = getattr(args, "lora", None) or [_env("lora", "")]
    entries = []
    for item in (part.strip() for text in texts for part in text.split(",")):
        if not item:
            continue
        name, _, source = item.partition("=")
        if not name.strip() or not source.strip():
            raise ConfigError(f"--lora: {item!r} is not NAME=SOURCE (SOURCE: a .safetensors file, a folder, a hub id, "
                              "tiny or random:RANK)")  # fmt: skip
        entries.append((name.strip(), source.strip()))
    return tuple(entries)


def _live_device(device_name: str) -> str:
    from livediff.engine.device import resolve_device

    return resolve_device(device_name).type


def _live_size(device_name: str) -> tuple[int, int]:
    """`--size auto`: the size the device runs live (`LIVE_SIZE`), said in the log."""
    from livediff.engine.device import resolve_device

    device = resolve_device(device_name)
    side = LIVE_SIZE["cuda" if device.type == "cuda" else "cpu"]
    hint = "" if side >= LIVE_SIZE["cuda"] else f"; --size {LIVE_SIZE['cuda']} for the full size, at a lower frame rate"
    log.info("--size auto picked %dx%d (device %s%s)", side, side, device, hint)
    return side, side


def stream_params(args: argparse.Namespace) -> StreamParams:
    return StreamParams(prompt=args.prompt, steps=args.steps, strength=args.strength)


# -- commands ------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    if args.g2g:
        return cmd_g2g(args)
    from livediff.models.video import is_video_model

    if is_video_model(args.model, getattr(args, "video_weights", "")):
        return cmd_bench_video(args)
    if args.quality:
        return cmd_bench_quality(args)
    if args.controlnet:
        return cmd_bench_controlnet(args)
    if args.jobs:
        return cmd_bench_jobs(args)
    if getattr(args, "lora", None):
        return cmd_bench_lora(args)
    if getattr(args, "ip_adapter", ""):
        return cmd_bench_ip_adapter(args)
    if args.temporal:
        raise ConfigError("--temporal needs --quality")
    from livediff.bench import BenchPlan, format_report, run_bench

    if args.baseline_dtype and not args.baseline:
        raise ConfigError("--baseline-dtype needs --baseline diffusers")
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else ()
    args.max_batch = max([args.max_batch, args.batch, *streams])
    settings = [engine_settings(args, backend=name) for name in names]
    plan = BenchPlan(
        frames=args.frames, warmup=_warmup_frames(args), batch=args.batch, params=stream_params(args),
        baseline=args.baseline, baseline_dtype=args.baseline_dtype, streams=streams,
    )  # fmt: skip
    report = run_bench(settings, plan)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _warmup_frames(args: argparse.Namespace) -> int:
    """An image bench's `--warmup` frames (its default when the flag is not given)."""
    return IMAGE_BENCH_WARMUP if args.warmup is None else int(args.warmup)


def video_warmup_chunks(frames: int | None) -> int:
    """A video bench's warm-up in chunks for `--warmup` frames: whole chunks of 4 frames, at least
    `MIN_VIDEO_WARMUP_CHUNKS` (a one-line note on stderr naming the flag when a shorter one is raised).
    Fewer chunks would time a stream's first 4-frame chunks while its cache still grows and the
    4-frame path still initialises, which made one stream look slower than it is."""
    from livediff.bench_video import MIN_VIDEO_WARMUP_CHUNKS

    if frames is None:
        return MIN_VIDEO_WARMUP_CHUNKS
    chunks = -(-frames // 4)
    if chunks < MIN_VIDEO_WARMUP_CHUNKS:
        least = MIN_VIDEO_WARMUP_CHUNKS * 4
        print(f"livediff: --warmup {frames} is under {MIN_VIDEO_WARMUP_CHUNKS} chunks for a video model; "
              f"warming up {least} frames ({MIN_VIDEO_WARMUP_CHUNKS} chunks)", file=sys.stderr)  # fmt: skip
        return MIN_VIDEO_WARMUP_CHUNKS
    return chunks


def cmd_bench_video(args: argparse.Namespace) -> int:
    """`bench --model tiny-video` (a causal video model): ms per chunk and frame by stage, fps, first
    chunk latency and memory per stream, for each --streams count (`livediff.bench_video`)."""
    from livediff.bench_video import VideoBenchPlan, format_video_report, run_video_bench

    for flag, value in (("--baseline", args.baseline), ("--quality", args.quality), ("--controlnet", args.controlnet)):
        if value:
            raise ConfigError(f"{flag} is for image models; a video model's bench takes --streams, --frames, --steps")
    if args.backend not in ("torch", "auto", "torch.compile", "cuda-graph", "cuda-graph-compiled"):
        raise ConfigError(
            f"--backend: video models run on torch (eager, torch.compile or cuda-graph), got {args.backend!r}"
        )
    streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else (args.batch,)
    args.max_batch = max([args.max_batch, *streams])
    plan = VideoBenchPlan(chunks=max(1, args.frames // 4), warmup=video_warmup_chunks(args.warmup), streams=streams,
                          params=stream_params(args))  # fmt: skip
    settings = engine_settings(args, backend=args.backend)
    if settings.width % 16 or settings.height % 16:
        raise ConfigError(f"--size must be a multiple of 16 for a video model, got {settings.width}x{settings.height}")
    report = run_video_bench(settings, plan)
    print(json.dumps(report, indent=2) if args.json else format_video_report(report))
    return 0


def cmd_bench_jobs(args: argparse.Namespace) -> int:
    """`bench --jobs`: `livediff run`'s path against the engine, and a job's cost to live sessions
    (`livediff.jobs.bench`)."""
    from livediff.jobs.bench import format_jobs_report, run_jobs_bench

    batch = max(args.batch, 4)
    args.max_batch = max(args.max_batch, batch)
    settings = engine_settings(args, backend=args.backend.split(",")[0].strip())
    report = run_jobs_bench(settings, args.frames, batch, 2, args.fps, args.duration, stream_params(args))
    print(json.dumps(report, indent=2) if args.json else format_jobs_report(report))
    return 0


def cmd_bench_lora(args: argparse.Namespace) -> int:
    """`bench --lora a=random:16,b=...`: the step with per-stream LoRAs against none, the UNet call
    against PEFT's mixed batch, and `--streams N` with a LoRA each, batched against one by one."""
    from livediff.bench import BenchPlan
    from livediff.bench_lora import format_lora, run_lora_bench

    if args.baseline:
        raise ConfigError("--lora compares LoRAs on one engine; leave out --baseline")
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    if len(names) != 1:
        raise ConfigError("--lora times one --backend (torch or cuda-graph)")
    streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else ()
    args.max_batch = max([args.max_batch, args.batch, *streams])
    plan = BenchPlan(frames=args.frames, warmup=_warmup_frames(args), batch=args.batch, params=stream_params(args))
    report = run_lora_bench(engine_settings(args, backend=names[0]), plan, streams=streams)
    print(json.dumps(report, indent=2) if args.json else format_lora(report))
    return 0


def cmd_bench_ip_adapter(args: argparse.Namespace) -> int:
    """`bench --ip-adapter SOURCE`: the step with per-stream image prompts against none, the UNet
    call both ways, and an image change's encoder time (`livediff.bench_ip_adapter`)."""
    from livediff.bench import BenchPlan
    from livediff.bench_ip_adapter import format_ip_adapter, run_ip_adapter_bench

    if args.baseline:
        raise ConfigError("--ip-adapter compares image prompts on one engine; leave out --baseline")
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    if len(names) != 1:
        raise ConfigError("--ip-adapter times one --backend (torch or cuda-graph)")
    args.max_batch = max(args.max_batch, args.batch)
    plan = BenchPlan(frames=args.frames, warmup=args.warmup, batch=args.batch, params=stream_params(args))
    report = run_ip_adapter_bench(engine_settings(args, backend=names[0]), plan)
    print(json.dumps(report, indent=2) if args.json else format_ip_adapter(report))
    return 0


DEFAULT_TEMPORAL = ('{"bank": 1}', '{"bank": 2}')
"""What `bench --quality` compares with the baseline when no --temporal is given."""


def temporal_configs(args: argparse.Namespace) -> list[Any]:
    """The baseline (the stream params, temporal features off), then one config per --temporal JSON
    object, parsed as the live `temporal` param is."""
    from livediff.bench_quality import QualityConfig
    from livediff.server.params import ParamError, parse_update

    base = stream_params(args).replace(temporal_bank=0, motion_strength=None)
    configs = [QualityConfig("off (baseline)", base)]
    for text in args.temporal or DEFAULT_TEMPORAL:
        try:
            value = json.loads(text)
            params, _ = parse_update(base, {"temporal": value})
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--temporal: {text!r} is not JSON ({exc})") from None
        except ParamError as exc:
            raise ConfigError(f"--temporal: {exc.message}") from None
        label = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
        configs.append(QualityConfig(label, params))
    return configs


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from livediff.bench import BenchPlan
    from livediff.bench_quality import format_quality, run_quality

    if args.baseline or args.streams:
        raise ConfigError("--quality compares temporal settings on one engine; leave out --baseline and --streams")
    configs = temporal_configs(args)
    args.feature_bank = args.feature_bank or any(c.params.temporal_bank for c in configs)
    args.max_batch = max(args.max_batch, args.batch)
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    settings = [engine_settings(args, backend=name) for name in names]
    plan = BenchPlan(frames=args.frames, warmup=_warmup_frames(args), batch=args.batch, params=configs[0].params)
    report = run_quality(settings, plan, configs)
    print(json.dumps(report, indent=2) if args.json else format_quality(report))
    return 0


def cmd_bench_controlnet(args: argparse.Namespace) -> int:
    """`bench --controlnet canny,depth`: each control image's ControlNet against ControlNet off, per backend."""
    from livediff.bench import BenchPlan
    from livediff.bench_controlnet import format_controlnet, run_controlnet_bench
    from livediff.config import PREPROCESSORS
    from livediff.models.depth import BUILTINS as BUILTIN_DEPTH

    if args.baseline or args.batch != 1:
        raise ConfigError("--controlnet compares ControlNets on one engine; leave out --baseline and --batch")
    entries = controlnet_entries(args)
    for name, _ in entries:
        if name not in PREPROCESSORS:
            raise ConfigError(f"--controlnet: bench names control images ({', '.join(PREPROCESSORS)}), not {name!r}")
    if "depth" in dict(entries) and not args.depth_model:
        if args.model not in ("auto", "tiny", "sd-turbo-random"):
            raise ConfigError("--depth-model: name the depth estimator for --controlnet depth (a hub id or a folder)")
        args.depth_model = BUILTIN_DEPTH[0]
    streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else ()
    args.max_batch = max([args.max_batch, *streams])
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    settings = [engine_settings(args, backend=name) for name in names]
    plan = BenchPlan(frames=args.frames, warmup=_warmup_frames(args), params=stream_params(args))
    report = run_controlnet_bench(settings, plan, streams=streams)
    print(json.dumps(report, indent=2) if args.json else format_controlnet(report))
    return 0


def cmd_g2g(args: argparse.Namespace) -> int:
    import asyncio

    from livediff.g2g import CASES, G2GPlan, format_g2g, run_g2g

    if args.cluster and args.cases == "all":
        args.cases = "model-both,pass-both"  # each target's server runs one marker setting
    every = not args.cases or args.cases == "all"
    keys = [c.key for c in CASES] if every else [key.strip() for key in args.cases.split(",") if key.strip()]
    known = {case.key: case for case in CASES}
    for key in keys:
        if key not in known:
            raise ConfigError(f"--cases: {key!r} is not one of {', '.join(known)}")
    if args.cluster and any(not known[key].server_marker for key in keys):
        raise ConfigError(
            "--cluster runs the servers with marker completion on: choose --cases among "
            + ", ".join(c.key for c in CASES if c.server_marker)
        )
    try:
        viewers = tuple(int(n) for n in args.viewers.split(",") if n.strip())
    except ValueError:
        raise ConfigError(f"--viewers: {args.viewers!r} is not a comma-separated list of counts") from None
    plan = G2GPlan(duration_s=args.duration, fps=args.fps, codec=args.codec, params=stream_params(args),
                   cases=[known[key] for key in keys], viewers=viewers)  # fmt: skip
    settings = engine_settings(args, backend=args.backend.split(",")[0].strip())  # the server runs one backend
    if args.cluster:
        from livediff.cluster.bench import format_cluster_bench, run_cluster_bench

        report = asyncio.run(run_cluster_bench(settings, plan, replicas=args.cluster))
        print(json.dumps(report, indent=2) if args.json else format_cluster_bench(report))
        return 0
    report = asyncio.run(run_g2g(settings, plan))
    print(json.dumps(report, indent=2) if args.json else format_g2g(report))
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from livediff.backends import resolve_backend
    from livediff.backends.build import build_engines
    from livediff.engine.device import resolve_device, resolve_dtype
    from livediff.models.loading import load_engine_model

    settings = engine_settings(args, backend=args.backend)
    device = resolve_device(settings.device)
    settings = settings.replace(backend=resolve_backend(settings.backend, device, settings.engines_dir))  # as serve
    if settings.backend == "torch":  # auto on CUDA, or LIVEDIFF_BACKEND=torch
        print(f"livediff: the torch backend on {device} has nothing to build ahead")
        return 0
    dtype = resolve_dtype(settings.dtype, device, settings.backend)
    parts = load_engine_model(settings, device, dtype)
    build_engines(settings, parts, progress=print)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`livediff run INPUT -o OUTPUT`: see `livediff.jobs.run`."""
    from livediff.jobs.run import cmd_run as run

    args.max_batch = max(args.max_batch, args.batch)
    return run(args, engine_settings(args, backend=args.backend), stream_params(args))


def cmd_models(args: argparse.Namespace) -> int:
    from livediff.models import BUILDERS, DEFAULT_MODEL
    from livediff.models.builtin import BUILDER_VERSION, cache_root

    print("built in (random weights, no download):")
    for name in BUILDERS:
        folder = cache_root() / "models" / f"{name}-v{BUILDER_VERSION}"
        print(f"  {name:<20} {'cached at ' + str(folder) if folder.exists() else 'built on first use'}")
    print(f"default on CUDA: {DEFAULT_MODEL} (VAE madebyollin/taesd); on CPU: tiny")
    print("in the Hugging Face cache:")
    try:
        from huggingface_hub import scan_cache_dir

        repos = sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # noqa: BLE001 - no cache folder yet
        repos = []
    print("\n".join(f"  {repo}" for repo in repos) or "  (none)")
    return 0


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    from livediff.config import VIDEO_CODECS, ServerSettings

    d = ServerSettings()
    group = parser.add_argument_group("server (each flag also reads LIVEDIFF_<FLAG>)")
    group.add_argument("--host", default=_env("host", d.host), help="address to listen on; 0.0.0.0 for other machines")
    group.add_argument(
        "--port",
        type=_int_range(0, 65535),
        default=_env("port", d.port),
        help="TCP port to listen on (0: any free port, in the URL printed when ready)",
    )
    group.add_argument(
        "--token",
        default=_env("token", ""),
        help="require Authorization: Bearer TOKEN on the signalling, API, viewer and metrics routes",
    )
    group.add_argument(
        "--max-sessions",
        type=_int_range(1, 1024),
        default=_env("max_sessions", d.max_sessions),
        help="publishing sessions at once; beyond it /offer and /whip answer 503 with Retry-After",
    )
    group.add_argument(
        "--max-viewers",
        type=_int_range(0, 1024),
        default=_env("max_viewers", d.max_viewers),
        help="WHEP viewers per session; beyond it /whep answers 503 with Retry-After",
    )
    group.add_argument(
        "--max-connecting",
        type=_int_range(1, 1024),
        default=_env("max_connecting", d.max_connecting),
        help=f"peers not connected yet at once, within the limits above; one not connected {CONNECT_GRACE_S:g} s "
        "after its answer gives its slot to a newer offer",
    )
    group.add_argument(
        "--max-body-bytes",
        type=_int_range(1024, 16 * 1024 * 1024),
        default=_env("max_body_bytes", d.max_body_bytes),
        help="largest request body (SDP, JSON: larger ones get 413) and data-channel control "
        "message (larger ones get an error message)",
    )
    group.add_argument(
        "--tls",
        choices=["self-signed"],
        default=_env("tls", None),
        help="serve https with a certificate made for this machine's names (kept in --state-dir)",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("tls_cert", None),
        help="serve https with this PEM certificate (chain); with --tls-key",
    )
    group.add_argument("--tls-key", type=Path, default=_env("tls_key", None), help="the PEM key of --tls-cert")
    group.add_argument(
        "--state-dir",
        type=Path,
        default=_env("state_dir", None),
        help="folder of livediff's state, e.g. the self-signed certificate in its tls/ "
        "(default: ~/.local/state/livediff)",
    )
    group.add_argument(
        "--cors-origins",
        default=_env("cors_origins", ""),
        help="comma-separated origins (https://app.example) whose pages may use the API, "
        "WHIP and WHEP, or *; none by default",
    )
    group.add_argument(
        "--ice-servers",
        default=_env("ice_servers", ""),
        help="comma-separated stun:/turn: urls for the server's peers, the pages and WHIP/WHEP Link headers",
    )
    group.add_argument(
        "--turn-secret",
        default=_env("turn_secret", ""),
        help="the TURN server's shared secret (coturn static-auth-secret): each client gets a short-lived credential",
    )
    group.add_argument(
        "--turn-ttl",
        type=_int_range(60, 7 * 86400),
        default=_env("turn_ttl", 86400),
        help="seconds a short-lived TURN credential stays valid",
    )
    group.add_argument(
        "--turn-username",
        default=_env("turn_username", ""),
        help="static TURN username for every client (prefer --turn-secret)",
    )
    group.add_argument(
        "--turn-credential",
        default=_env("turn_credential", ""),
        help="static TURN password for every client (prefer --turn-secret)",
    )
    group.add_argument(
        "--nat-1to1",
        default=_env("nat_1to1", ""),
        help="public address(es) mapped 1:1 to this host (PUBLIC_IP or PRIVATE_IP=PUBLIC_IP, "
        "comma separated): advertised in the server's ICE candidates",
    )
    group.add_argument(
        "--video-codecs",
        default=_env("video_codecs", ",".join(d.video_codecs)),
        help=f"codec preference, comma separated: {', '.join(VIDEO_CODECS)}",
    )
    group.add_argument(
        "--bitrate", type=_int_range(100_000, 50_000_000), default=_env("bitrate", d.bitrate), help="video bit/s"
    )
    group.add_argument(
        "--keyframe-interval",
        type=_float_range(0.1, 60),
        default=_env("keyframe_interval", d.keyframe_interval_s),
        help="seconds between forced keyframes",
    )
    group.add_argument(
        "--marker-completion",
        action=argparse.BooleanOptionalAction,
        default=_env("marker_completion", "1") not in ("0", "false", "no"),
        help="complete received video frames on the RTP marker bit",
    )
    group.add_argument(
        "--fresh-frames",
        action=argparse.BooleanOptionalAction,
        default=_env("fresh_frames", "1") not in ("0", "false", "no"),
        help="when the model is slower than the camera, wait for fresher frames over stale ones",
    )
    group.add_argument(
        "--batch-by-deadline",
        action=argparse.BooleanOptionalAction,
        default={"": None, "0": False, "false": False, "no": False}.get(_env("batch_by_deadline", ""), True),
        help="batch only as many frames as keep every stream's frame interval (default: on CUDA)",
    )
    group.add_argument(
        "--ice-loopback",
        action="store_true",
        default=_env("ice_loopback", "") == "1",
        help="gather 127.0.0.1 ICE candidates only (every peer on this machine: measurements)",
    )
    group.add_argument(
        "--connect-timeout",
        type=_float_range(1, 600),
        default=_env("connect_timeout", d.connect_timeout_s),
        help="seconds a peer may take to connect after its answer before it is reaped",
    )
    group.add_argument(
        "--cpu-threads",
        type=_int_range(0, 1024),
        default=_env("cpu_threads", 0),
        help="torch threads on CPU; 0 = cores - 1 (one core left to the codecs)",
    )
    group.add_argument(
        "--web-dir",
        type=Path,
        default=Path(_env("web_dir", str(d.web_dir))),
        help="the pages' folder (index.html, latency.html, view.html)",
    )


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    from livediff.cluster.settings import LOCAL, ClusterSettings

    d = ClusterSettings()
    group = parser.add_argument_group(
        "cluster (--cluster: one entry point, replicas on Ray Serve; each flag also reads LIVEDIFF_<FLAG>)"
    )
    group.add_argument(
        "--cluster",
        nargs="?",
        const=LOCAL,
        default=_env("cluster", None),
        metavar="ADDRESS",
        help="serve through Ray Serve: one engine replica per GPU behind this entry point; "
        "ADDRESS: local (a Ray started here; the default), auto (the cluster this machine "
        "belongs to, or $RAY_ADDRESS) or HOST:PORT of a Ray head",
    )
    group.add_argument(
        "--min-replicas",
        type=_int_range(0, 4096),
        default=_env("min_replicas", d.min_replicas),
        help="replicas kept when no session runs",
    )
    group.add_argument(
        "--max-replicas",
        type=_int_range(0, 4096),
        default=_env("max_replicas", d.max_replicas),
        help="most replicas; 0: one per GPU of the cluster (1 on a cluster without GPUs)",
    )
    group.add_argument(
        "--target-sessions",
        type=_float_range(0, 1024),
        default=_env("target_sessions", d.target_sessions),
        help="sessions per replica above which a replica is added; 0: 3/4 of --max-sessions",
    )
    group.add_argument(
        "--replica-gpus",
        type=_float_range(-1, 64),
        default=_env("replica_gpus", d.replica_gpus),
        help="GPUs per replica; -1: 1 on CUDA, else 0",
    )
    group.add_argument(
        "--replica-cpus",
        type=_float_range(0.01, 1024),
        default=_env("replica_cpus", d.replica_cpus),
        help="CPU cores per replica (a CPU replica's torch threads)",
    )
    group.add_argument(
        "--drain-timeout",
        type=_float_range(1, 7 * 86400),
        default=_env("drain_timeout", d.drain_timeout_s),
        help="seconds a replica being scaled down lets its sessions run before it ends them",
    )


def cluster_settings(args: argparse.Namespace) -> Any:
    from livediff.cluster.settings import ClusterSettings

    return ClusterSettings(
        address=args.cluster, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_sessions=args.target_sessions, replica_gpus=args.replica_gpus, replica_cpus=args.replica_cpus,
        drain_timeout_s=args.drain_timeout,
    )  # fmt: skip


def server_settings(args: argparse.Namespace) -> Any:
    from livediff.config import ServerSettings

    split = lambda text: tuple(p.strip() for p in text.split(",") if p.strip())  # noqa: E731
    if args.tls not in (None, "", "self-signed"):  # from LIVEDIFF_TLS: argparse checks only the flag
        raise ConfigError(f"--tls: {args.tls!r} is not self-signed (bring a certificate with --tls-cert, --tls-key)")
    return ServerSettings(
        host=args.host, port=args.port, token=args.token, max_sessions=args.max_sessions,
        max_viewers=args.max_viewers, max_connecting=args.max_connecting, max_body_bytes=args.max_body_bytes,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_self_signed=args.tls == "self-signed",
        state_dir=args.state_dir, cors_origins=split(args.cors_origins), ice_servers=split(args.ice_servers),
        turn_username=args.turn_username, turn_credential=args.turn_credential, turn_secret=args.turn_secret,
        turn_ttl_s=args.turn_ttl, nat_1to1=split(args.nat_1to1),
        video_codecs=split(args.video_codecs), bitrate=args.bitrate, keyframe_interval_s=args.keyframe_interval,
        marker_completion=args.marker_completion, fresh_frames=args.fresh_frames, ice_loopback=args.ice_loopback,
        connect_timeout_s=args.connect_timeout, cpu_threads=args.cpu_threads, web_dir=args.web_dir,
        batch_by_deadline=args.batch_by_deadline,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from livediff.server.listen import bind
    from livediff.server.startup import print_loading

    if args.cluster:
        return cmd_serve_cluster(args)
    sockets = bind(args.host, args.port)  # first: a busy port is said at once, before anything loads
    print_loading()
    try:
        _quiet_libraries()
        from livediff.server.serve import serve

        settings = server_settings(args)
        engine = engine_settings(args, backend=args.backend)
        from livediff.jobs.flags import jobs_settings

        jobs = jobs_settings(args)
        return asyncio.run(
            serve(engine, settings, stream_params(args), sockets=sockets, started=args.started, jobs=jobs)
        )
    finally:
        for sock in sockets:
            sock.close()


def cmd_serve_cluster(args: argparse.Namespace) -> int:
    from livediff.server.listen import bind

    cluster, server = cluster_settings(args), server_settings(args)  # bad flags are said before anything starts
    for sock in bind(args.host, args.port):  # a busy port is said at once; Serve's proxy binds it later
        sock.close()
    _quiet_libraries()
    from livediff.cluster.run import serve_cluster
    from livediff.jobs.flags import jobs_settings

    jobs = jobs_settings(args) if args.jobs_db else None  # a cluster's jobs need the shared store
    if jobs is None:
        print("livediff: no jobs in this cluster (they need a shared store: --jobs-db postgresql://...)", flush=True)
    return serve_cluster(
        engine_settings(args, backend=args.backend),
        server,
        stream_params(args),
        cluster,
        started=args.started,
        jobs=jobs,
    )


_SECRETS = ("token", "turn_credential", "turn_secret")
"""Flags whose value --help must not print (it may come from the environment)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default: `on`/`off` for switches, `none` for an empty value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        said = "%(default)" in text or "(default: " in text  # `(default: on CUDA)` is not told twice
        if said or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        if default in (None, ""):
            shown: Any = "none"
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, float):
            shown = f"{default:g}"  # 3600, not 3600.0
        elif action.dest in _SECRETS:
            shown = "set, not shown"
        else:
            shown = default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line naming the flag and the fix, not a page of usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the command's parser, which knows the flags to suggest
            self._commands().get(str(getattr(parsed, "command", "")), self).error(
                "unrecognized arguments: " + " ".join(extras)
            )
        return parsed

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {self._explain(message)}\n")

    def _explain(self, message: str) -> str:
        if message.startswith("the following arguments are required: command"):
            names = ", ".join(self._commands())
            return f"name a command: {names} (`{self.prog} COMMAND --help` lists its flags)"
        if message.startswith("unrecognized arguments: "):
            return self._unrecognized(message.removeprefix("unrecognized arguments: ").split())
        flag = message.removeprefix("argument ").partition(":")[0]
        variable = "LIVEDIFF_" + flag.removeprefix("--").upper().replace("-", "_")
        if message.startswith("argument --") and variable in os.environ:
            message += f" ({variable} is {os.environ[variable]!r})"
        return message

    def _unrecognized(self, words: list[str]) -> str:
        import difflib

        known = [s for action in self._actions for s in action.option_strings]
        flag = next((w.partition("=")[0] for w in words if w.startswith("-")), words[0])
        close = difflib.get_close_matches(flag, known, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unrecognized argument {flag} ({hint}`{self.prog} --help` lists the flags)"

    def _commands(self) -> dict[str, _Parser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="livediff", description="Real-time video-to-video diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure the engine on synthetic camera frames")
    add_engine_flags(bench)
    bench.add_argument("--backend", default="torch", help=f"one or more of {', '.join(BACKEND_NAMES)}, comma separated")
    bench.add_argument("--frames", type=_int_range(1, 100_000), default=100, help="frames measured per configuration")
    bench.add_argument(
        "--warmup",
        type=_int_range(0, 1000),
        default=None,
        help=f"frames run before measuring (default {IMAGE_BENCH_WARMUP}; a video model: 8, 2 chunks)",
    )
    bench.add_argument("--batch", type=_int_range(1, 64), default=1, help="streams per engine step")
    bench.add_argument("--streams", default="", help="e.g. 1,2,4: batched versus sequential streams")
    bench.add_argument("--baseline", choices=["diffusers"], help="also time diffusers' img2img pipeline")
    bench.add_argument(
        "--baseline-dtype",
        choices=[d for d in DTYPES if d != "auto"],
        help="the baseline's dtype; none: the engine's --dtype",
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    quality = bench.add_argument_group("temporal quality (--quality): warp error, flicker and SSIM beside ms/frame")
    quality.add_argument(
        "--quality",
        action="store_true",
        help="run a camera with moving and still regions through the baseline (temporal features "
        "off) and each --temporal setting, on each --backend",
    )
    quality.add_argument(
        "--temporal",
        action="append",
        metavar="JSON",
        help='a live `temporal` param to compare, e.g. \'{"bank": 2, "weight": 1.5}\' or '
        '\'{"motion_strength": [0.3, 0.6]}\'; repeat for more; none: {"bank": 1} and {"bank": 2}',
    )
    bench.add_argument(
        "--jobs",
        action="store_true",
        help="clips: `livediff run`'s frames per second against the engine's batched best (--frames, "
        "--batch at least 4), and what one job costs 2 live sessions at --fps over --duration s",
    )
    g2g = bench.add_argument_group("glass-to-glass (--g2g): a real server and aiortc client over loopback")
    g2g.add_argument(
        "--g2g",
        action="store_true",
        help="measure glass-to-glass latency (passthrough and model, marker completion on/off)",
    )
    g2g.add_argument(
        "--duration", type=_float_range(1, 3600), default=10.0, help="seconds measured per case, after a 1.5 s warm-up"
    )
    g2g.add_argument("--fps", type=_int_range(1, 120), default=30, help="camera frames per second")
    g2g.add_argument("--codec", type=str.upper, choices=["VP8", "H264"], default="VP8", help="the camera's codec")
    g2g.add_argument(
        "--viewers", default="0", help="WHEP viewers of each case's session, e.g. 0,16: each case runs once per count"
    )
    g2g.add_argument(
        "--cases",
        default="all",
        help="all, or comma separated: pass-both, pass-server, pass-stock, model-both, model-stock",
    )
    g2g.add_argument(
        "--cluster",
        type=_int_range(0, 64),
        default=0,
        metavar="N",
        help="also through a local Ray Serve cluster of N replicas (livediff serve --cluster), "
        "after a single server, same run: session set-up, first frame, glass-to-glass, and "
        "8 sessions offered at once",
    )
    bench.set_defaults(run=cmd_bench)

    build = commands.add_parser("build-engines", help="export/compile the networks into the engine cache")
    add_engine_flags(build)
    build.add_argument(
        "--backend",
        choices=[b for b in BACKENDS if b != "torch"],
        default=_env("backend", "auto"),
        help="what to build for; auto: what `serve --backend auto` runs (also LIVEDIFF_BACKEND)",
    )
    build.set_defaults(run=cmd_build_engines)

    serve = commands.add_parser("serve", help="run the WebRTC service (demo page, /offer, WHIP, WHEP, API)")
    add_engine_flags(serve)
    serve.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=_env("backend", "auto"),
        help="runs the networks; auto: openvino (else onnx) on the CPU; on CUDA the fastest variant the GPU kit "
        "measured matching here (engines/backend-choice.json), else cuda-graph (also LIVEDIFF_BACKEND); "
        "video models (tiny-video, wan-*) run on torch: auto picks eager on a CPU and cuda-graph (the step "
        "compiled and replayed) on CUDA; the exported CPU backends are not for them",
    )
    add_server_flags(serve)
    from livediff.jobs.flags import add_jobs_flags

    add_jobs_flags(serve, _env, _int_range, _float_range)
    add_cluster_flags(serve)
    serve.set_defaults(run=cmd_serve)

    from livediff.jobs.run import add_run_command

    add_run_command(commands, add_engine_flags, BACKEND_NAMES, _env)
    commands.choices["run"].set_defaults(run=cmd_run)

    models = commands.add_parser("models", help="list the models livediff can run here")
    models.set_defaults(run=cmd_models)
    return parser


class _Elapsed(logging.Formatter):
    """Log lines start with the seconds since the command started (how long a start-up step took)."""

    def __init__(self, started: float) -> None:
        super().__init__("%(message)s")
        self.offset = started - time.monotonic() + time.time()  # `started` on the records' clock

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"[{record.created - self.offset:6.1f} s] {super().formatMessage(record)}"


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started
    # livediff's own progress at INFO; other libraries' INFO chatter (the ONNX exporter's graph
    # rewrites, every ICE candidate pair) only with --verbose.
    handler = logging.StreamHandler()
    handler.setFormatter(_Elapsed(started))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[handler])
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.run is not cmd_serve:  # serve binds its port first
            _quiet_libraries()
        return int(args.run(args))
    except LivediffError as exc:
        print(f"livediff: error: {exc}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """diffusers and transformers log progress bars and config notes that mean nothing to users."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
