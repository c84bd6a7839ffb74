"""The throughput-latency curve from real runs: the continuous engine (paged, blocks of 16) on the
same requests at every (arrival rate, max batch), one after the other in one process.

    python -m bench curve --rates 1 2 4 8 --batches 2 8 32 \
        --out bench/results/cpu/curve_smollm2-135m_cpu.json

Each row is ``course_lib.measure.tradeoffs.point`` of one run (throughput, TTFT/TPOT/end-to-end
p50 and p99); notebook 08 draws them over its simulated curves.
"""
import argparse
import sys

import torch

from bench import command
from course_lib.bench import save_result
from course_lib.engines import make_engine
from course_lib.measure.roofline import measure_peaks
from course_lib.measure.tradeoffs import point
from course_lib.model import models
from course_lib.requests import chat_workload, poisson_arrivals


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    peaks = measure_peaks(a.device, loaded.model.dtype)
    requests = chat_workload(loaded.tokenizer, n=a.n, max_new_tokens=a.max_new_tokens)
    warmup = make_engine("continuous", loaded, max_batch=2, block_size=a.block_size)
    warmup.run(requests[:2])
    rows = []
    for b in a.batches:
        for rate in a.rates:
            log = make_engine("continuous", loaded, max_batch=b, block_size=a.block_size).run(
                poisson_arrivals(requests, rate, seed=0))
            rows.append(point(log, rate, b))
            r = rows[-1]
            print(f"B={b:3d} rate {rate:5.2f}/s: {r['tokens_per_s']:6.1f} tok/s, "
                  f"TTFT p50 {r['ttft_p50']:.2f} s, TPOT p50 {1e3 * r['tpot_p50']:.0f} ms",
                  flush=True)
    save_result({"model": a.model, "dtype": a.dtype, "device": vars(peaks), "n": a.n,
                 "max_new_tokens": a.max_new_tokens, "block_size": a.block_size,
                 "torch_threads": torch.get_num_threads(), "rows": rows}, a.out,
                command("curve", argv))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
