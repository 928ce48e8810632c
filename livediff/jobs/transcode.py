"""A clip through the engine: decode -> batches of frames -> transform -> encode, with progress.

The same driver runs `livediff run` (the transform is `StreamEngine.step`, called here) and a server
job (the transform hands the frames to the scheduler, which runs them beside live sessions). It runs
on a thread of its own; decoding and the RGB conversion run up to two batches ahead on a second thread,
and the YUV conversion and H.264 encoding up to two batches behind on a third (PyAV drops the GIL in
FFmpeg's scaler and codecs, so the three overlap: the clip goes at the pace of the slowest stage, not
the sum of the three).

Batches for throughput: a stream's frames depend on each other only through its temporal state (the
feature bank, motion-aware strength, the similarity filter, a `previous`-frame ControlNet, Stream
Batch's pending latents). Without any, every frame's output depends only on the params and the frame
itself (the stream's noise is fixed by the seed), so the clip runs as `lanes` streams opened with the
same params, frame i on stream i mod lanes, `lanes` frames per step: the output is the one a single
stream would give, up to float rounding. With temporal state, one stream takes every frame in order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from livediff.config import EngineSettings, StreamParams
from livediff.jobs.clip import ClipError, ClipInfo, ClipReader, ClipWriter
from livediff.transport.frames import frame_to_tensor

Batch = list[tuple[int, torch.Tensor]]
"""(pts, (H, W, 3) uint8 frame) pairs of consecutive frames."""
Transform = Callable[[list[tuple[int, torch.Tensor]]], "list[torch.Tensor] | Future[list[torch.Tensor]]"]
"""(lane, (H, W, 3) uint8 frame) pairs, one per lane at most -> the transformed frames, in order, or a future
of them (a job's: the scheduler runs them; see `transcode`'s `in_flight`)."""


class Cancelled(Exception):
    """The transcode stopped because `should_stop` said so (a cancelled job, a server going down)."""


def independent_frames(params: StreamParams, settings: EngineSettings) -> bool:
    """Whether a frame's output depends on nothing but the params and the frame (see the module doc)."""
    return not (
        params.temporal_bank
        or params.motion_strength is not None
        or params.similarity_filter
        or settings.stream_batch
        or any(c.preprocessor == "previous" for c in params.controlnet)
    )


@dataclass
class Progress:
    """Where a transcode stands; handed to the progress callback after every batch."""

    frames_done: int
    frames_total: int
    """Estimated from the container (0: unknown); `frames_done` may pass it on an inexact estimate."""
    elapsed_s: float
    fps: float
    """Frames per second since the start."""

    @property
    def percent(self) -> float:
        if not self.frames_total:
            return 0.0
        return min(100.0, 100.0 * self.frames_done / self.frames_total)

    @property
    def eta_s(self) -> float | None:
        if not self.frames_total or not self.fps:
            return None
        return max(0.0, (self.frames_total - self.frames_done) / self.fps)


def _batches(reader: ClipReader, size: int, width: int, height: int) -> Iterator[Batch]:
    batch: Batch = []
    for frame in reader.frames():
        batch.append((frame.pts, frame_to_tensor(frame.image, width, height)))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(
    items: Iterator[list[tuple[int, torch.Tensor]]], depth: int = 2
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """`items`, produced on a thread of its own up to `depth` ahead; its errors are raised here."""
    slots: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            slots.put(exc)

    thread = threading.Thread(target=produce, name="livediff-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5)


class _Encoder:
    """Writes batches to a `ClipWriter` on a thread of its own, at most `depth` batches behind.

    `put` hands a batch over (blocking while `depth` are pending) and raises the thread's error, if
    any; `finish` waits until every batch is written and raises it; `stop` drops what is pending and
    waits for the thread. The writer is used by this thread alone until `finish` or `stop` returns.
    """

    def __init__(self, writer: ClipWriter, depth: int = 2) -> None:
        self.writer = writer
        self.slots: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="livediff-encode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = self.slots.get()
            if batch is None or self.stopping.is_set():
                return
            try:
                for pts, image in batch:
                    self.writer.write(image.numpy(), pts)
            except BaseException as exc:  # noqa: BLE001 - raised on the transcode's thread
                self.error = exc
                return

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, batch: Batch) -> None:
        while True:
            self._check()
            try:
                self.slots.put(batch, timeout=0.1)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    self._check()
                    raise RuntimeError("the encoder thread ended") from None

    def finish(self) -> None:
        self.slots.put(None)
        self.thread.join()
        self._check()

    def stop(self) -> None:
        self.stopping.set()
        while True:  # drop the pending batches, so that the thread meets the end at once
            try:
                self.slots.get_nowait()
            except queue.Empty:
                break
        try:
            self.slots.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join()


def transcode(
    source: Path,
    output: Path,
    info: ClipInfo,
    transform: Transform,
    lanes: int,
    size: tuple[int, int],
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_encoding: Callable[[], None] | None = None,
    in_flight: int = 1,
) -> int:
    """Transform every frame of `source` into `output` (H.264 MP4 at `size` = (width, height)); the
    number of frames written.

    `lanes` frames go to `transform` at a time, frame i as lane i mod lanes. `output` appears only
    when the whole clip is written (see `ClipWriter`); `should_stop` is asked between batches and
    raises `Cancelled` when it says so; `on_encoding` is called once every frame is transformed, before
    the encoder is flushed and the file finished. Raises `ClipError` for a clip that cannot be decoded.

    A `transform` that answers with a future may have up to `in_flight` batches handed over before the
    oldest is waited for (so the engine finds the next batch waiting, not a hop away); such a transform
    must not give two batches in flight the same streams. A cancelled future raises `Cancelled`; on
    any error the futures still pending are cancelled.
    """
    width, height = size
    started = time.monotonic()
    done = 0
    with ClipReader(source, info) as reader, ClipWriter(output, reader, width, height) as writer:
        encoder = _Encoder(writer)
        pending: deque[tuple[Batch, list[torch.Tensor] | Future[list[torch.Tensor]]]] = deque()

        def settle() -> None:
            nonlocal done
            batch, result = pending.popleft()
            try:
                images = result.result() if isinstance(result, Future) else result
            except FutureCancelled:
                raise Cancelled() from None
            encoder.put([(pts, image) for (pts, _), image in zip(batch, images)])
            done += len(batch)
            if on_progress is not None:
                elapsed = time.monotonic() - started
                on_progress(Progress(done, info.estimated_frames, elapsed, done / elapsed if elapsed > 0 else 0.0))

        try:
            for batch in _prefetch(_batches(reader, lanes, width, height)):
                if should_stop is not None and should_stop():
                    raise Cancelled()
                pending.append((batch, transform([(i, image) for i, (_, image) in enumerate(batch)])))
                while len(pending) >= max(1, in_flight):
                    settle()
            while pending:
                settle()
            if done == 0:
                raise ClipError(f"{source}: the video stream has no frame that decodes")
            if on_encoding is not None:
                on_encoding()
            encoder.finish()
        finally:
            for _, result in pending:  # after an error: withdraw what the engine has not run yet
                if isinstance(result, Future):
                    result.cancel()
            encoder.stop()  # after an error or Ctrl-C: the writer then drops its part file
    return done
