"""Clips made by the tests with PyAV: real H.264/AAC MP4s, audio-only files, huge and broken ones."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def make_clip(path: Path, frames: int = 12, size: tuple[int, int] = (96, 64), rate: int = 24,
              audio: bool = True) -> Path:  # fmt: skip
    """An H.264 MP4 of `frames` frames (a bar sweeping right) at `rate` fps, with a second of AAC
    audio when `audio`."""
    width, height = size
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            image = np.full((height, width, 3), 40, np.uint8)
            image[:, (i * 5) % width :] = (200, 120, 30)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            tone = np.sin(np.linspace(0, 2000, 16000, dtype=np.float32))[None]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            for packet in [*sound.encode(frame), *sound.encode()]:
                out.mux(packet)
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        sound = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*sound.encode(frame), *sound.encode()]:
            out.mux(packet)
    return path


def make_huge(path: Path, side: int = 10000) -> Path:
    """One side x side MJPEG frame in Matroska (cheap to make: a flat frame compresses to little)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mjpeg", rate=1)
        video.width, video.height, video.pix_fmt = side, side, "yuvj420p"
        frame = av.VideoFrame(side, side, "yuvj420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*video.encode(frame), *video.encode()]:
            out.mux(packet)
    return path


def video_facts(path: Path) -> dict[str, object]:
    """What the tests compare: size, rate, time base, every frame's pts, the audio packets' bytes."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        facts: dict[str, object] = {
            "codec": video.codec_context.name,
            "size": (video.codec_context.width, video.codec_context.height),
            "rate": video.average_rate,
            "time_base": video.time_base,
            "pts": [frame.pts for frame in container.decode(video=0)],
        }
    with av.open(str(path)) as container:
        facts["audio"] = [bytes(p) for p in container.demux(audio=0) if p.size] if container.streams.audio else None
    return facts


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
