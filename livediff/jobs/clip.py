"""Clip files in and out, with PyAV: what a clip is (`probe`), its frames (`decode`), and the MP4 written
from the transformed frames (`ClipWriter`: H.264 at the input's frame timestamps, audio packets copied).

A clip that cannot be used is a `ClipError` whose message names the problem in one line (an empty
file, a text file named .mp4, no video stream, a frame larger than `MAX_SIDE`, longer than a limit):
the CLI prints it, a job fails with it as a permanent error, the HTTP route answers it as a 422.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from livediff.errors import LivediffError

MAX_SIDE = 8192
"""Widest and tallest input frame accepted, in pixels (8K UHD is 7680x4320); a larger one is refused
before any frame is decoded: one 10000x10000 RGB frame alone is 300 MB."""
FALLBACK_RATE = Fraction(30)
"""Frames per second assumed for a stream that states none (then its frames are also timed by it)."""


class ClipError(LivediffError):
    """A clip that cannot be used: the message says why, in one line. Always permanent (a retry
    reads the same bytes)."""


@dataclass(frozen=True)
class ClipInfo:
    """What `probe` found in a clip."""

    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    rate: Fraction
    """Frames per second (the stream's average rate; `FALLBACK_RATE` when it states none)."""
    time_base: Fraction
    """Seconds per tick of the video stream's timestamps."""
    frames: int
    """Frames the container says the stream has; 0 when it does not say (then estimated from the duration)."""
    duration_s: float
    """Length in seconds (the stream's or the container's; 0 when neither says)."""
    codec: str
    """The video codec's name (h264, vp9 ...)."""
    audio: bool
    """Whether there is an audio stream (copied unchanged into the output)."""

    @property
    def estimated_frames(self) -> int:
        """`frames`, else duration x rate (0 when unknown): the denominator of progress."""
        return self.frames or int(round(self.duration_s * float(self.rate)))


def _open(path: Path) -> Any:
    if not path.is_file():
        raise ClipError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ClipError(f"{path}: the file is empty")
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise ClipError(f"{path}: not a video file PyAV can open ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).strip().rstrip(".").replace("\n", " ")


def probe(path: Path, max_seconds: float | None = None) -> ClipInfo:
    """The clip's video facts, or `ClipError` naming what is wrong with it.

    Checks: the file exists and is not empty, a container FFmpeg recognises, a video stream, a decoder
    for its codec, a frame size within `MAX_SIDE`, a length within `max_seconds` (when given), and at
    least one frame that decodes (a truncated or corrupt file often opens but has none).
    """
    with _open(path) as container:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams at all"
            raise ClipError(f"{path}: no video stream (has {kinds})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width > MAX_SIDE or height > MAX_SIDE:
            raise ClipError(f"{path}: frame size {width}x{height} is over the limit of {MAX_SIDE} pixels a side")
        rate = Fraction(stream.average_rate or stream.guessed_rate or FALLBACK_RATE)
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        if max_seconds is not None and duration > max_seconds:
            raise ClipError(f"{path}: the clip is {duration:.1f} s long, over the limit of {max_seconds:g} s")
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise ClipError(f"{path}: the video does not decode ({_reason(exc)})") from None
        if first is None:
            raise ClipError(f"{path}: the video stream has no frame that decodes (truncated or corrupt)")
        width, height = first.width, first.height
        if width > MAX_SIDE or height > MAX_SIDE:
            raise ClipError(f"{path}: frame size {width}x{height} is over the limit of {MAX_SIDE} pixels a side")
        return ClipInfo(
            width=width, height=height, rate=rate, time_base=Fraction(stream.time_base or Fraction(1, 90000)),
            frames=int(stream.frames or 0), duration_s=duration, codec=ctx.name, audio=bool(container.streams.audio),
        )  # fmt: skip


@dataclass
class Frame:
    """One decoded video frame and its place in time."""

    image: Any
    """The decoded `av.VideoFrame`, as the decoder gave it."""
    pts: int
    """Presentation time in `ClipInfo.time_base` ticks (the input's; made up from the rate when missing)."""
    index: int
    """0-based position in the clip."""


class ClipReader:
    """Decodes a clip's video frames in order; audio packets are kept for `ClipWriter` (copied as they are).

    Use as a context manager; `frames()` yields `Frame`s. A decode error part-way raises `ClipError`.
    """

    def __init__(self, path: Path, info: ClipInfo) -> None:
        self.path = path
        self.info = info
        self.container = _open(path)
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        self.audio_packets: collections.deque[Any] = collections.deque()
        """Audio packets met so far, not yet taken by the writer (`take_audio`); the decoder's thread
        appends and the encoder's takes (a deque's append and popleft are thread-safe)."""

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def frames(self) -> Iterator[Frame]:
        ticks_per_frame = 1 / (self.info.rate * self.info.time_base)
        index, last_pts = 0, None
        streams = [self.video] + ([self.audio] if self.audio is not None else [])
        try:
            for packet in self.container.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None:  # the demuxer's flush packet has none
                        self.audio_packets.append(packet)
                    continue
                for image in packet.decode():
                    pts = image.pts
                    if pts is None or (last_pts is not None and pts <= last_pts):
                        pts = round(index * ticks_per_frame) if last_pts is None else last_pts + round(ticks_per_frame)
                    last_pts = pts
                    yield Frame(image, int(pts), index)
                    index += 1
        except av.FFmpegError as exc:
            if index == 0:
                raise ClipError(f"{self.path}: the video does not decode ({_reason(exc)})") from None
            # a truncated tail: the frames before it are kept, as players show them

    def take_audio(self) -> list[Any]:
        packets = []
        while True:
            try:
                packets.append(self.audio_packets.popleft())
            except IndexError:
                return packets


class ClipWriter:
    """Writes an H.264 MP4 (yuv420p) at `width` x `height`, each frame at the input's timestamp, with the
    reader's audio stream copied packet for packet.

    Writes to `<output>.part` and renames it to `output` in `close()`; `abort()` (or an exception inside
    the `with`) removes the part file, so an interrupted run never leaves a half-written `output`.
    """

    def __init__(self, output: Path, reader: ClipReader, width: int, height: int, crf: int = 20) -> None:
        self.output = output
        self.part = output.with_name(output.name + ".part")
        self.container = av.open(str(self.part), "w", format="mp4")
        try:
            self.video = self.container.add_stream("libx264", rate=reader.info.rate)
            self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
            self.video.time_base = reader.info.time_base
            self.video.codec_context.time_base = reader.info.time_base
            self.video.options = {"crf": str(crf), "preset": "veryfast"}
            self.audio = None
            if reader.audio is not None:
                self.audio = self.container.add_stream_from_template(reader.audio)
        except Exception:
            self.abort()
            raise
        self.reader = reader
        self.frames = 0
        self.reformatter = av.video.reformatter.VideoReformatter()
        """Kept across frames: FFmpeg's scaler context is made once, not per frame."""

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, rgb: np.ndarray, pts: int) -> None:
        """One (H, W, 3) uint8 RGB frame at `pts` (input time base), then any audio read so far."""
        frame = self.reformatter.reformat(av.VideoFrame.from_ndarray(rgb, format="rgb24"), format="yuv420p")
        frame.pts = pts
        frame.time_base = self.reader.info.time_base
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.frames += 1
        self._copy_audio()

    def _copy_audio(self) -> None:
        for packet in self.reader.take_audio():
            if self.audio is None:
                continue
            packet.stream = self.audio
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, finish the file and move it to `output`."""
        try:
            for packet in self.video.encode(None):
                self.container.mux(packet)
            self._copy_audio()
            self.container.close()
        except Exception:
            self.abort()
            raise
        os.replace(self.part, self.output)

    def abort(self) -> None:
        """Drop the part file (after Ctrl-C or an error); `output` is left as it was."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the file is removed either way
            pass
        self.part.unlink(missing_ok=True)
