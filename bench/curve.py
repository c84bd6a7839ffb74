"""The throughput-latency curve from real runs: the paged engine (gather attention on a CPU, blocks
of 16) on the same chat requests at every (arrival rate, max batch), one after the other in one
process; rate 0 is all at once; ``--repeat`` runs each point again (how far identical runs
spread). ``--engine``, ``--options`` and ``--workload`` choose another
engine and workload; on a GPU the paged engine takes FlexAttention (the stored H200 sweep,
``bench/gpu/gpu_curve.sh``):

    python -m bench curve --rates 0 1 2 4 8 --batches 2 8 32 \\
        --out bench/results/cpu/curve_smollm2-135m_cpu.json.gz
    python -m bench curve --model llama-1b-dummy --device cuda --dtype bfloat16 --n 128 \\
        --workload anyscale:prompt_len=512,cap=512,mean=128 --rates 0 8 16 32 \\
        --batches 32 64 128 --repeat 3 --out DIR/curve_repeats_llama-1b-dummy_nvidia-h200.json.gz

``rows``: the metrics of each run that notebook 08 draws over its simulated curves (``rate``,
``max_batch``, throughput, TTFT/TPOT/end-to-end p50 and p99, as ``tradeoffs.point``). ``runs``:
each run as the bench CLI stores it, with its requests and step log, which
``bench/simulator_validation.py`` fits to and predicts (``--where``).
"""
import argparse
import gzip
import sys
from pathlib import Path

from bench import command
from course_lib.bench import bench, save_result
from course_lib.model import models

STEP_FIELDS = ("start_s", "end_s", "rows", "slots", "prefill_tokens", "decode_tokens",
               "attended", "kv_read", "logit_rows")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rates", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--engine", default="paged")
    p.add_argument("--options", default="", help="engine options, e.g. attention=flex")
    p.add_argument("--workload", default="chat",
                   help="a workload spec; --max-new-tokens applies to chat only")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each point this many times (the spread of identical runs)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    options = {"block_size": a.block_size,
               **{k: int(v) if v.isdigit() else v
                  for k, v in (x.split("=", 1) for x in a.options.split(",") if x)}}
    max_new = a.max_new_tokens if a.workload == "chat" else None
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    rows, runs = [], []
    points = [(b, rate) for b in a.batches for rate in a.rates for _ in range(a.repeat)]
    for b, rate in points:
        r = bench(a.engine, a.model, a.workload, a.n, b, a.dtype, a.device, loaded=loaded,
                  max_new_tokens=max_new, progress=False, steps=True,
                  engine_options=options, arrival_rate=rate or None)
        r["steps"] = [{k: s[k] for k in STEP_FIELDS} for s in r["steps"]]
        m, pct = r["metrics"], ("p50", "p99")
        rows.append({"rate": rate or None, "max_batch": b,
                     "tokens_per_s": m["output_tokens_per_s"], "served": m["served"],
                     **{f"{k}_{q}": m[f"{k}_s"][q] for k in ("ttft", "tpot", "e2e")
                        for q in pct}})
        runs.append({k: v for k, v in r.items() if k != "versions"})
        print(f"B={b:3d} rate {rate:5.2f}/s: {m['output_tokens_per_s']:6.1f} tok/s, TTFT p50 "
              f"{m['ttft_s']['p50']:.2f} s, TPOT p50 {1e3 * m['tpot_s']['p50']:.0f} ms",
              flush=True)
    out = Path(a.out)
    result = {"model": a.model, "dtype": a.dtype, "device": runs[0]["device"], "n": a.n,
              "engine": a.engine, "options": options, "workload": a.workload,
              "max_new_tokens": max_new, "block_size": a.block_size, "rows": rows,
              "runs": runs}
    plain = out.with_name(out.name.removesuffix(".gz"))
    save_result(result, plain, command("curve", argv))
    if out != plain:                          # gzipped, as large stored results are
        out.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
    print("wrote", out)


if __name__ == "__main__":
    main()
