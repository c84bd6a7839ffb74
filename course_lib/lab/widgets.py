"""Sliders over cached, tested measurements. Each widget uses ``interact_manual``: nothing runs
until the learner clicks, so a headless run of a notebook never pays for it."""
from __future__ import annotations

from functools import lru_cache

import matplotlib.pyplot as plt

from course_lib.lab import plots
from course_lib.measure import roofline


def _pick(show, options, description: str, **more):
    """Sliders that call ``show`` only when the button is clicked: one over ``options`` for its
    first parameter, and one per further parameter ``name=(options, description)``."""
    import inspect

    import ipywidgets as w

    def slider(opts, label):
        opts = list(opts)
        return w.SelectionSlider(options=opts, value=opts[len(opts) // 2], description=label,
                                 continuous_update=False)
    name = next(iter(inspect.signature(show).parameters))
    return w.interact_manual(show, **{name: slider(options, description)},
                             **{k: slider(*v) for k, v in more.items()})


def batch_size_explorer(model, peaks, context: int = 128, max_log2: int = 8, repeat: int = 3):
    """Pick a batch size, time one decode step at it, and see where it lands on the roofline."""
    import ipywidgets as w

    @lru_cache(maxsize=None)
    def measured(batch):
        seconds = roofline.time_step(model, batch, context, 1, repeat)
        return roofline.step_row(model, peaks, batch, context, 1, seconds)

    def show(log2_batch):
        row = measured(2 ** log2_batch)
        print(f"B={row['batch']}: step {row['step_s'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s, "
              f"MBU {100 * row['mbu']:.0f}%, MFU {100 * row['mfu']:.1f}%")
        plots.roofline(peaks, [measured(2 ** b) for b in range(log2_batch + 1)])
        plt.show()

    slider = w.IntSlider(value=3, min=0, max=max_log2, description="log2(batch)",
                         continuous_update=False)
    return w.interact_manual(show, log2_batch=slider)


def engine_explorer(loaded, requests, engines=("static",), batch_sizes=(1, 2, 4, 8, 16)):
    """Pick a batch size: run the engines on the same requests (each run once, then cached) and
    draw their timelines with their throughput and slot utilisation."""

    from course_lib.engines import make_engine
    from course_lib.measure.metrics import summarize

    @lru_cache(maxsize=None)
    def run(engine, max_batch):
        return make_engine(engine, loaded, max_batch=max_batch).run(requests)

    def show(max_batch):
        fig, axes = plt.subplots(len(engines), 1, figsize=(10, 3.2 * len(engines)), squeeze=False)
        for ax, engine in zip(axes[:, 0], engines):
            log = run(engine, max_batch)
            m = summarize(log)
            plots.timeline(log, ax=ax, title=f"{engine}, max_batch={max_batch}: "
                           f"{m['output_tokens_per_s']:.1f} tok/s, slot utilisation "
                           f"{100 * m['slot_utilisation']:.0f}%")
        plt.tight_layout()
        plt.show()

    return _pick(show, batch_sizes, "max_batch")


def budget_explorer(loaded, requests, budgets=(16, 32, 64, 128, 256, 1024), block_size: int = 16,
                    max_batch: int = 8):
    """Pick a token budget (max_num_batched_tokens): run the chunked engine (once per budget,
    then cached) and see its steps and its worst decode stall."""

    from course_lib.engines import make_engine
    from course_lib.measure.metrics import summarize

    @lru_cache(maxsize=None)
    def run(budget):
        return make_engine("continuous", loaded, max_batch=max_batch, block_size=block_size,
                           max_num_batched_tokens=budget).run(requests)

    def show(budget):
        log = run(budget)
        m = summarize(log)
        plots.step_composition(log, title=(
            f"budget {budget} tokens/step: longest wait between two tokens "
            f"{m['itl_s']['max']:.2f} s, TPOT p99 {1e3 * m['tpot_s']['p99']:.0f} ms, "
            f"{m['output_tokens_per_s']:.1f} tok/s"))
        plt.show()

    return _pick(show, budgets, "budget")


def block_size_explorer(loaded, requests, sizes=(1, 4, 16, 64), max_batch: int = 8):
    """Pick a block size: run the paged engine (once per size, then cached) and see how much of
    the memory it reserves holds no token, and how many blocks it manages."""

    from course_lib.engines import make_engine
    from course_lib.measure.metrics import summarize

    @lru_cache(maxsize=None)
    def run(block_size):
        engine = make_engine("continuous", loaded, max_batch=max_batch, block_size=block_size)
        return engine, engine.run(requests)

    def show(block_size):
        engine, log = run(block_size)
        m = summarize(log)
        plots.block_map(engine.block_trace, engine.cache.allocator.n_blocks, title=(
            f"blocks of {block_size} tokens: {engine.cache.allocator.n_blocks} blocks, "
            f"{100 * m['kv_waste']:.1f}% of the reserved places empty on average"))
        plt.show()

    return _pick(show, sizes, "block size")


def operating_point_explorer(run, rates, batches, ttft_slos):
    """Pick an arrival rate, a max batch and a TTFT target. ``run(rate, max_batch[, slo])`` is a
    cached simulated run (``tradeoffs.simulated``): the point on the trade-off curve, and the
    queue over time with and without admission control."""
    from course_lib.engines.policies import SLO
    from course_lib.measure.tradeoffs import point, sweep

    def show(rate, max_batch, ttft_slo):
        slo = SLO(ttft_s=ttft_slo)
        free, gated = run(rate, max_batch), run(rate, max_batch, slo)
        for name, log, adm in (("admit everything", free, False), ("admission control", gated, True)):
            p = point(log, rate, max_batch, slo, admission=adm)
            print(f"{name:>18}: {p['tokens_per_s']:7.0f} tok/s, TTFT p50 {p['ttft_p50']:.3g} s / p99 "
                  f"{p['ttft_p99']:.3g} s, TPOT p50 {1e3 * p['tpot_p50']:.1f} ms, refused {p['refused']}, "
                  f"goodput {p['goodput_rps'] or 0:.2f} req/s ({100 * (p['attainment'] or 0):.0f}% within the SLO)")
        _, ax = plt.subplots(1, 2, figsize=(13, 4))
        plots.throughput_latency(sweep(run, rates, [max_batch]), ax=ax[0], latency="ttft_p50")
        here = point(free, rate, max_batch)
        ax[0].plot(here["tokens_per_s"], here["ttft_p50"], "r*", ms=14, label="this point")
        ax[0].axhline(ttft_slo, color="red", lw=0.8, ls="--", label="TTFT target")
        ax[0].legend(fontsize=7)
        plots.queue_depth({"admit everything": free, "admission control": gated}, ax=ax[1])
        plt.show()

    return _pick(show, rates, "rate (req/s)", max_batch=(batches, "max_batch"),
                 ttft_slo=(ttft_slos, "TTFT SLO (s)"))


def ladder_explorer(result):
    """Pick a rung of a ladder result (``course_lib.measure.ladder``) and see its steps over time."""
    runs = {r["rung"]: r for r in result["runs"] if "error" not in r and r.get("steps")}

    def show(rung):
        r = runs[rung]
        m = r["metrics"]
        print(f"{rung}: {m['output_tokens_per_s']:.0f} tok/s, {m['steps']} steps, "
              f"step time p50 {1e3 * m['step_time_s']['p50']:.1f} ms, MBU {100 * (m['mbu'] or 0):.1f}%, "
              f"preemptions {m.get('preemptions') or 0}")
        plots.run_steps(r, ax=plt.subplots(figsize=(10, 3.5))[1])
        plt.show()
    return _pick(show, list(runs), "rung")
