"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of the fast path
(the same kernels a CUDA graph replays), top kernels by GPU time.

    python bench/profile_decode.py --model llama-1b-dummy --batch 1 128 --context 640
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib import models  # noqa: E402
from course_lib.cuda_graphs import DecodeGraphs  # noqa: E402
from course_lib.kv_cache import PagedKVCache  # noqa: E402
from course_lib.llama import Llama  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--context", type=int, default=640)
    a = p.parse_args()
    model = Llama.from_hf(models.load(a.model, dtype="bfloat16", device="cuda").model)
    B, bs = max(a.batch), 16
    per_seq = -(-(a.context + 1) // bs)
    cache = PagedKVCache(model.shape, B * per_seq, bs, model.dtype, "cuda")
    for i in range(B):
        cache.grow(i, a.context + 1)
    rows = [(1, a.context, cache.tables[i]) for i in range(B)]
    eager = DecodeGraphs(model, cache, B, per_seq, graphs=False)
    for b in a.batch:
        for _ in range(3):
            eager.step(rows[:b])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                eager.step(rows[:b])
        print(f"--- batch {b}, 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
