"""FlexAttention inside a real run against the same call alone: the fast rung (llama-1b-dummy,
chapter 09's anyscale workload, after a warm-up run) with every FlexAttention call of the prompts
timed with CUDA events where the engine makes it, and the first calls' inputs kept; then each
kept call timed again alone, with its queries made contiguous, and on random data of the same
shapes under the same block mask. In the engine a call took about 0.28 ms where the same shape
alone took 0.18 ms (bench/FINDINGS.md): is it the inputs, or the GPU's state around the call?

    python -m bench flex_in_run --out DIR
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from bench import command
from course_lib.bench import save_result
from course_lib.engines import make_engine
from course_lib.measure.ladder import parse_rung, rung_settings
from course_lib.measure.roofline import time_fn
from course_lib.model import attention, models
from course_lib.model.llama import LlamaShape
from course_lib.requests import load_workload

KEPT = 64          # calls whose inputs are kept (four mixed steps of 16 layers)


def timed_run(engine, reqs) -> tuple:
    """Run with every FlexAttention call timed in place: (ms per call, the first calls' inputs)."""
    flex, events, kept = attention.flex_attention, [], []

    def spy(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = flex(*args, **kwargs)
        end.record()
        events.append((start, end))
        if len(kept) < KEPT:
            kept.append((args, kwargs))
        return out

    attention.flex_attention = spy
    try:
        engine.run(reqs)
    finally:
        attention.flex_attention = flex
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events], kept


def timed(fn) -> float:
    """Median ms of ``fn()`` with CUDA events, after a warm-up (a new layout may compile)."""
    return time_fn(fn, "cuda", repeat=20, warmup=3) * 1e3


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--rung", default="fast:kv_memory_mib=16384,max_num_batched_tokens=16384")
    p.add_argument("--calls", type=int, nargs="+", default=[0, 16, 32, 48],
                   help="which kept calls to time alone")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    loaded = models.load("llama-1b-dummy", dtype="bfloat16", device="cuda")
    shape = LlamaShape.from_config(loaded.config)
    workload = "anyscale:prompt_len=512,cap=512,mean=128"
    reqs = load_workload(workload, tokenizer=loaded.tokenizer, n=512,
                         vocab_size=shape.vocab_size)
    settings = rung_settings(reqs, shape, loaded.model.dtype.itemsize, max_batch=64)
    _, name, max_batch, options = parse_rung(a.rung, settings)
    engine = make_engine(name, loaded, max_batch=max_batch, **options)
    engine.prepare(reqs)
    engine.run(reqs)                                   # warm-up
    in_run, kept = timed_run(engine, reqs)
    print(f"in the run: {len(in_run)} calls, median {statistics.median(in_run):.3f} ms "
          f"(the first {min(48, len(in_run))}: {statistics.median(in_run[:48]):.3f} ms)")
    flex, rows = attention.flex_attention, []
    for i in [c for c in a.calls if c < len(kept)]:
        (q, k, v), kwargs = kept[i]
        q_contiguous, noise = q.contiguous(), [torch.randn_like(x) for x in (q, k, v)]
        alone = timed(lambda: flex(q, k, v, **kwargs))
        contiguous = timed(lambda: flex(q_contiguous, k, v, **kwargs))
        random = timed(lambda: flex(*noise, **kwargs))
        rows.append({"call": i, "q_shape": list(q.shape), "q_stride": list(q.stride()),
                     "k_shape": list(k.shape), "in_run_ms": in_run[i], "alone_ms": alone,
                     "q_contiguous_ms": contiguous, "random_data_ms": random})
        print(f"call {i}: q {tuple(q.shape)}, keys {k.shape[-2]}: in the run "
              f"{in_run[i]:.3f} ms, alone {alone:.3f}, q contiguous {contiguous:.3f}, "
              f"random data {random:.3f}")
    card = torch.cuda.get_device_name().lower().replace(" ", "-")
    save_result({"model": "llama-1b-dummy", "workload": workload, "rung": a.rung,
                 "in_run_ms": in_run, "calls": rows},
                Path(a.out) / f"flex_in_run_{card}.json", command("flex_in_run", argv))


if __name__ == "__main__":
    main()
