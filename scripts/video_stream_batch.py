"""The video engine with Stream Batch on and off (`VideoSettings.stream_batch`), same process, same
streams: ms per step, the transformer stage's ms per step, and after how many steps the first frames
come, for 1, 2 and 4 denoising steps and 1 and 2 streams.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/video_stream_batch.py --size 128 [--model tiny-video]
"""

import argparse

from livediff.bench_video import VideoBenchPlan, run_video_bench
from livediff.config import EngineSettings, StreamParams, VideoSettings

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny-video")
parser.add_argument("--size", type=int, default=128)
parser.add_argument("--chunks", type=int, default=8)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()
print("steps  stream_batch  streams  ms/step  transformer ms/step  first frames after (steps)")
for steps in (1, 2, 4):
    for on in (True, False):
        plan = VideoBenchPlan(chunks=args.chunks, streams=(1, 2), params=StreamParams(steps=steps))
        settings = EngineSettings(model=args.model, height=args.size, width=args.size, device=args.device,
                                  video=VideoSettings(stream_batch=on))  # fmt: skip
        for r in run_video_bench(settings, plan)["results"]:
            print(f"{steps:>5}  {'on' if on else 'off':>12}  {r['streams']:>7}  {r['ms_per_step']:>7.1f}  "
                  f"{r['stages_ms']['transformer']:>19.1f}  {r['first_chunk_steps']:>3}", flush=True)  # fmt: skip
