"""The GPU's timeline over windows of steps of a real run of a rung (llama-1b-dummy, chapter 09's
anyscale workload, after a warm-up run): per window, how much of its span the GPU was busy, the
gaps between kernels, and the kernels' total time by name. The profiler slows the host, so gaps
here are an upper bound: ``host_overlap`` says whether a kind of step waits on the host.

    python -m bench timeline --out DIR [--rung RUNG] [--windows FIRST STEPS ...]
"""
import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench import command
from course_lib.bench import save_result
from course_lib.engines import make_engine
from course_lib.measure.ladder import parse_rung, rung_settings
from course_lib.model import models
from course_lib.model.llama import LlamaShape
from course_lib.requests import load_workload

MODEL = "llama-1b-dummy"
DTYPE = "bfloat16"
WORKLOAD = "anyscale:prompt_len=512,cap=512,mean=128"
N_REQUESTS = 512
RUNG = "fast:kv_memory_mib=16384,max_num_batched_tokens=16384"
WINDOWS = [(1, 3), (20, 6), (200, 8), (470, 10)]      # (first step, steps)
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def instrument(engine, windows, out: Path) -> tuple[dict, dict]:
    """Wrap the model runner's ``launch`` so that each window's steps are recorded with
    torch.profiler into a Chrome trace in ``out``. Returns ``(traces, state)``: the trace's path
    per window (filled as the run goes) and the launch counter's state, whose ``"info"`` lists
    ``(step, rows, tokens)`` for every step inside a window."""
    launch = engine.runner.launch
    state = {"i": 0, "prof": None, "w": None, "info": []}
    traces = {}

    def wrapped(plan):
        i = state["i"]
        for w in windows:
            if i == w[0]:
                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].start()
                state["w"] = w
            if state["w"] == w and i == w[0] + w[1]:
                state["prof"].stop()
                path = out / f"trace_{w[0]}.json"
                state["prof"].export_chrome_trace(str(path))
                traces[w] = path
                state["prof"] = None
                state["w"] = None
        if state["w"] is not None:
            state["info"].append((i, len(plan.seqs), sum(plan.sizes)))
        state["i"] += 1
        return launch(plan)

    engine.runner.launch = wrapped
    return traces, state


def busy_and_gaps(kernels: list) -> tuple[float, list]:
    """The time the GPU was busy over ``kernels`` (sorted by start; overlaps counted once) and
    the gaps between them, as ``(gap, name of the kernel after it)``."""
    busy, end, gaps = 0.0, kernels[0]["ts"], []
    for e in kernels:
        start, dur = e["ts"], e["dur"]
        if start > end:
            gaps.append((start - end, e["name"][:60]))
        busy += max(0.0, start + dur - max(start, end))
        end = max(end, start + dur)
    return busy, gaps


def by_name(kernels: list) -> list:
    """The 25 names with the most GPU time: ``(name, total us, count)``."""
    names, counts = defaultdict(float), defaultdict(int)
    for e in kernels:
        names[e["name"][:70]] += e["dur"]
        counts[e["name"][:70]] += 1
    top = sorted(names.items(), key=lambda x: -x[1])[:25]
    return [(n, round(v, 1), counts[n]) for n, v in top]


def analyze(w, path: Path, info: list) -> dict:
    """One window's trace: its span, busy time, gaps and kernels by name (printed too)."""
    events = json.loads(path.read_text())["traceEvents"]
    k = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    k.sort(key=lambda e: e["ts"])
    t0, t1 = k[0]["ts"], max(e["ts"] + e["dur"] for e in k)
    busy, gaps = busy_and_gaps(k)
    gaps.sort(reverse=True)
    gaps_total = sum(g for g, _ in gaps)
    steps = [x for x in info if w[0] <= x[0] < w[0] + w[1]]
    window = dict(steps=steps, span_us=t1 - t0, busy_us=busy, gaps_total_us=gaps_total,
                  n_gaps=len(gaps), big_gaps=gaps[:12], n_kernels=len(k), top=by_name(k))
    print(f"== window {w}: steps {steps}")
    print(f"   span {(t1 - t0) / 1e3:.3f} ms busy {busy / 1e3:.3f} ms ({busy / (t1 - t0):.1%}) "
          f"gaps {len(gaps)} total {gaps_total / 1e3:.3f} ms kernels {len(k)}")
    print("   biggest gaps:", [(round(g), n) for g, n in gaps[:8]])
    for n, v, c in window["top"][:18]:
        print(f"   {v / 1e3:8.3f} ms {c:5d}x {n}")
    return window


def window_pairs(values: list[int]) -> list[tuple[int, int]]:
    """``[1, 3, 20, 6]`` -> ``[(1, 3), (20, 6)]``."""
    if len(values) % 2:
        raise argparse.ArgumentTypeError("--windows takes pairs: FIRST STEPS ...")
    return list(zip(values[::2], values[1::2]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--rung", default=RUNG)
    p.add_argument("--windows", type=int, nargs="+", metavar="FIRST STEPS",
                   default=[v for w in WINDOWS for v in w],
                   help="pairs: the first step of a window and its number of steps "
                        f"(default: {' '.join(str(v) for w in WINDOWS for v in w)})")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        windows = window_pairs(a.windows)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = models.load(MODEL, dtype=DTYPE, device="cuda")
    shape = LlamaShape.from_config(loaded.config)
    reqs = load_workload(WORKLOAD, tokenizer=loaded.tokenizer, n=N_REQUESTS,
                         vocab_size=shape.vocab_size)
    settings = rung_settings(reqs, shape, 2, max_batch=64)      # 2: bfloat16's bytes
    _, name, max_batch, options = parse_rung(a.rung, settings)
    engine = make_engine(name, loaded, max_batch=max_batch, **options)
    engine.prepare(reqs)
    engine.run(reqs)                 # warm-up
    traces, state = instrument(engine, windows, out)
    t = time.perf_counter()
    log = engine.run(reqs)
    wall = time.perf_counter() - t
    print(f"run: {len(log.steps)} steps {wall:.3f} s")
    summary = {}
    for w, path in traces.items():
        summary[str(w)] = analyze(w, path, state["info"])
        path.unlink()
    save_result({"model": MODEL, "dtype": DTYPE, "workload": WORKLOAD, "n": N_REQUESTS,
                 "rung": a.rung, "steps": len(log.steps), "wall_s": wall, "windows": summary},
                out / "timeline.json", command("timeline", argv))


if __name__ == "__main__":
    main()
