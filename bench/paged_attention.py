"""Packed, paged attention alone, one layer: the gather reference against FlexAttention reading the
blocks in place, and, for decode steps, the course's Triton kernel
(``course_lib/kernels/paged_decode.py``). Same cache, same fragmented block tables, same queries;
the outputs are compared
and each variant is timed (median of events after warm-up on CUDA, of wall time on the CPU).

    python -m bench paged_attention --device cuda --dtype bfloat16 --out bench/results

Cases (llama-1b-dummy's attention shape: 32 query heads, 8 KV heads, head_dim 64):
  decode-B: B sequences with ``context`` tokens cached, one new token each;
  prefill:  4 prompts of 512 tokens in one packed step;
  mixed:    60 decodes and 4 prompt chunks of 512 tokens in one step (chunked prefill's step).
"""
import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import command
from course_lib.bench import save_result
from course_lib.engines.block_manager import BlockManager
from course_lib.engines.model_runner import ATTENTION as PAGED_ATTENTION
from course_lib.measure.roofline import measure_peaks
from course_lib.model.attention import write_cache
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import LlamaShape

SHAPE = LlamaShape(vocab_size=128256, hidden=2048, intermediate=8192, n_layers=1, n_heads=32,
                   n_kv_heads=8, head_dim=64, rope_theta=5e5, eps=1e-5, eos_token_id=0,
                   max_context=131072)


def fragmented_cache(contexts, block_size, dtype, device, spare=1.1):
    """A cache whose sequences grew side by side (as in decoding), so their blocks interleave."""
    n_blocks = int(sum(-(-c // block_size) + 1 for c in contexts) * spare) + 1
    cache = PagedKVCache(SHAPE, BlockManager(n_blocks, block_size), dtype, device)
    for t in cache.k + cache.v:
        t.normal_()
    cache.grow_side_by_side(dict(enumerate(contexts)), chunk=block_size)
    return cache


def timed(fn, device, repeat):
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def kernel_available(device) -> bool:
    """The course's Triton decode kernel runs on CUDA (or on the CPU in Triton's interpreter)."""
    import importlib.util
    import os
    return importlib.util.find_spec("triton") is not None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def case(name, cached, new, block_size, dtype, device, repeat, peak_bw):
    """``cached[i]`` tokens already in the cache and ``new[i]`` new ones, for each sequence i."""
    cache = fragmented_cache([c + n for c, n in zip(cached, new)], block_size, dtype, device)
    seqs = [(i, c, n) for i, (c, n) in enumerate(zip(cached, new))]
    N = sum(new)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N, SHAPE.n_heads, SHAPE.head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(N, SHAPE.n_kv_heads, SHAPE.head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(N, SHAPE.n_kv_heads, SHAPE.head_dim, generator=g, device=device, dtype=dtype)
    # bytes attention must read at least: every visible key and value once
    kv_bytes = sum(c + n for c, n in zip(cached, new)) * 2 * SHAPE.n_kv_heads * SHAPE.head_dim \
        * torch.finfo(dtype).bits // 8
    row = {"case": name, "sequences": len(seqs), "new_tokens": N, "kv_tokens": sum(cached) + N,
           "kv_bytes": kv_bytes, "block_size": block_size}
    outs = {}
    for variant, cls in PAGED_ATTENTION.items():
        attn = cls(cache, seqs, device)
        outs[variant] = attn(0, q, k, v).float()
        row[f"{variant}_s"] = timed(lambda: attn(0, q, k, v), device, repeat)
        row[f"{variant}_setup_s"] = timed(lambda: cls(cache, seqs, device), device,
                                          max(3, repeat // 4))
        row[f"{variant}_bandwidth_share"] = kv_bytes / row[f"{variant}_s"] / peak_bw
    if all(n == 1 for n in new) and kernel_available(device):      # a decode step: Triton
        from course_lib.kernels.paged_decode import paged_decode
        attn = PAGED_ATTENTION["gather"](cache, seqs, device)
        write_cache(cache, 0, attn.slots, k, v)                    # the new K, V, as the others
        tables = cache.table_tensor(range(len(seqs)), device)
        lengths = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32,
                               device=device)
        def run():
            return paged_decode(q, cache.k[0], cache.v[0], tables, lengths, block_size)
        outs["triton"] = run().float()
        row["triton_s"] = timed(run, device, repeat)
        row["triton_bandwidth_share"] = kv_bytes / row["triton_s"] / peak_bw
        row["triton_max_rel_diff"] = ((outs["triton"] - outs["gather"]).abs().max()
                                      / outs["gather"].abs().max()).item()
    ref = outs["gather"]
    err = (outs["flex"] - ref).abs().max().item()
    row["max_abs_diff"] = err
    row["max_rel_diff"] = err / ref.abs().max().item()
    row["speedup"] = row["gather_s"] / row["flex_s"]
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--context", type=int, default=640,
                   help="cached tokens of each decoding sequence")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    peaks = measure_peaks(a.device, dtype)
    bs, C = a.block_size, a.context
    cases = [(f"decode-{B}", [C] * B, [1] * B) for B in a.batch]
    cases += [("prefill", [0] * 4, [512] * 4),
              ("mixed", [C] * 60 + [0] * 4, [1] * 60 + [512] * 4)]
    rows = []
    for name, cached, new in cases:
        rows.append(case(name, cached, new, bs, dtype, device, a.repeat, peaks.bandwidth))
        r = rows[-1]
        print(f"{name:>11} | N={r['new_tokens']:5d} | KV {r['kv_tokens']:6d} tok | gather "
              f"{r['gather_s'] * 1e6:8.0f} us | flex {r['flex_s'] * 1e6:8.0f} us | "
              f"x{r['speedup']:.1f} | flex at {100 * r['flex_bandwidth_share']:.0f}% of copy bw | "
              f"rel diff {r['max_rel_diff']:.1e}" + (
                  f" | triton {r['triton_s'] * 1e6:6.0f} us, "
                  f"{100 * r['triton_bandwidth_share']:.0f}% of copy bw, "
                  f"rel diff {r['triton_max_rel_diff']:.1e}" if "triton_s" in r else ""),
              flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", peaks.device.lower()).strip("-")
    path = Path(a.out) / f"paged_attention_{slug}.json"
    save_result({"dtype": a.dtype, "device": vars(peaks), "shape": vars(SHAPE), "rows": rows}, path,
                command("paged_attention", argv))
    print("wrote", path)


if __name__ == "__main__":
    main()
