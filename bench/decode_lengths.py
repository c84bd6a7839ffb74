"""The paged decode kernel on sequences of unequal lengths. With many sequences the kernel runs one
program per (sequence, KV head), each walking its whole context: when lengths vary (the lognormal
workload), the longest programs may finish long after the rest. This times one decode step's
attention calls (every layer, one CUDA graph, as ``tune_decode_kernel``) for contexts of equal
lengths and of lognormal lengths with the same mean, the batch in arrival order and sorted longest
first, at several caps on a split's tokens (``longest_split``: a long context in several programs,
a short one's extra splits empty) and ``programs`` targets, as a share of the copy bandwidth.

    python -m bench decode_lengths --batch 128 256 512 --mean 700 --out DIR
"""
import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from bench import command
from bench.tune_decode_kernel import time_ms
from course_lib.bench import save_result
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels.paged_decode import paged_decode, paged_decode_reference
from course_lib.measure.roofline import measure_peaks
from course_lib.model import models
from course_lib.model.kv_cache import PagedKVCache, kv_bytes_per_token
from course_lib.model.llama import LlamaShape


def context_lengths(batch: int, mean: int, kind: str, seed: int = 0, sigma: float = 0.6) -> list:
    """Tokens per sequence, the new one included: all ``mean``, or lognormal around the same
    mean (``sigma`` of the log), at least 16 and at most 6x the mean."""
    if kind == "equal":
        return [mean] * batch
    x = np.random.default_rng(seed).lognormal(0.0, sigma, batch)
    return np.clip(np.round(x / x.mean() * mean), 16, 6 * mean).astype(int).tolist()


def paged_batch(shape, lengths: list, block_size: int = 16, device="cuda", dtype=torch.bfloat16):
    """A paged cache holding ``lengths`` tokens per sequence, grown side by side in turns of one
    block (blocks scattered, as in serving), random keys and values: ``(cache, tables, lengths)``
    as the kernel takes them."""
    blocks = BlockManager(sum(-(-n // block_size) for n in lengths), block_size)
    cache = PagedKVCache(shape, blocks, dtype, device)
    cache.grow_side_by_side(dict(enumerate(lengths)), chunk=block_size)
    for t in cache.k + cache.v:
        t.normal_()
    return (cache, cache.table_tensor(range(len(lengths)), device),
            torch.tensor(lengths, dtype=torch.int32, device=device))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--mean", type=int, default=700, help="mean context tokens per sequence")
    p.add_argument("--programs", type=int, nargs="+", default=[512])
    p.add_argument("--longest-split", type=int, nargs="+", default=[0, 256, 512, 1024],
                   help="tokens per split at most (0: no cap, the library's default)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from transformers import LlamaConfig
    shape = LlamaShape.from_config(LlamaConfig(**models.PRESETS[a.model].config))
    peaks = measure_peaks("cuda", torch.bfloat16)
    rows = []
    for b in a.batch:
        q = torch.randn(b, shape.n_heads, shape.head_dim, dtype=torch.bfloat16, device="cuda")
        for kind in ("equal", "lognormal"):
            lengths = context_lengths(b, a.mean, kind)
            cache, tables, lens = paged_batch(shape, lengths)
            orders = {"arrival": torch.arange(b, device="cuda")}
            if kind == "lognormal":
                orders["longest first"] = torch.argsort(lens, descending=True)
            # the kernel against the reference, on one layer, before timing
            want = paged_decode_reference(q[:8], cache.k[0], cache.v[0], tables[:8], lens[:8], 16)
            got = paged_decode(q[:8], cache.k[0], cache.v[0], tables[:8], lens[:8], 16)
            assert (got.float() - want.float()).abs().max().item() < 2e-2
            kv = kv_bytes_per_token(shape, 2) * sum(lengths) / shape.n_layers   # bytes per call
            for order, idx in orders.items():
                t, n = tables[idx].contiguous(), lens[idx].contiguous()
                for programs, longest in itertools.product(a.programs, a.longest_split):
                    def fn():
                        for layer in range(shape.n_layers):
                            paged_decode(q, cache.k[layer], cache.v[layer], t, n, 16,
                                         programs=programs, longest_split=longest or None)
                    us = time_ms(fn) / shape.n_layers * 1e3
                    share = kv / (us / 1e6) / peaks.bandwidth
                    rows.append({"batch": b, "lengths": kind, "order": order,
                                 "programs": programs, "longest_split": longest,
                                 "max_tokens": max(lengths),
                                 "us_per_call": us, "bandwidth_share": share})
                    print(f"B={b:4d} {kind:9s} {order:13s} programs {programs:6d} "
                          f"longest split {longest or '-':>5}: "
                          f"{us:7.1f} us a call, {share:4.0%} of the copy bandwidth", flush=True)
    if a.out:
        name = torch.cuda.get_device_name().lower().replace(" ", "-")
        save_result({"model": a.model, "mean": a.mean, "device": peaks.__dict__, "rows": rows},
                    Path(a.out) / f"decode_lengths_{a.model}_{name}.json",
                    command("decode_lengths", argv))


if __name__ == "__main__":
    main()
