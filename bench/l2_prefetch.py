"""The decode step's projections at small batch, with the next projection's weights read into the
L2 cache on a second stream while the current one runs. Each projection of llama-1b-dummy (8-67
MB) is too small for one cuBLAS call to reach the copy bandwidth: it spends microseconds filling
and draining the card. A small kernel beside it that touches the next weights (loads kept in L2)
moves no extra bytes from HBM, and the next call then reads them from L2.

    python -m bench l2_prefetch --out DIR [--batches 1 16 64 128]

All 16 layers' four projections (bf16, random weights, each layer its own) run one after the
other in one CUDA graph: cuBLAS alone, and cuBLAS with a prefetch of the next projection's
weights (any, at most 32 MB of them; or only the thin q/k/v and o) by ``programs`` Triton
programs, forked when each call starts. The touch kernel alone is timed on 32 MB too. Prints a
table per batch, writes ``l2_prefetch.json``.
"""
import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench import command
from bench.thin_gemv import graph_ms

LAYERS = 16
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
PROGRAMS = (16, 32, 66)
# which next weights are prefetched: any, up to 32 MB of them; or only the thin ones (q/k/v, o)
TARGETS = {"any, 32 MB": (set(SHAPES), 32), "q/k/v and o": ({"qkv", "o"}, 32)}


@triton.jit
def _touch(w_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    """Read ``n`` elements into L2 (``evict_last``: kept there before other lines), each program a
    stride of ``BLOCK``-element tiles; their sum goes to ``sink`` so the loads stay."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < n, other=0.0,
                       eviction_policy="evict_last").to(tl.float32)
    tl.store(sink_ptr + pid, tl.sum(acc, axis=0))


def touch(w: torch.Tensor, sink: torch.Tensor, programs: int, cap_bytes: int | None = None,
          block: int = 16384):
    """Touch the first ``cap_bytes`` of ``w`` (all of it without a cap) with ``programs``
    programs, ``block`` elements a load (32 KB in flight per program: one load at a time is
    latency-bound); ``sink`` (float32, at least ``programs`` long) gets each program's sum."""
    flat = w.reshape(-1)
    n = flat.numel() if cap_bytes is None else min(flat.numel(), cap_bytes // w.element_size())
    _touch[(programs,)](flat, sink, n, BLOCK=block, num_warps=8)


def chain(x, weights, outs, prefetch=None):
    """Every layer's projections in order; ``prefetch(w)`` (or nothing) is forked on a side stream
    as each call starts, for the weights of the call after it."""
    order = [(i, name) for i in range(LAYERS) for name in SHAPES]

    def run():
        main_stream = torch.cuda.current_stream()        # the graph's capture stream, in capture
        side = prefetch.stream if prefetch else None
        for j, (i, name) in enumerate(order):
            if prefetch and j + 1 < len(order) and order[j + 1][1] in prefetch.names:
                started = torch.cuda.Event()
                started.record(main_stream)
                side.wait_event(started)
                with torch.cuda.stream(side):
                    prefetch(weights[order[j + 1][1]][order[j + 1][0]])
            torch.matmul(x[name], weights[name][i].t(), out=outs[name])
        if prefetch:
            main_stream.wait_stream(side)          # the capture ends with every stream joined
    return run


class Prefetch:
    def __init__(self, programs: int, names: set, cap_mb: int):
        self.programs, self.names, self.cap = programs, names, cap_mb * 2**20
        self.sink = torch.zeros(programs, dtype=torch.float32, device="cuda")
        self.stream = torch.cuda.Stream()

    def __call__(self, w):
        touch(w, self.sink, self.programs, self.cap)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    a = p.parse_args(argv)
    from course_lib.bench import save_result
    from course_lib.measure.roofline import measure_peaks
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_peaks("cuda", torch.bfloat16).bandwidth
    weights = {k: [torch.randn(n, kk, dtype=torch.bfloat16, device="cuda") * 0.02
                   for _ in range(LAYERS)] for k, (n, kk) in SHAPES.items()}
    total = sum(w.numel() * w.element_size() for ws in weights.values() for w in ws)
    sink = torch.zeros(max(PROGRAMS), dtype=torch.float32, device="cuda")
    block = weights["down"][0]                                     # 32 MB
    alone = {P: graph_ms(lambda P=P: touch(block, sink, P)) for P in PROGRAMS}
    for P, ms in alone.items():
        print(f"touch alone, {P:2d} programs: 32 MB in {ms * 1e3:6.1f} us "
              f"({block.numel() * 2 / ms / 1e9:.2f} TB/s)", flush=True)
    rows = []
    for M in a.batches:
        x = {k: torch.randn(M, kk, dtype=torch.bfloat16, device="cuda") for k, (_, kk) in
             SHAPES.items()}
        outs = {k: torch.empty(M, n, dtype=torch.bfloat16, device="cuda") for k, (n, _) in
                SHAPES.items()}
        variants = {"cuBLAS": chain(x, weights, outs)}
        for P in PROGRAMS:
            for target, (names, cap) in TARGETS.items():
                variants[f"prefetch {target}, {P} programs"] = chain(x, weights, outs,
                                                                   Prefetch(P, names, cap))
        times = {name: graph_ms(fn) for name, fn in variants.items()}
        base = times["cuBLAS"]
        for name, ms in times.items():
            rows.append({"batch": M, "variant": name, "ms": ms,
                         "tb_per_s": total / ms / 1e9, "x_cublas": base / ms})
        print(f"\nM={M}: {total / 1e9:.2f} GB of weights, {total / bandwidth * 1e3:.3f} ms at "
              f"the copy bandwidth ({bandwidth / 1e12:.2f} TB/s)")
        for name, ms in times.items():
            print(f"  {name:34s} {ms:7.3f} ms  {total / ms / 1e9:5.2f} TB/s  {base / ms:5.3f}x",
                  flush=True)
    save_result({"layers": LAYERS, "shapes": SHAPES, "bandwidth": bandwidth,
                 "touch_alone_ms": alone, "rows": rows}, out / "l2_prefetch.json",
                command("l2_prefetch", argv))


if __name__ == "__main__":
    main()
