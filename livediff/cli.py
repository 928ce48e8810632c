"""`livediff` command line: one Settings object from flags and `LIVEDIFF_*` environment variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livediff.config import BACKENDS, DTYPES, MAX_STEPS, EngineSettings, StreamParams
from livediff.errors import ConfigError, LivediffError

log = logging.getLogger("livediff")

BACKEND_NAMES = ("auto", "torch", "torch.compile", "onnx", "openvino", "tensorrt")
"""What --backend accepts: `EngineSettings.backend`, with `torch.compile` for the torch backend compiled."""


def _env(name: str, default: Any) -> Any:
    """The default of flag `--name`: `LIVEDIFF_NAME` from the environment when set."""
    return os.environ.get("LIVEDIFF_" + name.upper().replace("-", "_"), default)


def _size(text: str) -> tuple[int, int]:
    """`512` or `WIDTHxHEIGHT`, each a multiple of 8."""
    try:
        width, _, height = text.lower().partition("x")
        w, h = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use 512 or 640x480") from None
    for value in (w, h):
        if value < 64 or value % 8:
            raise argparse.ArgumentTypeError(f"{value} must be a multiple of 8 and at least 64")
    return w, h


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    return parse


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
    group.add_argument("--model", default=_env("model", "auto"),
                       help="auto (sd-turbo on CUDA, tiny on CPU), tiny, sd-turbo-random, a hub id or a folder")
    group.add_argument("--vae", default=_env("vae", "taesd"), help="taesd (fast, default), full, or a VAE id/folder")
    group.add_argument("--device", default=_env("device", "auto"), help="auto, cpu, cuda, cuda:N")
    group.add_argument("--dtype", default=_env("dtype", "auto"), choices=DTYPES,
                       help="auto: float16 on CUDA, bfloat16 for openvino on a CPU with bf16 instructions, "
                       "else float32")
    group.add_argument("--size", type=_size, default=_env("size", "512"), help="512 or WIDTHxHEIGHT, multiples of 8")
    group.add_argument("--max-batch", type=_int_range(1, 64), default=int(_env("max_batch", 4)))
    group.add_argument("--stream-batch", action="store_true", default=_env("stream_batch", "") == "1",
                       help="denoise consecutive frames' steps in one UNet batch")
    group.add_argument("--engines-dir", type=Path, default=Path(_env("engines_dir", "engines")))
    group.add_argument("--steps", type=_int_range(1, MAX_STEPS), default=int(_env("steps", 1)),
                       help=f"denoising steps per frame, 1..{MAX_STEPS}")
    group.add_argument("--strength", type=_unit_interval, default=float(_env("strength", 0.5)))
    group.add_argument("--prompt", default=_env("prompt", StreamParams.prompt))


def engine_settings(args: argparse.Namespace, backend: str = "torch") -> EngineSettings:
    """The engine flags as settings; `backend` is one of BACKEND_NAMES."""
    if backend not in BACKEND_NAMES:
        raise ConfigError(f"--backend: {backend!r} is not one of {', '.join(BACKEND_NAMES)}")
    width, height = args.size if isinstance(args.size, tuple) else _size(args.size)
    return EngineSettings(
        model=args.model, vae=args.vae, device=args.device, dtype=args.dtype, height=height, width=width,
        backend=backend.removesuffix(".compile"), compile=backend == "torch.compile", max_batch=args.max_batch,
        stream_batch=args.stream_batch, engines_dir=args.engines_dir,
    )  # fmt: skip


def stream_params(args: argparse.Namespace) -> StreamParams:
    return StreamParams(prompt=args.prompt, steps=args.steps, strength=args.strength)


# -- commands ------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    if args.g2g:
        return cmd_g2g(args)
    from livediff.bench import BenchPlan, format_report, run_bench

    if args.baseline_dtype and not args.baseline:
        raise ConfigError("--baseline-dtype needs --baseline diffusers")
    names = [name.strip() for name in args.backend.split(",") if name.strip()]
    streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else ()
    args.max_batch = max([args.max_batch, args.batch, *streams])
    settings = [engine_settings(args, backend=name) for name in names]
    plan = BenchPlan(
        frames=args.frames, warmup=args.warmup, batch=args.batch, params=stream_params(args),
        baseline=args.baseline, baseline_dtype=args.baseline_dtype, streams=streams,
    )  # fmt: skip
    report = run_bench(settings, plan)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_g2g(args: argparse.Namespace) -> int:
    import asyncio

    from livediff.g2g import CASES, G2GPlan, format_g2g, run_g2g

    keys = [key.strip() for key in args.cases.split(",") if key.strip()] if args.cases else [c.key for c in CASES]
    known = {case.key: case for case in CASES}
    for key in keys:
        if key not in known:
            raise ConfigError(f"--cases: {key!r} is not one of {', '.join(known)}")
    try:
        viewers = tuple(int(n) for n in args.viewers.split(",") if n.strip())
    except ValueError:
        raise ConfigError(f"--viewers: {args.viewers!r} is not a comma-separated list of counts") from None
    plan = G2GPlan(duration_s=args.duration, fps=args.fps, codec=args.codec, params=stream_params(args),
                   cases=[known[key] for key in keys], viewers=viewers)  # fmt: skip
    settings = engine_settings(args, backend=args.backend.split(",")[0].strip())  # the server runs one backend
    report = asyncio.run(run_g2g(settings, plan))
    print(json.dumps(report, indent=2) if args.json else format_g2g(report))
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from livediff.backends import resolve_backend
    from livediff.backends.build import build_engines
    from livediff.engine.device import resolve_device, resolve_dtype
    from livediff.models import load_model

    settings = engine_settings(args, backend=args.backend)
    device = resolve_device(settings.device)
    settings = settings.replace(backend=resolve_backend(settings.backend, device))  # as `serve` would
    if settings.backend == "torch":  # auto on CUDA, or LIVEDIFF_BACKEND=torch
        print(f"livediff: the torch backend on {device} has nothing to build ahead")
        return 0
    dtype = resolve_dtype(settings.dtype, device, settings.backend)
    parts = load_model(settings.model, device, dtype, vae=settings.vae)
    build_engines(settings, parts, progress=print)
    return 0


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
    group.add_argument("--host", default=_env("host", d.host))
    group.add_argument("--port", type=_int_range(0, 65535), default=int(_env("port", d.port)))
    group.add_argument("--token", default=_env("token", ""), help="require Authorization: Bearer TOKEN on the API")
    group.add_argument("--max-sessions", type=_int_range(1, 1024), default=int(_env("max_sessions", d.max_sessions)))
    group.add_argument("--max-viewers", type=_int_range(0, 1024), default=int(_env("max_viewers", d.max_viewers)))
    group.add_argument("--max-connecting", type=_int_range(1, 1024),
                       default=int(_env("max_connecting", d.max_connecting)),
                       help="peers not connected yet (sessions; viewers per session); when full, the oldest gives way")
    group.add_argument("--max-body-bytes", type=int, default=int(_env("max_body_bytes", d.max_body_bytes)))
    group.add_argument("--ice-servers", default=_env("ice_servers", ""),
                       help="comma-separated stun:/turn: urls for the server's peers and WHIP Link headers")
    group.add_argument("--turn-username", default=_env("turn_username", ""))
    group.add_argument("--turn-credential", default=_env("turn_credential", ""))
    group.add_argument("--video-codecs", default=_env("video_codecs", ",".join(d.video_codecs)),
                       help=f"codec preference, comma separated: {', '.join(VIDEO_CODECS)}")
    group.add_argument("--bitrate", type=int, default=int(_env("bitrate", d.bitrate)), help="video bit/s")
    group.add_argument("--keyframe-interval", type=float,
                       default=float(_env("keyframe_interval", d.keyframe_interval_s)),
                       help="seconds between forced keyframes")
    group.add_argument("--marker-completion", action=argparse.BooleanOptionalAction,
                       default=_env("marker_completion", "1") not in ("0", "false", "no"),
                       help="complete received video frames on the RTP marker bit")
    group.add_argument("--fresh-frames", action=argparse.BooleanOptionalAction,
                       default=_env("fresh_frames", "1") not in ("0", "false", "no"),
                       help="when the model is slower than the camera, wait for fresher frames over stale ones")
    group.add_argument("--ice-loopback", action="store_true", default=_env("ice_loopback", "") == "1",
                       help="gather 127.0.0.1 ICE candidates only (every peer on this machine: measurements)")
    group.add_argument("--connect-timeout", type=float, default=float(_env("connect_timeout", d.connect_timeout_s)))
    group.add_argument("--cpu-threads", type=_int_range(0, 1024), default=int(_env("cpu_threads", 0)),
                       help="torch threads on CPU; 0 = cores - 1 (one core left to the codecs)")
    group.add_argument("--web-dir", type=Path, default=Path(_env("web_dir", str(d.web_dir))))


def server_settings(args: argparse.Namespace) -> Any:
    from livediff.config import ServerSettings

    split = lambda text: tuple(p.strip() for p in text.split(",") if p.strip())  # noqa: E731
    return ServerSettings(
        host=args.host, port=args.port, token=args.token, max_sessions=args.max_sessions,
        max_viewers=args.max_viewers, max_connecting=args.max_connecting, max_body_bytes=args.max_body_bytes,
        ice_servers=split(args.ice_servers),
        turn_username=args.turn_username, turn_credential=args.turn_credential,
        video_codecs=split(args.video_codecs), bitrate=args.bitrate, keyframe_interval_s=args.keyframe_interval,
        marker_completion=args.marker_completion, fresh_frames=args.fresh_frames, ice_loopback=args.ice_loopback,
        connect_timeout_s=args.connect_timeout, cpu_threads=args.cpu_threads, web_dir=args.web_dir,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from livediff.server.serve import serve

    return asyncio.run(serve(engine_settings(args, backend=args.backend), server_settings(args), stream_params(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livediff", description="Real-time video-to-video diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure the engine on synthetic camera frames")
    add_engine_flags(bench)
    bench.add_argument("--backend", default="torch",
                       help=f"one or more of {', '.join(BACKEND_NAMES)}, comma separated")
    bench.add_argument("--frames", type=_int_range(1, 100_000), default=100)
    bench.add_argument("--warmup", type=_int_range(0, 1000), default=5)
    bench.add_argument("--batch", type=_int_range(1, 64), default=1, help="streams per engine step")
    bench.add_argument("--streams", default="", help="e.g. 1,2,4: batched versus sequential streams")
    bench.add_argument("--baseline", choices=["diffusers"], help="also time diffusers' img2img pipeline")
    bench.add_argument("--baseline-dtype", choices=[d for d in DTYPES if d != "auto"],
                       help="the baseline's dtype (default: the engine's --dtype)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    g2g = bench.add_argument_group("glass-to-glass (--g2g): a real server and aiortc client over loopback")
    g2g.add_argument("--g2g", action="store_true",
                     help="measure glass-to-glass latency (passthrough and model, marker completion on/off)")
    g2g.add_argument("--duration", type=float, default=10.0, help="seconds measured per case, after a 1.5 s warm-up")
    g2g.add_argument("--fps", type=_int_range(1, 120), default=30, help="camera frames per second")
    g2g.add_argument("--codec", type=str.upper, choices=["VP8", "H264"], default="VP8")
    g2g.add_argument("--viewers", default="0",
                     help="WHEP viewers of each case's session, e.g. 0,16: each case runs once per count")
    g2g.add_argument("--cases", default="",
                     help="comma separated, default all: pass-both, pass-server, pass-stock, model-both, model-stock")
    bench.set_defaults(run=cmd_bench)

    build = commands.add_parser("build-engines", help="export/compile the networks into the engine cache")
    add_engine_flags(build)
    build.add_argument("--backend", choices=[b for b in BACKENDS if b != "torch"], default=_env("backend", "auto"),
                       help="what to build for; auto: what `serve --backend auto` runs (also LIVEDIFF_BACKEND)")
    build.set_defaults(run=cmd_build_engines)

    serve = commands.add_parser("serve", help="run the WebRTC service (demo page, /offer, WHIP, WHEP, API)")
    add_engine_flags(serve)
    serve.add_argument("--backend", choices=BACKEND_NAMES, default=_env("backend", "auto"),
                       help="runs the networks; auto: openvino (else onnx) on the CPU, torch on CUDA "
                       "(also LIVEDIFF_BACKEND)")
    add_server_flags(serve)
    serve.set_defaults(run=cmd_serve)

    models = commands.add_parser("models", help="list the models livediff can run here")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # livediff's own progress at INFO; other libraries' INFO chatter (the ONNX exporter's graph
    # rewrites, every ICE candidate pair) only with --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _quiet_libraries()
    try:
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
