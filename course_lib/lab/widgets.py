"""Sliders over cached, tested measurements. Nothing runs until the learner clicks Run (a headless
run of a notebook never pays for it); a click first says what runs, then the result replaces
that line. A stored output that cannot show the slider shows a one-line hint instead."""
from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import clear_output
from tqdm.auto import tqdm

from course_lib.lab import plots
from course_lib.measure import roofline
from course_lib.measure.metrics import summarize

RUN = "Run"
HINT = "(run this cell to get the slider)"
# A progress bar over work that may be quick shows only once it has taken this long (seconds).
BAR_DELAY_S = 2


class Explorer(w.interactive):
    """Sliders and a Run button. A click prints ``say(*setting)``, calls ``compute(*setting)``
    (which may show progress bars), then replaces both with ``draw(result, *setting)`` and its
    figure; ``setting``: the sliders' values, in their order."""

    def __init__(self, compute, draw, say, **sliders):
        def click(**values):
            setting = values.values()
            print(say(*setting), flush=True)
            result = compute(*setting)
            clear_output(wait=True)
            draw(result, *setting)
            plt.show()

        super().__init__(click, {"manual": True, "manual_name": RUN}, **sliders)

    def _repr_mimebundle_(self, **kwargs):
        return {**super()._repr_mimebundle_(**kwargs), "text/plain": HINT}


def _slider(options, label: str):
    options = list(options)
    return w.SelectionSlider(options=options, value=options[len(options) // 2], description=label,
                             continuous_update=False)


def batch_size_explorer(model, peaks, context: int = 128, max_log2: int = 8, repeat: int = 3):
    """Pick a batch size, time one decode step at it (and at each smaller power of two not timed
    yet), and see where they land on the roofline."""
    rows = {}

    def todo(log2_batch):
        return [2 ** b for b in range(log2_batch + 1) if 2 ** b not in rows]

    def say(log2_batch):
        missing = todo(log2_batch)
        if not missing:
            return f"Drawing B={2 ** log2_batch} (timed before) ..."
        return (f"Timing one decode step at B={', '.join(map(str, missing))} ({context} tokens of "
                f"context, median of {repeat}) ...")

    def compute(log2_batch):
        for b in tqdm(todo(log2_batch), desc="batch sizes", unit="B", leave=False,
                      delay=BAR_DELAY_S):
            seconds = roofline.time_step(model, b, context, 1, repeat)
            rows[b] = roofline.step_row(model, peaks, b, context, 1, seconds)
        return [rows[2 ** b] for b in range(log2_batch + 1)]

    def draw(timed, log2_batch):
        row = timed[-1]
        print(f"B={row['batch']}: step {row['step_s'] * 1e3:.1f} ms, "
              f"{row['tokens_per_s']:.0f} tok/s, MBU {100 * row['mbu']:.0f}%, "
              f"MFU {100 * row['mfu']:.1f}%")
        plots.roofline(peaks, timed)

    slider = w.IntSlider(value=3, min=0, max=max_log2, description="log2(batch)",
                         continuous_update=False)
    return Explorer(compute, draw, say, log2_batch=slider)


def _cached_runs(loaded, requests, name: str, what: str, option: str, **fixed):
    """``run(key)``: engine ``name`` with ``option=key`` and its RunLog on ``requests``, run once
    per key (``run.done``); ``run.say(key)``: the line a click prints first (``what.format(key)``
    names it)."""
    from course_lib.engines import make_engine
    done = {}

    def run(key):
        if key not in done:
            engine = make_engine(name, loaded, **fixed, **{option: key})
            done[key] = engine, engine.run(requests, progress=True)
        return done[key]
    run.done = done
    run.say = lambda key: (f"Drawing {what.format(key)} (run before) ..." if key in done else
                           f"Running the {name} engine on {len(requests)} requests with "
                           f"{what.format(key)} ...")
    return run


def engine_explorer(loaded, requests, engines=("static",), batch_sizes=(1, 2, 4, 8, 16)):
    """Pick a batch size: the engines' timelines on the same requests (each run once, cached)."""
    runs = {e: _cached_runs(loaded, requests, e, "", "max_batch") for e in engines}

    def say(max_batch):
        names = [e for e in engines if max_batch not in runs[e].done]
        if not names:
            return f"Drawing max_batch={max_batch} (run before) ..."
        running = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        return (f"Running {running} on {len(requests)} requests with max_batch={max_batch} "
                f"(each setting runs once, then redraws from the cache) ...")

    def draw(logs, max_batch):
        _, axes = plt.subplots(len(logs), 1, figsize=(10, 3.2 * len(logs)), squeeze=False)
        for ax, (engine, log) in zip(axes[:, 0], logs):
            m = summarize(log)
            line = (f"{engine}, max_batch={max_batch}: {m['output_tokens_per_s']:.1f} tok/s, "
                    f"slot utilisation {100 * m['slot_utilisation']:.0f}%")
            print(line)
            plots.timeline(log, ax=ax, title=line)
        plt.tight_layout()

    def compute(max_batch):
        return [(e, runs[e](max_batch)[1]) for e in engines]
    return Explorer(compute, draw, say, max_batch=_slider(batch_sizes, "max_batch"))


def budget_explorer(loaded, requests, budgets=(16, 32, 64, 128, 256, 1024), block_size: int = 16,
                    max_batch: int = 8):
    """Pick a token budget: the chunked engine's steps and worst decode stall (run once each)."""
    run = _cached_runs(loaded, requests, "chunked", "a budget of {} tokens per step",
                       "max_num_batched_tokens", max_batch=max_batch, block_size=block_size)

    def draw(ran, budget):
        _, log = ran
        m = summarize(log)
        line = (f"budget {budget} tokens/step: longest wait between two tokens "
                f"{m['itl_s']['max']:.2f} s, TPOT p99 {1e3 * m['tpot_s']['p99']:.0f} ms, "
                f"{m['output_tokens_per_s']:.1f} tok/s")
        print(line)
        plots.step_composition(log, title=line)

    return Explorer(run, draw, run.say, budget=_slider(budgets, "budget"))


def block_size_explorer(loaded, requests, sizes=(1, 4, 16, 64), max_batch: int = 8):
    """Pick a block size: the paged engine's blocks over time, and the share left empty."""
    run = _cached_runs(loaded, requests, "paged", "blocks of {} tokens", "block_size",
                       max_batch=max_batch, trace_blocks=True, attention="gather")

    def draw(ran, block_size):
        engine, log = ran
        n_blocks = engine.cache.allocator.n_blocks
        line = (f"blocks of {block_size} tokens: {n_blocks} blocks, "
                f"{100 * summarize(log)['kv_waste']:.1f}% of the reserved places empty on average")
        print(line)
        plots.block_map(engine.block_trace, n_blocks, title=line)

    return Explorer(run, draw, run.say, block_size=_slider(sizes, "block size"))


def operating_point_explorer(run, rates, batches, ttft_slos):
    """Pick an arrival rate, a max batch and a TTFT target: the point on the trade-off curve and
    the queue with and without admission control; ``run``: from ``tradeoffs.simulated``."""
    from course_lib.engines.policies import SLO
    from course_lib.measure.tradeoffs import point, sweep

    def say(rate, max_batch, ttft_slo):
        return (f"Simulating {rate} req/s with max_batch={max_batch}, with and without admission "
                f"for a TTFT target of {ttft_slo} s, and the curve over {len(rates)} rates ...")

    def compute(rate, max_batch, ttft_slo):
        slo = SLO(ttft_s=ttft_slo)
        for r in tqdm(rates, desc="rates", leave=False, delay=BAR_DELAY_S):
            run(r, max_batch)
        return slo, run(rate, max_batch), run(rate, max_batch, slo)

    def draw(ran, rate, max_batch, ttft_slo):
        slo, free, gated = ran
        print(f"{rate} req/s, max_batch={max_batch}, TTFT target {ttft_slo} s:")
        for name, log, adm in (("admit everything", free, False),
                               ("admission control", gated, True)):
            p = point(log, rate, max_batch, slo, admission=adm)
            print(f"{name:>18}: {p['tokens_per_s']:7.0f} tok/s, TTFT p50 {p['ttft_p50']:.3g} s / "
                  f"p99 {p['ttft_p99']:.3g} s, TPOT p50 {1e3 * p['tpot_p50']:.1f} ms, refused "
                  f"{p['refused']}, goodput {p['goodput_rps'] or 0:.2f} req/s "
                  f"({100 * (p['attainment'] or 0):.0f}% within the SLO)")
        _, ax = plt.subplots(1, 2, figsize=(13, 4))
        plots.throughput_latency(sweep(run, rates, [max_batch]), ax=ax[0], latency="ttft_p50")
        here = point(free, rate, max_batch)
        ax[0].plot(here["tokens_per_s"], here["ttft_p50"], "r*", ms=14, label="this point")
        ax[0].axhline(ttft_slo, color="red", lw=0.8, ls="--", label="TTFT target")
        ax[0].legend(fontsize=7)
        plots.queue_depth({"admit everything": free, "admission control": gated}, ax=ax[1])

    return Explorer(compute, draw, say, rate=_slider(rates, "rate (req/s)"),
                    max_batch=_slider(batches, "max_batch"),
                    ttft_slo=_slider(ttft_slos, "TTFT SLO (s)"))


def ladder_explorer(result):
    """Pick a rung of a ladder result (``course_lib.measure.ladder``): its steps over time."""
    runs = {r["rung"]: r for r in result["runs"] if "error" not in r and r.get("steps")}

    def draw(r, rung):
        m = r["metrics"]
        print(f"{rung}: {m['output_tokens_per_s']:.0f} tok/s, {m['steps']} steps, "
              f"step time p50 {1e3 * m['step_time_s']['p50']:.1f} ms, "
              f"MBU {100 * (m['mbu'] or 0):.1f}%, preemptions {m.get('preemptions') or 0}")
        plots.run_steps(r)

    return Explorer(runs.get, draw, "Drawing the stored steps of the {} rung ...".format,
                    rung=_slider(runs, "rung"))
