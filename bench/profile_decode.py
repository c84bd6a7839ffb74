"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of the fast path
(the same kernels a CUDA graph replays), with the fused elementwise kernels and without them,
the kernels with the most GPU time, printed and written as JSON.

    python bench/profile_decode.py --model llama-1b-dummy --batch 1 256 --context 640 --out DIR
"""
import argparse
import shlex
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib.bench import save_result  # noqa: E402
from course_lib.cuda_graphs import DecodeGraphs  # noqa: E402
from decode_step import decoding_batch  # noqa: E402

STEPS = 5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="a folder for the JSON")
    a = p.parse_args()
    model, cache, rows, per_seq = decoding_batch(a.model, max(a.batch), a.context)
    batches = []
    for fused, b in [(f, b) for f in (True, False) for b in a.batch]:
        model.fused = fused
        eager = DecodeGraphs(model, cache, max(a.batch), per_seq, graphs=False)
        for _ in range(3):
            eager.step(rows[:b])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                eager.step(rows[:b])
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        print(f"--- batch {b}, {STEPS} steps, {'fused' if fused else 'unfused'}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=60))
        batches.append({"batch": b, "fused": fused, "cuda_total_ms": sum(e.self_device_time_total for e in events) / 1e3,
                        "top": [[e.key, e.self_device_time_total / 1e3] for e in events[:a.top]]})
    if a.out:
        name = torch.cuda.get_device_name().lower().replace(" ", "-")
        save_result({"model": a.model, "dtype": str(model.dtype).removeprefix("torch."),
                     "context": a.context, "steps_profiled": STEPS,
                     "device": {"device": torch.cuda.get_device_name()}, "batches": batches},
                    Path(a.out) / f"profile_decode_{a.model}_{name}.json",
                    "python bench/profile_decode.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]))


if __name__ == "__main__":
    main()
