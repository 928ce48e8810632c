"""What recording costs a live session: the only work on the event loop (`Track.offer`, a put in a bounded
queue) and how many frames a second the encoder thread takes (libx264 veryfast, 512x512) before it drops.

    PYTHONPATH=. python scripts/recording_cost.py
"""

import pathlib
import tempfile
import time

import av
import numpy as np

from livediff.jobs.recording import Track

rng = np.random.default_rng(0)
base = rng.integers(0, 255, (512, 512, 3), np.uint8)
frames = [
    av.VideoFrame.from_ndarray(np.roll(base, i * 4, axis=1), format="rgb24").reformat(format="yuv420p")
    for i in range(60)
]
with tempfile.TemporaryDirectory() as d:
    # encoder throughput: frames fed at the pace the queue takes them (offer only when there is room)
    t = Track(pathlib.Path(d) / "a.mp4", "output")
    start = time.perf_counter()
    for i in range(300):
        while t._queue.full():
            time.sleep(0.001)
        t.offer(frames[i % 60])
    t.finish()
    took = time.perf_counter() - start
    print(f"encoder: {t.frames} frames 512x512 in {took:.2f} s = {t.frames / took:.1f} fps, dropped {t.dropped}")
    # the cost on the event loop: one offer() call
    t = Track(pathlib.Path(d) / "b.mp4", "output")
    start = time.perf_counter()
    n = 2000
    for i in range(n):
        t.offer(frames[i % 60])
    per = (time.perf_counter() - start) / n * 1e6
    t.finish()
    print(f"offer(): {per:.1f} us per call over {n} calls ({t.frames} encoded, {t.dropped} dropped)")
