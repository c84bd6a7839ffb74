"""The paged engine's host cost alone. First, filling the decode buffers (``DecodeGraphs._fill``)
for batches of 128 to 512 sequences of 640 tokens, in steady state (the same sequences, step after
step). Then the chapter 09 fastest rung's schedule (anyscale, 512
requests, batch 512, budget 8192, a cache the size of 16 GiB of llama-1b's KV) run with the test
suite's fake model, which computes nothing. What remains is Python: scheduling, laying out steps,
filling the decode buffers, bookkeeping. On the CPU the mixed steps also build FlexAttention's
masks with CPU tensor ops (on a GPU those are launches), so read the decode and between-step times.

    python bench/host_time.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from course_lib.cuda_graphs import DecodeGraphs  # noqa: E402
from course_lib.engines.paged import PagedEngine  # noqa: E402
from course_lib.requests import load_workload  # noqa: E402
from decode_step import decoding_cache  # noqa: E402
from fakes import LOADED, FakeLlama  # noqa: E402


def fill_ms(batch: int, context: int = 640, repeat: int = 50) -> float:
    model = FakeLlama()
    cache, rows, per_seq = decoding_cache(model.shape, batch, context, 16, model.dtype, "cpu")
    graphs = DecodeGraphs(model, cache, batch, per_seq)
    graphs._fill(rows)
    t = time.perf_counter()
    for _ in range(repeat):
        graphs._fill(rows)
    return (time.perf_counter() - t) / repeat * 1e3


def main():
    for b in (128, 256, 512):
        print(f"filling the decode buffers for {b} sequences: {fill_ms(b):.3f} ms")
    reqs = load_workload("anyscale:prompt_len=512,cap=512,mean=128", n=512, vocab_size=64)
    for run in range(2):           # the first warms up
        e = PagedEngine(LOADED, max_batch=512, block_size=16, num_blocks=32768, attention="kernel",
                        max_num_batched_tokens=8192, model=FakeLlama(), trace_blocks=False)
        t = time.perf_counter()
        steps = e.run(reqs).steps
        wall = time.perf_counter() - t
        decode = sum(s.end_s - s.start_s for s in steps if s.prefill_tokens == 0)
        between = sum(max(0.0, b.start_s - a.end_s) for a, b in zip(steps, steps[1:]))
        print(f"run {run}: {wall:.2f} s for {len(steps)} steps: decode-only steps {decode:.2f} s, "
              f"between steps {between:.2f} s")


if __name__ == "__main__":
    main()
