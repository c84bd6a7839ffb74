"""The paged engine's host cost alone, on the CPU, with the test suite's fake model (which
computes nothing): what remains is the Python a server runs around every step.

1. Filling the decode buffers (``DecodeGraphs.fill``) for 128 to 512 sequences of 640 tokens,
   in steady state (the same sequences, step after step).
2. The host's round per decode step, by part: ``schedule`` (``Scheduler.schedule``: pick the
   step, grow the block tables), ``launch`` (``ModelRunner.launch`` and ``Scheduler.launched``:
   fill the step's inputs, queue it, record it) and ``complete`` (``PagedEngine.complete``: read
   the tokens, emit them, retire), medians over the steps in which every sequence decodes. The
   decode step itself is taken out (the runner's ``decode_forward`` hook writes a fixed token):
   on a GPU it is one graph replay, which returns at once. With ``overlap`` the GPU waits for the
   host only when this round outlasts the step it runs behind (chapter 09: about 3.7 ms for 512
   sequences of llama-1b on an H200), so a slower CPU makes large decode steps host-bound first.
3. The chapter 09 fastest rung's schedule (anyscale, 512 requests, batch 512, budget 8192, a
   cache the size of 16 GiB of llama-1b's KV). On the CPU the mixed steps also build
   FlexAttention's masks with CPU tensor ops (on a GPU those are launches), so read the decode
   and between-step times.

    python -m bench host_time --out DIR
    COURSE_ROOT=/path/to/another/checkout python -m bench host_time     # another commit's code
"""
import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

if os.environ.get("COURSE_ROOT"):      # another checkout's library (and test fakes), this script
    sys.path.insert(0, os.environ["COURSE_ROOT"])

from bench.decode_step import decoding_cache  # noqa: E402
from course_lib.bench import save_result  # noqa: E402
from course_lib.engines.model_runner import ModelRunner  # noqa: E402
from course_lib.engines.paged import PagedEngine  # noqa: E402
from course_lib.engines.scheduler import Scheduler  # noqa: E402
from course_lib.kernels.cuda_graphs import DecodeGraphs  # noqa: E402
from course_lib.requests import Request, load_workload  # noqa: E402
from tests.fakes import LOADED, FakeLlama  # noqa: E402


def fill_ms(batch: int, context: int = 640, repeat: int = 50) -> float:
    model = FakeLlama()
    cache, rows, per_seq = decoding_cache(model.shape, batch, context, 16, model.dtype, "cpu")
    rows = [(token, pos, table, -1) for token, pos, table in rows]      # every token on the host
    graphs = DecodeGraphs(model, cache, batch, per_seq)
    graphs.fill(rows)
    t = time.perf_counter()
    for _ in range(repeat):
        graphs.fill(rows)
    return (time.perf_counter() - t) / repeat * 1e3


def fixed_token(graphs, nb):
    """A decode step with its work taken out: a fixed token, where the step puts its tokens."""
    graphs.last[:nb] = 7
    return graphs.last[:nb]


def round_ms(batch: int, new_tokens: int = 200, repeats: int = 3) -> dict:
    """Median ms of ``schedule``, ``launch`` and ``complete`` over the decode steps in which all
    ``batch`` sequences decode, from the best of ``repeats`` runs (the least disturbed)."""
    requests = [Request(f"r{i}", [7] * 23 + [60], ignore_eos=True,
                        max_new_tokens=new_tokens + (i % 5) * 8)
                for i in range(batch)]
    e = PagedEngine(LOADED, max_batch=batch, block_size=16,
                    num_blocks=batch * -(-(24 + new_tokens + 40) // 16),
                    attention="kernel", max_num_batched_tokens=16384, model=FakeLlama(),
                    trace_blocks=False)
    e.runner.decode_forward = fixed_token
    # the parts, each a list of (class, method); each method is called once per step
    parts = {"schedule": [(Scheduler, "schedule")], "launch": [(ModelRunner, "launch"),
             (Scheduler, "launched")], "complete": [(PagedEngine, "complete")]}
    times, best = {}, None
    with contextlib.ExitStack() as patches:
        for cls, method in [m for methods in parts.values() for m in methods]:
            def timed(*args, _f=getattr(cls, method), _key=(cls, method)):
                t = time.perf_counter()
                out = _f(*args)
                times[_key].append(time.perf_counter() - t)
                return out
            patches.enter_context(mock.patch.object(cls, method, timed))
        for _ in range(repeats):
            times.update({m: [] for methods in parts.values() for m in methods})
            e.run(requests)
            # step i is call i of each method: the first steps carry prompts, the last ones
            # have lost sequences
            full = [i for i, s in enumerate(e.steps)
                    if s.decode_tokens == batch and not s.prefill_tokens]
            row = {name: 1e3 * statistics.median(sum(times[m][i] for m in methods) for i in full)
                   for name, methods in parts.items()}
            row["round"] = sum(row.values())
            best = row if best is None or row["round"] < best["round"] else best
    return {"batch": batch, "steps": len(full), **best}


def rung_run() -> dict:
    reqs = load_workload("anyscale:prompt_len=512,cap=512,mean=128", n=512, vocab_size=64)
    for run in range(2):           # the first warms up
        e = PagedEngine(LOADED, max_batch=512, block_size=16, num_blocks=32768, attention="kernel",
                        max_num_batched_tokens=8192, model=FakeLlama(), trace_blocks=False)
        t = time.perf_counter()
        steps = e.run(reqs).steps
        wall = time.perf_counter() - t
    return {"wall_s": wall, "steps": len(steps),
            "decode_s": sum(s.end_s - s.start_s for s in steps if s.prefill_tokens == 0),
            "between_s": sum(max(0.0, b.start_s - a.end_s) for a, b in zip(steps, steps[1:]))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    fill = {b: fill_ms(b) for b in (128, 256, 512)}
    for b, ms in fill.items():
        print(f"filling the decode buffers for {b} sequences: {ms:.3f} ms")
    rounds = [round_ms(b) for b in (128, 512)]
    for r in rounds:
        print(f"host's round per decode step of {r['batch']} sequences ({r['steps']} steps): "
              f"schedule {r['schedule']:.3f} + launch {r['launch']:.3f} + complete "
              f"{r['complete']:.3f} = {r['round']:.3f} ms")
    rung = rung_run()
    print(f"the fastest rung's schedule: {rung['wall_s']:.2f} s for {rung['steps']} steps: "
          f"decode-only steps {rung['decode_s']:.2f} s, between steps {rung['between_s']:.2f} s")
    if a.out:
        root = os.environ.get("COURSE_ROOT")
        save_result({"fill_ms": fill, "rounds": rounds, "rung": rung},
                    Path(a.out) / "host_time_cpu.json",
                    (f"COURSE_ROOT={shlex.quote(root)} " if root else "")
                    + "python bench/host_time.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]))


if __name__ == "__main__":
    main()
