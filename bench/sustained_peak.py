"""The matmul peak in a burst and held for seconds: how far a card under its power limit falls
from the rate the floor assumes. The floor's peak (``measure_peaks``) is the median of twenty
8192^3 matmuls; a run keeps the card busy for seconds, and an H200 lowers its SM clock when the
work draws more than its power limit.

    python -m bench sustained_peak --out DIR [--seconds 3]

For each operand kind (random normal data, as the floor's peak; weights and activations scaled as
a model's are) and shape (the floor's 8192^3; a mixed step's gate/up projection, 16384 tokens by
2048 into 16384), matmuls run back to back for ``--seconds``; every window of 0.1 s is timed with
CUDA events beside the SM clock, power and NVML's slowdown reasons sampled every millisecond.
Prints the burst rate, then per window TFLOP/s and clock; writes ``sustained_peak.json``.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import command
from bench.host_overlap import ClockSampler, clocks_between

SHAPES = {"8192^3 (the floor's peak)": (8192, 8192, 8192),
          "gate/up of a mixed step": (16384, 2048, 16384)}         # (M, K, N)


def operands(kind: str, m: int, k: int, n: int):
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(k, n, device="cuda")
    if kind == "model-scaled":               # activations near 1 after a norm, weights ~0.02
        b = b * 0.02
    return a.to(torch.bfloat16), b.to(torch.bfloat16)


def event_ms(fn, calls: int = 1) -> float:
    """Milliseconds of ``calls`` back-to-back calls of ``fn``, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def windows(fn, flops: float, seconds: float, window_s: float = 0.1) -> list:
    """Run ``fn`` back to back for ``seconds``, in windows of about ``window_s``: each window's
    start and end on the host clock, its TFLOP/s and its call count."""
    calls = max(1, round(window_s / (event_ms(fn) / 1e3)))
    rows, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        ms = event_ms(fn, calls)
        rows.append({"t_s": t0, "tflops": calls * flops / ms / 1e9, "calls": calls,
                     "end_s": time.perf_counter()})
    return rows


def burst(fn, flops: float, repeat: int = 20) -> float:
    """TFLOP/s of the median of ``repeat`` single calls, each timed alone after a warm-up."""
    event_ms(fn, 3)
    return flops / statistics.median(event_ms(fn) for _ in range(repeat)) / 1e9


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rest", type=float, default=5.0, help="idle seconds before each case")
    a = p.parse_args(argv)
    from course_lib.bench import save_result
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for shape, (m, k, n) in SHAPES.items():
        for kind in ("random", "model-scaled"):
            x, w = operands(kind, m, k, n)
            y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            flops = 2 * m * k * n

            def fn():
                torch.matmul(x, w, out=y)
            time.sleep(a.rest)                                  # a cool card for the burst
            peak = burst(fn, flops)
            with ClockSampler() as clocks:
                rows = windows(fn, flops, a.seconds)
            for r in rows:
                r.update(clocks_between(clocks.samples, r["t_s"], r["end_s"]))
            t0 = rows[0]["t_s"]
            for r in rows:
                r["t_s"], r["end_s"] = r["t_s"] - t0, r["end_s"] - t0
            late = [r["tflops"] for r in rows if r["t_s"] >= a.seconds / 2]
            case = {"shape": shape, "operands": kind, "burst_tflops": peak,
                    "power_reading": clocks.power_kind,
                    "held_tflops": statistics.median(late), "windows": rows}
            cases.append(case)
            print(f"\n{shape}, {kind} operands: burst {peak:.0f} TFLOP/s, held (second half) "
                  f"{case['held_tflops']:.0f} TFLOP/s ({case['held_tflops'] / peak:.0%})")
            for r in rows[::max(1, len(rows) // 10)]:
                nan = float("nan")
                print(f"  {r['t_s']:5.2f} s  {r['tflops']:6.0f} TFLOP/s  "
                      f"{r.get('sm_mhz', nan):6.0f} MHz  {r.get('power_w', nan):5.0f} W  "
                      f"{', '.join(r.get('slowdowns', [])) or '-'}", flush=True)
    print("\nshape                          operands      burst   held  held/burst")
    for c in cases:
        print(f"{c['shape']:30s} {c['operands']:12s} {c['burst_tflops']:6.0f} "
              f"{c['held_tflops']:6.0f}  {c['held_tflops'] / c['burst_tflops']:9.0%}")
    save_result({"seconds": a.seconds, "cases": cases}, out / "sustained_peak.json",
                command("sustained_peak", argv))


if __name__ == "__main__":
    main()
