"""Where the paged engine's host time goes, step by step, in a real run: how long ``launch`` takes
to queue a step, how long ``complete`` then waits for the GPU, how long it takes to read the tokens
and retire sequences, and how long the scheduler takes before the next launch. With ``overlap``
the GPU is busy as long as the host, after each wait, queues the next step before the step in
flight ends: a step kind whose wait is near zero is host-bound.

    python -m bench host_overlap --device cuda --out DIR        # chapter 09's fastest rung
    python -m bench host_overlap --model tiny --device cpu --n 16 \
        --workload anyscale:prompt_len=64,cap=32,mean=8

The run is the rung's (``--rung``, as in ``python -m bench run_ladder``), after one warm-up run
of the same requests (``--cold``: none, the first run is timed); ``launch`` and ``complete`` are
wrapped with host clocks, nothing else changes. Python's garbage collections during the run are
timed too (a full one walks every object alive, the heap of torch and transformers included,
long enough to leave the GPU idle), and ``--gc-freeze`` moves everything alive before the run out of
the collector's reach (``gc.freeze()``), as serving engines do after start-up. ``--clocks``
samples the card's SM clock, power and NVML's reasons for a clock below its maximum (a power cap,
heat) every millisecond and gives each step those of its stretch of GPU time: did the card slow
itself down in the middle of a run?
"""
import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from bench import command
from course_lib.bench import save_result
from course_lib.engines import make_engine
from course_lib.measure.ladder import parse_rung, rung_settings
from course_lib.measure.metrics import HOST_TIMES, host_table
from course_lib.measure.roofline import NvmlSampler
from course_lib.model import models
from course_lib.model.llama import LlamaShape
from course_lib.requests import load_workload


@contextmanager
def gpu_waits(where: str = "course_lib"):
    """Count the places where the code inside makes the host wait for the GPU (a blocking copy,
    ``.item()``, a boolean mask...), with CUDA's sync debug mode: yields a Counter of
    ``"file:line code"``, the innermost frame whose file path holds ``where``."""
    found = Counter()

    def note(message, *args, **kwargs):
        if "called a synchronizing" in str(message):          # not the mode's own notice
            frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}"
                      for f in traceback.extract_stack() if where in f.filename]
            found[frames[-1] if frames else str(message)] += 1

    with warnings.catch_warnings():           # restores showwarning on the way out
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")


def host_summary(records: list) -> list:
    """Median host times per step kind and batch range, from ``instrument``'s records
    (one per launch: ``kind``, ``rows`` and the ``HOST_TIMES``; the first has no schedule time)."""
    rows = []
    for kind in ("packed", "decode"):
        for lo, hi in ((1, 32), (33, 128), (129, 256), (257, None)):
            sel = [r for r in records if r["kind"] == kind and "wait_ms" in r
                   and lo <= r["rows"] and (hi is None or r["rows"] <= hi)]
            if sel:
                med = {k: [r[k] for r in sel if r[k] is not None] for k in HOST_TIMES}
                rows.append({"kind": kind, "rows": f"{lo}-{hi or 'max'}", "steps": len(sel),
                             **{k: float(np.median(v)) if v else None for k, v in med.items()}})
    return rows


def instrument(engine, trace=None, waits=None, pyprofile=None) -> list:
    """Wrap the model runner's ``launch`` and the engine's ``complete`` with host clocks; returns
    the list each launch appends its record to (kind, rows, the four host times in ms, and on
    ``time.perf_counter``'s clock when it was launched and when the host saw its GPU work done).
    ``trace``: ``(first step, steps, path)`` to also record those steps with torch.profiler (host
    calls and GPU kernels on one timeline) into a Chrome trace at ``path``. ``waits``: a dict that
    gets, per step kind, a Counter of the places where ``launch`` waited for the GPU (sync debug
    mode; the launch times are then not the engine's own). ``pyprofile``: a ``cProfile.Profile``
    that records the Python calls of every packed (prefill or mixed) launch."""
    records, clock = [], time.perf_counter
    launch, complete = engine.runner.launch, engine.complete
    state = {"done": None, "profiler": None}   # done: when the last complete returned

    def timed_launch(plan):
        if trace and len(records) == trace[0]:
            from torch.profiler import ProfilerActivity, profile
            cuda = engine.model.device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            state["profiler"] = profile(activities=activities)
            state["profiler"].start()
        elif trace and len(records) == trace[0] + trace[1] and state["profiler"]:
            prof = state["profiler"]
            prof.stop()
            prof.export_chrome_trace(str(trace[2]))
            # the host calls that took the most time, over those steps (the trace has them all)
            # and the kernels that took the most GPU time
            tables = [prof.key_averages().table(sort_by=key, row_limit=20)
                      for key in ("self_cpu_time_total", "self_device_time_total")]
            Path(str(trace[2]).replace(".json.gz", ".txt")).write_text("\n\n".join(tables))
            print("\n\n".join(tables))
            state["profiler"] = None
        kind = "decode" if plan.decode_only else "packed"
        t0 = clock()
        if pyprofile is not None and kind == "packed":
            out = pyprofile.runcall(launch, plan)
        elif waits is None:
            out = launch(plan)
        else:
            with gpu_waits() as seen:
                out = launch(plan)
            waits.setdefault(kind, Counter()).update(seen)
        records.append({"kind": kind, "rows": len(plan.seqs), "launch_ms": (clock() - t0) * 1e3,
                        "schedule_ms": (t0 - state["done"]) * 1e3 if state["done"] else None,
                        "launched_s": t0})
        out.record = records[-1]
        return out

    def timed_complete():
        step = engine.in_flight[0]
        t0 = clock()
        if step.event is not None:
            step.event.synchronize()
        t1 = clock()
        complete()
        state["done"] = clock()
        step.record.update(wait_ms=(t1 - t0) * 1e3, retire_ms=(state["done"] - t1) * 1e3,
                           gpu_done_s=t1)

    engine.runner.launch, engine.complete = timed_launch, timed_complete
    return records


# NVML's reasons for a clock below its maximum that mean the card slowed itself down
SLOWDOWNS = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "software thermal",
             0x40: "hardware thermal", 0x80: "power brake"}


class ClockSampler(NvmlSampler):
    """The card's SM clock (MHz), power (W) and slowdown reasons, sampled in a thread every
    ``interval_s`` on ``time.perf_counter``'s clock: ``samples`` holds ``(t, mhz, watts, mask)``
    (empty without NVML). Power is NVML's instant reading where it has one: its plain reading is
    an average over the last second on recent cards."""

    def __init__(self, index: int = 0, interval_s: float = 0.001):
        super().__init__(index, interval_s)

    power_kind = None           # "instant", or "average" (NVML's last second) where NVML lacks it

    def _power_w(self) -> float:
        nvml, handle = self._nvml, self._handle
        if self.power_kind != "average":
            try:
                field = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
                if field.nvmlReturn == nvml.NVML_SUCCESS:
                    self.power_kind = "instant"
                    return field.value.uiVal / 1e3
            except Exception:
                pass
            self.power_kind = "average"
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1e3

    def _run(self):
        nvml, handle = self._nvml, self._handle
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self._stop.wait(self.interval_s):
            self.samples.append((time.perf_counter(),
                                 nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                                 self._power_w(), reasons(handle)))


def clocks_between(samples: list, start: float, end: float) -> dict:
    """The samples from ``start`` to ``end``: ``sm_mhz`` (the median), ``power_w`` (the largest)
    and ``slowdowns`` (every reason seen); empty if none falls there."""
    mine = [s for s in samples if start <= s[0] <= end]
    if not mine:
        return {}
    mask = 0
    for s in mine:
        mask |= s[3]
    return {"sm_mhz": statistics.median(s[1] for s in mine), "power_w": max(s[2] for s in mine),
            "slowdowns": [name for bit, name in SLOWDOWNS.items() if mask & bit]}


def clocks_by_step(records: list, samples: list):
    """Give each step record the clocks of its stretch of GPU time (``clocks_between``): from its
    launch, or from the end of the step before if that came later, to the end of its own."""
    ends = [r.get("gpu_done_s") for r in records]
    for i, r in enumerate(records):
        if ends[i] is not None:
            start = max(r["launched_s"], ends[i - 1] or 0.0) if i else r["launched_s"]
            r.update(clocks_between(samples, start, ends[i]))


def clock_table(records: list, n_samples: int) -> str:
    """Each packed step's wait, SM clock, power and slowdowns, then the decode steps' in sum."""
    lines = [f"{n_samples} clock samples; packed steps:",
             "step  rows  wait ms   SM MHz   power W  slowdowns"]
    for i, r in enumerate(records):
        if r["kind"] == "packed" and "sm_mhz" in r:
            lines.append(f"{i:4d} {r['rows']:5d} {r.get('wait_ms', 0):8.1f} {r['sm_mhz']:8.0f} "
                         f"{r['power_w']:9.0f}  {', '.join(r['slowdowns']) or '-'}")
    dec = [r for r in records if r["kind"] == "decode" and "sm_mhz" in r]
    if dec:
        lines.append(f"decode steps: SM clock {min(r['sm_mhz'] for r in dec):.0f}-"
                     f"{max(r['sm_mhz'] for r in dec):.0f} MHz, power at most "
                     f"{max(r['power_w'] for r in dec):.0f} W, slowed down in "
                     f"{sum(bool(r['slowdowns']) for r in dec)} of {len(dec)}")
    return "\n".join(lines)


@contextmanager
def gc_pauses(records: list):
    """Time Python's garbage collections inside: each pause is added to the record of the step
    it falls in (the last one), as ``gc_ms`` with the oldest ``gc_generation`` collected."""
    started = {}

    def collections(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif records:
            r = records[-1]
            r["gc_ms"] = r.get("gc_ms", 0.0) + (time.perf_counter() - started["t"]) * 1e3
            r["gc_generation"] = max(r.get("gc_generation", 0), info["generation"])

    gc.callbacks.append(collections)
    try:
        yield
    finally:
        gc.callbacks.remove(collections)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workload", default="anyscale:prompt_len=512,cap=512,mean=128")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--rung", default="fast:kv_memory_mib=16384,max_num_batched_tokens=16384")
    p.add_argument("--out", default=None)
    p.add_argument("--trace", type=int, nargs=2, metavar=("FIRST", "STEPS"), default=None,
                   help="also record these steps with torch.profiler into a Chrome trace in --out")
    p.add_argument("--sync-debug", action="store_true",
                   help="list where launch waits for the GPU (CUDA's sync debug mode; slows the "
                        "host)")
    p.add_argument("--cold", action="store_true",
                   help="time the engine's first run (no warm-up run): what a run meets the first "
                        "time (a shape never seen) shows")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() before the timed run: the collector skips what is alive")
    p.add_argument("--clocks", action="store_true",
                   help="sample the SM clock, power and slowdown reasons (NVML) and give each "
                        "step its own")
    p.add_argument("--pyprofile", action="store_true",
                   help="profile the Python calls of packed launches (cProfile; slows them) "
                        "into --out")
    a = p.parse_args(argv)
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    shape = LlamaShape.from_config(loaded.config)
    reqs = load_workload(a.workload, tokenizer=loaded.tokenizer, n=a.n, vocab_size=shape.vocab_size)
    # max_batch as gpu_ladder09.sh runs it
    settings = rung_settings(reqs, shape, loaded.model.dtype.itemsize, max_batch=64)
    _, engine_name, max_batch, options = parse_rung(a.rung, settings)
    if a.device != "cuda":          # the CPU runs the fast path's buffers eagerly
        for key in ("cuda_graphs", "fused"):
            options.pop(key, None)
    engine = make_engine(engine_name, loaded, max_batch=max_batch, **options)
    engine.prepare(reqs)
    if not a.cold:
        engine.run(reqs)             # warm-up
    if a.gc_freeze:
        gc.collect()
        gc.freeze()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    waits = {} if a.sync_debug else None
    pyprofile = cProfile.Profile() if a.pyprofile else None
    records = instrument(engine,
                         a.trace and (*a.trace, Path(a.out or ".") / "host_overlap_trace.json.gz"),
                         waits, pyprofile)
    t = time.perf_counter()
    clocks = ClockSampler() if a.clocks else nullcontext()
    with gc_pauses(records), clocks:
        log = engine.run(reqs)
    wall = time.perf_counter() - t
    if a.clocks:
        clocks_by_step(records, clocks.samples)
    rows = host_summary(records)
    print(f"{a.rung} on {a.device}: {len(log.steps)} steps in {wall:.2f} s "
          f"(overlap: {engine.overlap})")
    print(host_table(rows))
    paused = [(i, r) for i, r in enumerate(records) if r.get("gc_ms", 0) >= 1]
    print(f"garbage collections of 1 ms or more: {len(paused)}, "
          f"{sum(r['gc_ms'] for _, r in paused):.1f} ms in all"
          + "".join(f"\n  step {i} ({r['kind']}, {r['rows']} rows): {r['gc_ms']:.1f} ms, "
                    f"generation {r['gc_generation']}" for i, r in paused))
    if a.clocks:
        print(clock_table(records, len(clocks.samples)))
    for kind, found in (waits or {}).items():
        print(f"{kind} launches waited for the GPU at:" if found
              else f"{kind} launches never waited")
        for where, n in found.most_common():
            print(f"  {n:5d}x {where}")
    if pyprofile is not None:
        text = io.StringIO()
        stats = pstats.Stats(pyprofile, stream=text).strip_dirs()
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        print(text.getvalue())
        if a.out:
            (Path(a.out) / "host_overlap_pyprofile.txt").write_text(text.getvalue())
    if a.out and not (a.sync_debug or a.pyprofile):
        name = a.device if a.device != "cuda" else \
            torch.cuda.get_device_name().lower().replace(" ", "-")
        save_result({"model": a.model, "workload": a.workload, "n": a.n, "rung": a.rung,
                     "overlap": engine.overlap, "cold": a.cold, "gc_freeze": a.gc_freeze,
                     "clocks": a.clocks, "power_reading": getattr(clocks, "power_kind", None),
                     "wall_s": wall,
                     "summary": rows, "steps": records},
                    Path(a.out) / f"host_overlap_{a.model}_{name}.json",
                    command("host_overlap", argv))


if __name__ == "__main__":
    main()
