"""The host's share of a decode step, alone: the paged engine's scheduler and bookkeeping at a
large batch, with the device's work taken out (the model's forward and the decode graphs
replaced by writing a fixed token), so that what is timed is the Python a server runs around
every step: ``schedule`` (pick the step, grow the block tables), ``launch`` (fill the step's
inputs, queue it, record the step) and ``complete`` (read the tokens, emit them, retire).

With ``overlap`` the GPU waits for the host only when this round outlasts the step it runs
behind: on an H200 a decode step of 512 sequences takes about 3.7 ms (chapter 09), so a host
round near that makes the step host-bound, and a slower CPU makes it so first.

    python bench/host_step.py --batch 512 --out DIR
    COURSE_ROOT=/path/to/another/checkout python bench/host_step.py     # another commit's code

Runs on the CPU in a few seconds; the medians are over the steps where every sequence decodes.
"""
import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("COURSE_ROOT", str(Path(__file__).resolve().parent.parent)))

from course_lib import cuda_graphs, models  # noqa: E402
from course_lib.bench import save_result  # noqa: E402
from course_lib.engines import make_engine  # noqa: E402
from course_lib.requests import Request  # noqa: E402


def no_device_work(engine):
    """Replace the device's part of a step by writing a fixed token: the host's code runs as is."""
    def forward(self, nb):
        self.last[:nb] = 7
        return self.last[:nb]
    cuda_graphs.DecodeGraphs._forward = forward
    engine.model.hidden_states = lambda tokens, positions, attn: torch.zeros(len(tokens), 8)
    engine.model.logits = lambda hidden, float32=False: torch.zeros(len(hidden), 3)


def host_step(batch: int, new_tokens: int = 200, repeats: int = 3) -> dict:
    """Median ms of ``schedule``, ``launch`` and ``complete`` over the decode steps in which all
    ``batch`` sequences decode, best of ``repeats`` runs (the least disturbed)."""
    torch.set_num_threads(1)
    loaded = models.load("tiny", dtype="float32", device="cpu")
    requests = [Request(f"r{i}", [5 + (i * 7 + j) % 50 for j in range(24)], ignore_eos=True,
                        max_new_tokens=new_tokens + (i % 5) * 8) for i in range(batch)]
    e = make_engine("continuous", loaded, max_batch=batch, block_size=16, attention="kernel",
                    num_blocks=batch * -(-(24 + new_tokens + 40) // 16), cuda_graphs=False,
                    max_num_batched_tokens=16384, overlap=True, trace_blocks=False)
    no_device_work(e)
    e.run(requests[:8])
    times = {}
    for name in ("schedule", "launch", "complete"):
        def timed(*args, _f=getattr(e, name), _name=name):
            t = time.perf_counter()
            out = _f(*args)
            times[_name].append(time.perf_counter() - t)
            return out
        setattr(e, name, timed)
    best = None
    for _ in range(repeats):
        for name in ("schedule", "launch", "complete"):
            times[name] = []
        e.run(requests)
        # launch i is step i; the first few are prompts, the last ones lose sequences
        full = [i for i, s in enumerate(e.steps) if s.decode_tokens == batch and not s.prefill_tokens]
        row = {name: 1e3 * statistics.median(times[name][i] for i in full) for name in times}
        row["round"] = sum(row.values())
        best = row if best is None or row["round"] < best["round"] else best
    return {"batch": batch, "steps": len(full), **best}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = [host_step(b) for b in a.batch]
    for r in rows:
        print(f"B={r['batch']:4d} ({r['steps']} steps): schedule {r['schedule']:.3f} + launch {r['launch']:.3f} "
              f"+ complete {r['complete']:.3f} = {r['round']:.3f} ms a step, device work taken out")
    if a.out:
        save_result({"rows": rows}, Path(a.out) / "host_step_cpu.json",
                    "python bench/host_step.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]))


if __name__ == "__main__":
    main()
