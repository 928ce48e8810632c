"""`--video-weights` at full size: a bfloat16 file of Wan 2.1 1.3B's shape in Wan's original layout,
nested as StreamDiffusionV2 nests it (`{"generator_ema": {"model.blocks.0.self_attn.q.weight": ...}}`),
loaded into `wan-1.3b-random`'s configuration: seconds, peak resident memory, and whether every
tensor equals the file's. The original names come from the tests' table of Wan's module names
(`tests/test_video_weights.py`). Needs about 3 GiB of disk in FOLDER and 8 GiB of memory to write.

    PYTHONPATH=. python scripts/video_weights_load.py FOLDER
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

parser = argparse.ArgumentParser()
parser.add_argument("folder", type=Path)
parser.add_argument("--load", action="store_true", help="(internal) the loading half, in a fresh process")
args = parser.parse_args()
path = args.folder / "model.pt"
if not args.load:
    from test_video_weights import original_layout_of

    from livediff.models.wan import WAN_1_3B, build_transformer

    args.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_transformer(WAN_1_3B)
    print(f"wan-1.3b-random at random weights: {time.perf_counter() - started:.1f} s")
    state = {k: v.to(torch.bfloat16) for k, v in original_layout_of(model).items()}
    torch.save({"generator_ema": {f"model.{k}": v for k, v in state.items()}}, path)
    torch.save(state, args.folder / "reference.pt")
    print(f"wrote {path}: {path.stat().st_size / 2**30:.2f} GiB, {len(state)} tensors")
    del model, state
    sys.exit(subprocess.call([sys.executable, __file__, str(args.folder), "--load"]))

from livediff.models.video import load_video_model  # noqa: E402

started = time.perf_counter()
parts = load_video_model("wan-1.3b-random", dtype=torch.bfloat16, weights=str(path))
took = time.perf_counter() - started
# this process's own high-water mark (getrusage's would count the writing parent's: kept across exec)
peak = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM")) / 2**20  # fmt: skip
print(f"load_video_model('wan-1.3b-random', weights={path}): {took:.1f} s, peak RSS {peak:.2f} GiB")
reference = torch.load(args.folder / "reference.pt", mmap=True, weights_only=True)
from livediff.models.wan_weights import to_diffusers  # noqa: E402

loaded = parts.transformer.model.state_dict()
expected = to_diffusers(reference)
equal = set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
print(f"every tensor equal to the file's: {equal} ({len(loaded)} tensors)")
