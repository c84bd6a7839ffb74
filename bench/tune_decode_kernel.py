"""Tune the paged decode kernel on a GPU: time a decode step's attention calls (one per layer, back
to back, captured in a CUDA graph as the engine runs them, so that Triton's launch cost on the host
does not hide the GPU's time; CUDA events, median after warm-up; reported per call) for each
setting of its knobs (tokens per loop iteration ``block_n``, the number of
programs the split rule aims for, Triton's ``num_warps`` and ``num_stages``) at several batch
sizes, as a share of the measured copy bandwidth. Prints the best setting per batch and the
defaults', and writes JSON.

    python -m bench tune_decode_kernel --context 640 --batch 1 32 128 256 512 --out DIR
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

from bench import command
from bench.decode_step import decoding_cache, events_ms
from course_lib.bench import save_result
from course_lib.kernels.paged_decode import BLOCK_N, PROGRAMS, TRITON_LAUNCH, paged_decode
from course_lib.measure.roofline import measure_peaks
from course_lib.model import models
from course_lib.model.kv_cache import kv_bytes_per_token
from course_lib.model.llama import LlamaShape


def time_ms(fn, repeat=30):
    """Median ms of a replay of ``fn``'s kernels captured in a CUDA graph (after a warm-up)."""
    for _ in range(3):       # compile, warm up
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return events_ms(graph.replay, repeat)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128, 256, 512])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from transformers import LlamaConfig
    shape = LlamaShape.from_config(LlamaConfig(**models.PRESETS[a.model].config))
    peaks = measure_peaks("cuda", torch.bfloat16)
    B, bs = max(a.batch), 16
    # every layer's cache: a step reads each once (one layer's again would be partly in L2)
    cache, _, _ = decoding_cache(shape, B, a.context, bs)
    for t in cache.k + cache.v:
        t.normal_()
    tables = cache.table_tensor(range(B), "cuda")
    lengths = torch.full((B,), a.context + 1, dtype=torch.int64, device="cuda")
    q = torch.randn(B, shape.n_heads, shape.head_dim, dtype=torch.bfloat16, device="cuda")
    knobs = list(itertools.product((32, 64, 128), (512, 1024, 2048), (2, 4, 8), (1, 2, 3)))
    default = (BLOCK_N, PROGRAMS, TRITON_LAUNCH["num_warps"], TRITON_LAUNCH["num_stages"])
    rows = []
    for b in a.batch:
        kv = kv_bytes_per_token(shape, 2) * b * (a.context + 1) / shape.n_layers    # per call
        times = {}
        for block_n, programs, warps, stages in knobs:
            def fn():
                for layer in range(shape.n_layers):   # a step's calls, one per layer
                    paged_decode(q[:b], cache.k[layer], cache.v[layer], tables[:b], lengths[:b],
                                 bs, block_n=block_n, programs=programs, num_warps=warps,
                                 num_stages=stages)
            try:
                times[(block_n, programs, warps, stages)] = time_ms(fn) / shape.n_layers
            except Exception as e:      # a setting Triton cannot compile (too many registers, ...)
                print(f"B={b} {block_n, programs, warps, stages}: {type(e).__name__}")
        best = min(times, key=times.get)
        for k, ms in times.items():
            rows.append({"batch": b, "block_n": k[0], "programs": k[1], "num_warps": k[2],
                         "num_stages": k[3], "ms": ms,
                         "bandwidth_share": kv / (ms / 1e3) / peaks.bandwidth})
        ms_default = times.get(default, float("nan"))
        print(f"B={b:4d}: best {best} {times[best] * 1e3:7.1f} us "
              f"({kv / (times[best] / 1e3) / peaks.bandwidth:.0%} of the copy bandwidth); "
              f"default {default} {ms_default * 1e3:7.1f} us "
              f"({kv / (ms_default / 1e3) / peaks.bandwidth:.0%})", flush=True)
    overall = {k: sum(r["ms"] for r in rows
                      if (r["block_n"], r["programs"], r["num_warps"], r["num_stages"]) == k)
               for k in knobs}
    print("best over all batches (sum of times):", min(overall, key=overall.get),
          "default:", default)
    if a.out:
        name = torch.cuda.get_device_name().lower().replace(" ", "-")
        save_result({"model": a.model, "context": a.context, "device": peaks.__dict__,
                     "rows": rows},
                    Path(a.out) / f"tune_decode_kernel_{a.model}_{name}.json",
                    command("tune_decode_kernel", argv))


if __name__ == "__main__":
    main()
