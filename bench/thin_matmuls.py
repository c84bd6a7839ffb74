"""The decode step's matmuls alone, per projection and batch size: what PyTorch's default
(cuBLAS), cuBLASLt, and the fastest kernel Inductor's autotuning finds (``torch.compile``
with ``max-autotune``: its Triton GEMM templates against cuBLAS) take for the model's real
weight shapes, as a share of the measured copy bandwidth.

At 128 sequences a decode step's matmuls take well over the time their weights need at the copy
bandwidth (notebook 09, section 6: the thin q/k/v, output and down projections make few thread
blocks at 128 rows). Each projection runs once per layer, on that layer's own weights (so the
weights come from HBM, not from L2), all the layers captured in one CUDA graph and timed with
CUDA events; the time per call is the replay's over the number of layers.

    python -m bench thin_matmuls --batch 128 256 512 --out DIR
"""
import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import command
from bench.decode_step import events_ms
from course_lib.bench import save_result
from course_lib.kernels.fused import OPS as FUSED_OPS
from course_lib.measure.roofline import measure_peaks
from course_lib.model import models
from course_lib.model.llama import Llama

PROJECTIONS = {                      # name -> the stacked weight of each layer (fused model)
    "qkv": lambda w: w.wqkv,
    "o": lambda w: w.wo,
    "gate_up": lambda w: w.w_gate_up,
    "down": lambda w: w.w_down,
}


def linear_for(kind: str):
    """The matmul to time: PyTorch's ``F.linear`` (cuBLAS, or cuBLASLt: the library is chosen
    globally before capture), or the same call compiled with Inductor's autotuning."""
    if kind in ("cublas", "cublaslt"):
        return F.linear
    if kind == "inductor":
        for name in ("recompile_limit", "cache_size_limit"):   # one compile per (batch, shape)
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        return torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs",
                             dynamic=False)
    raise ValueError(kind)


def time_projection(linear, x, weights, repeat: int) -> tuple:
    """``(ms per call, max relative error against F.linear, captured)``: ``linear(x, w)`` for every
    layer's ``w``, captured in one CUDA graph (or, if the call cannot be captured, launched
    one after the other: then the host's launch time is in the figure too)."""
    ref = F.linear(x, weights[0])
    out = linear(x, weights[0])                     # compiles (and autotunes) outside the graph
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = [linear(x, w) for w in weights]  # noqa: F841  (kept alive with the graph)
        run, captured = g.replay, True
    except Exception:                               # noqa: BLE001  (a call that cannot be captured)
        torch.cuda.synchronize()
        run, captured = (lambda: [linear(x, w) for w in weights]), False
    run()
    return events_ms(run, repeat) / len(weights), err, captured


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--kinds", nargs="+", default=["cublas", "cublaslt", "inductor"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    model = Llama.from_hf(models.load(a.model, dtype=a.dtype, device="cuda").model)
    model.use_ops(FUSED_OPS)                        # the stacked projections the fast path runs
    peaks = measure_peaks("cuda", model.dtype)
    item = model.dtype.itemsize
    rows = []
    card = torch.cuda.get_device_name().lower().replace(" ", "-")

    def save():        # after every kind: a run cut short (slow autotuning) keeps the rest
        save_result({"model": a.model, "dtype": a.dtype, "device": asdict(peaks), "rows": rows},
                    Path(a.out) / f"thin_matmuls_{a.model}_{card}.json",
                    command("thin_matmuls", argv))
    for kind in a.kinds:
        torch.backends.cuda.preferred_blas_library("cublaslt" if kind == "cublaslt" else "cublas")
        linear = linear_for(kind)
        for b in a.batch:
            for name, pick in PROJECTIONS.items():
                weights = [pick(w) for w in model.layers]
                n, k = weights[0].shape
                x = torch.randn(b, k, dtype=model.dtype, device="cuda")
                ms, err, captured = time_projection(linear, x, weights, a.repeat)
                moved = (n * k + b * k + b * n) * item            # weights, input, output
                row = {"kind": kind, "batch": b, "projection": name, "n": n, "k": k, "ms": ms,
                       "bandwidth_share": moved / (ms / 1e3) / peaks.bandwidth,
                       "weights_at_copy_bandwidth_ms": n * k * item / peaks.bandwidth * 1e3,
                       "max_rel_error": err, "captured": captured}
                assert err < 1e-2, row                            # the same product
                rows.append(row)
                print(f"{kind:9s} B={b:4d} {name:8s} ({n:5d} x {k:5d}): "
                      f"{ms * 1e3:7.1f} us per call, "
                      f"{row['bandwidth_share']:4.0%} of the copy bandwidth"
                      f"{'' if captured else ' (not captured: host time included)'}", flush=True)
        save()
    torch.backends.cuda.preferred_blas_library("cublas")
    print("\nper layer, all four projections (us):")
    for b in a.batch:
        print(f"B={b:4d}: " + ", ".join(
            f"{kind} "
            f"{sum(r['ms'] for r in rows if r['kind'] == kind and r['batch'] == b) * 1e3:6.1f}"
            for kind in a.kinds))


if __name__ == "__main__":
    main()
