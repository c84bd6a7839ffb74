"""Thin projections at small batch: llama-1b-dummy's four projection shapes (bf16, random
weights, 16 layers each with its own, so that they come from HBM), cuBLAS (``torch.matmul``)
against a plain Triton kernel (one program per ``BLOCK_N`` output columns, the whole of K, the
best of a sweep of tiles, warps and stages), each timed as 16 calls in one CUDA graph.

    python -m bench thin_gemv --out DIR
"""
import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench import command
from course_lib.bench import save_result

LAYERS = 16
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
BATCHES = (1, 8, 16, 32, 64)
# (BLOCK_N, BLOCK_K, warps, stages)
CONFIGS = list(itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4)))


@triton.jit
def _thin_mm(x_ptr, w_ptr, y_ptr, M, N, K, sxm, swn, sym,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m[:, None] * sxm + (k0 + kk)[None, :],
                    mask=(m < M)[:, None], other=0.0)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * swn + (k0 + kk)[None, :],
                    mask=(n < N)[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + m[:, None] * sym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & (n < N)[None, :])


def thin(x, w, out, bn, bk, warps, stages):
    """``out = x @ w.T`` with ``_thin_mm``: all of x's rows in one tile of at least 16."""
    M, K = x.shape
    N = w.shape[0]
    bm = max(16, triton.next_power_of_2(M))
    _thin_mm[(triton.cdiv(N, bn),)](x, w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                    num_stages=stages)


def graph_ms(fn, reps=30):
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (CUDA events)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    out = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def best_triton(x, weights, outs, ref, name):
    """``(ms, config)`` of the fastest of ``CONFIGS`` whose result is right (``(1e9, None)`` if
    none is)."""
    M = x.shape[0]
    best = (1e9, None)
    for bn, bk, warps, stages in CONFIGS:
        if bn * bk > 64 * 256 and warps == 4:
            continue
        try:
            def tri():
                for i in range(LAYERS):
                    thin(x, weights[i], outs[i], bn, bk, warps, stages)
            ms = graph_ms(tri)
            err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                print("bad", name, M, bn, bk, err)
                continue
            if ms < best[0]:
                best = (ms, (bn, bk, warps, stages))
        except Exception as e:
            print("fail", name, M, (bn, bk, warps, stages), repr(e)[:120])
    return best


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    W = {k: [torch.randn(n, kk, dtype=torch.bfloat16, device="cuda") * 0.02
             for _ in range(LAYERS)]
         for k, (n, kk) in SHAPES.items()}
    rows = []
    for M in BATCHES:
        tot_cublas = tot_best = 0.0
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            outs = [torch.empty(M, N, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]

            def cub():
                for i in range(LAYERS):
                    torch.matmul(x, W[name][i].t(), out=outs[i])
            ref_ms = graph_ms(cub)
            ref = F.linear(x.float(), W[name][0].float())
            best = best_triton(x, W[name], outs, ref, name)
            gb = LAYERS * N * K * 2 / 1e9
            row = dict(M=M, matrix=name, cublas_ms=ref_ms, triton_ms=best[0], config=best[1],
                       cublas_tbs=gb / ref_ms, triton_tbs=gb / best[0])
            rows.append(row)
            tot_cublas += ref_ms
            tot_best += best[0]
            print(f"M={M:3d} {name:8s} cuBLAS {ref_ms * 1e3:7.1f} us ({gb / ref_ms:.2f} TB/s)  "
                  f"Triton {best[0] * 1e3:7.1f} us ({gb / best[0]:.2f} TB/s) {best[1]}",
                  flush=True)
        print(f"M={M:3d} all four x16: cuBLAS {tot_cublas:.3f} ms, best Triton {tot_best:.3f} ms",
              flush=True)
    save_result({"layers": LAYERS, "shapes": SHAPES, "rows": rows}, out / "thin_gemv.json",
                command("thin_gemv", argv))


if __name__ == "__main__":
    main()
