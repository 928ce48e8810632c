"""`livediff run INPUT -o OUTPUT`: a clip through the engine on this machine, no server.

The engine is built from the same flags and loaders as `livediff serve` and `bench` (`cli.engine_settings`);
params come from `--prompt/--steps/--strength`, `--param NAME=VALUE` (the names WHIP's query takes)
and `--params JSON` (the body `PATCH /api/sessions/{id}` takes), checked by the same parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from livediff.config import EngineSettings, StreamParams
from livediff.errors import ConfigError

if TYPE_CHECKING:  # the clip modules import PyAV: `livediff --help` and the GPU kit run without it
    from livediff.jobs.clip import ClipInfo
    from livediff.jobs.transcode import Progress

log = logging.getLogger(__name__)


def add_run_command(commands: Any, add_engine_flags: Any, backend_names: tuple[str, ...], env: Any) -> None:
    """The `run` subcommand on the CLI's subparsers (flags: the engine's, then run's own)."""
    run = commands.add_parser("run", help="transform a video file into an MP4 on this machine (no server)")
    run.add_argument("input", type=Path, help="the clip: any file PyAV (FFmpeg) opens with a video stream")
    run.add_argument("-o", "--output", type=Path, required=True, help="the MP4 to write (H.264, audio copied)")
    add_engine_flags(run)
    run.add_argument(
        "--backend", choices=backend_names, default=env("backend", "auto"), help="runs the networks (as serve's)"
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a stream param by the names a WHIP URL takes (seed=7, guidance=1.5, temporal_bank=2, "
        "controlnet=canny:canny:0.8); repeat for more",
    )
    run.add_argument(
        "--params",
        default="",
        metavar="JSON",
        help='stream params as PATCH /api/sessions/{id} takes them, e.g. \'{"seed": 7, "blend": {...}}\'',
    )
    run.add_argument(
        "--batch",
        type=int,
        default=8,
        help="frames per engine step (throughput; clips whose params keep temporal state run one at a time)",
    )
    run.add_argument("--max-seconds", type=float, default=None, help="refuse clips longer than this (none: any)")


def run_params(args: argparse.Namespace, base: StreamParams) -> StreamParams:
    """`base` (the engine flags' prompt, steps, strength) with --param and --params applied; a
    `ConfigError` naming the flag and the field for a bad one."""
    from livediff.server.params import ParamError, as_query, parse_query, parse_update

    params = base
    try:
        pairs = {}
        for item in args.param:
            name, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--param: {item!r} is not NAME=VALUE")
            pairs[name.strip()] = value
        params, session = parse_update(params, parse_query(pairs))
        if session:
            raise ConfigError(f"--param: {', '.join(session)} is a live-session field, not a clip's")
    except ParamError as exc:  # named as --param takes it (temporal_bank), not as JSON nests it (temporal.bank)
        raise ConfigError(f"--param: {as_query(exc).message}") from None
    if args.params:
        try:
            data = json.loads(args.params)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params: not JSON ({exc})") from None
        try:
            params, session = parse_update(params, data)
        except ParamError as exc:
            raise ConfigError(f"--params: {exc.message}") from None
        if session:
            raise ConfigError(f"--params: {', '.join(session)} is a live-session field, not a clip's")
    return params


class ProgressPrinter:
    """Progress of a run: one line rewritten in place on a terminal, else a plain line every `every_s` s."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < self.every_s:
            return
        self.last = now
        self._print(progress)

    def _print(self, p: Progress) -> None:
        total = f"/{p.frames_total} ({p.percent:.0f}%)" if p.frames_total else ""
        eta = f", ETA {p.eta_s:.0f} s" if p.eta_s is not None else ""
        text = f"livediff: {p.frames_done}{total} frames, {p.fps:.1f} fps{eta}"
        if self.tty:
            self.stream.write("\r" + text.ljust(70))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, p: Progress | None) -> None:
        if p is not None:
            self._print(p)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def cpu_threads(settings: EngineSettings) -> None:
    """On a CPU, torch's threads as `livediff serve` sets them: cores - 1, one core left to the codecs.
    torch's spinning OpenMP threads starve the decoder and encoder threads (and each other) when
    oversubscribed: on the project's loaded 2-core box a batch-4 step of the tiny model at 64x64 ran
    1.4 frames/s with 2 threads and 120 with 1."""
    import os

    import torch

    from livediff.engine.device import resolve_device

    if resolve_device(settings.device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def check_paths(source: Path, output: Path) -> None:
    if output.resolve() == source.resolve():
        raise ConfigError(f"--output: {output} is the input: write the result elsewhere")
    if not output.parent.is_dir():
        raise ConfigError(f"--output: folder {output.parent} does not exist")
    if output.is_dir():
        raise ConfigError(f"--output: {output} is a folder: name a file")


def run_clip(
    source: Path,
    output: Path,
    settings: EngineSettings,
    params: StreamParams,
    batch: int,
    info: ClipInfo | None = None,
    printer: ProgressPrinter | None = None,
) -> dict[str, Any]:
    """Build the engine and transform `source` into `output`; the run's figures (frames, seconds, fps)."""
    from livediff.engine import StreamEngine
    from livediff.jobs.clip import probe
    from livediff.jobs.transcode import independent_frames, transcode

    info = info or probe(source)
    lanes = batch if independent_frames(params, settings) else 1
    settings = settings.replace(max_batch=max(settings.max_batch, lanes))
    cpu_threads(settings)
    engine = StreamEngine(settings)
    try:
        try:
            engine.check_params(params)
        except ConfigError as exc:
            from livediff.server.params import refusal

            raise ConfigError(f"--params: {refusal(exc).message}") from None
        streams = [engine.open_stream(params) for _ in range(lanes)]
        last: list[Progress] = []

        def transform(frames: list[Any]) -> list[Any]:
            return list(engine.step([(streams[lane], image) for lane, image in frames]).outputs)

        def on_progress(p: Progress) -> None:
            last[:] = [p]
            if printer is not None:
                printer(p)

        started = time.monotonic()
        frames = transcode(source, output, info, transform, lanes, (settings.width, settings.height), on_progress)
        elapsed = time.monotonic() - started
        if printer is not None:
            printer.finish(last[0] if last else None)
    finally:
        engine.close()
    return {"frames": frames, "seconds": round(elapsed, 3), "fps": round(frames / elapsed, 2), "lanes": lanes}


def cmd_run(args: argparse.Namespace, settings: EngineSettings, base: StreamParams) -> int:
    if not 1 <= args.batch <= 64:
        raise ConfigError(f"--batch: {args.batch} is out of range 1..64")
    from livediff.models.video import is_video_model

    if is_video_model(settings.model, settings.video_weights):
        raise ConfigError(f"--model: livediff run takes image models; {settings.model!r} is a video model")
    params = run_params(args, base)
    check_paths(args.input, args.output)
    from livediff.jobs.clip import probe

    info = probe(args.input, args.max_seconds)  # a bad clip is said before the model loads
    log.info(
        "%s: %dx%d %s, %s fps, %s frames%s -> %s at %dx%d",
        args.input, info.width, info.height, info.codec, f"{float(info.rate):g}", info.estimated_frames or "?",
        " and audio" if info.audio else "", args.output, settings.width, settings.height,
    )  # fmt: skip
    try:
        report = run_clip(args.input, args.output, settings, params, args.batch, info, ProgressPrinter())
    except KeyboardInterrupt:
        print(f"\nlivediff: interrupted: {args.output} not written", file=sys.stderr)
        return 130
    print(
        f"livediff: wrote {args.output}: {report['frames']} frames in {report['seconds']:.1f} s "
        f"({report['fps']:.1f} fps, {report['lanes']} per step)"
    )
    return 0
