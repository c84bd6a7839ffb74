"""The course's pictures, each drawn from the records of a real run."""
from __future__ import annotations

from collections import Counter, defaultdict

import matplotlib.pyplot as plt
import numpy as np


def _ax(ax, figsize, *grid):
    """``ax``, or a new figure's axes of ``figsize`` (``grid``: rows and columns of them)."""
    return ax if ax is not None else plt.subplots(*grid, figsize=figsize)[1]


def _finish(ax, xlabel=None, ylabel=None, title=None, legend=None, grid=False, **legend_kw):
    """Label ``ax``; ``legend``: its font size (None: no legend); ``grid``: a light grid."""
    ax.set(**{k: v for k, v in dict(xlabel=xlabel, ylabel=ylabel, title=title).items() if v})
    if legend:
        ax.legend(fontsize=legend, **legend_kw)
    if grid:
        ax.grid(alpha=0.3)
    return ax


def _mode(row) -> str:
    return row.get("mode", "eager")


def step_time_vs_batch(series: dict, ax=None):
    """Decode-step time and tokens/s against batch size; ``series``: label -> sweep rows."""
    ax = _ax(ax, (11, 4), 1, 2)
    for label, rows in series.items():
        rows = [r for r in rows if r["kind"] == "decode"]
        b = [r["batch"] for r in rows]
        ax[0].plot(b, [r["step_s"] * 1e3 for r in rows], "o-", label=label)
        ax[1].plot(b, [r["tokens_per_s"] for r in rows], "o-", label=label)
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        _finish(a, "batch size (sequences per decode step)", grid=True)
    _finish(ax[0], ylabel="decode step time (ms)", legend=8,
            title="While memory-bound, a step costs about the same\nfor 1 or many sequences...")
    _finish(ax[1], ylabel="tokens / s", title="...so throughput grows with the batch")
    plt.tight_layout()
    return ax


def roofline(peaks, rows, ax=None, label=None):
    """The roofline of a device (measured peaks) with the timed steps placed on it."""
    ax = _ax(ax, (6.5, 4.5))
    x = np.logspace(-1, 4, 200)
    ax.plot(x, np.minimum(x * peaks.bandwidth, peaks.flops) / 1e12, "k-", lw=1.5,
            label=f"roofline of {peaks.device} ({peaks.dtype})")
    ax.axvline(peaks.ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {peaks.ridge:.0f} FLOP/B", (peaks.ridge, peaks.flops / 1e12 / 30),
                rotation=90, color="grey", ha="right", fontsize=8)
    markers = {("eager", "decode"): "o", ("eager", "prefill"): "s",
               ("graph", "decode"): "^", ("graph", "prefill"): "D"}
    for mode in dict.fromkeys(map(_mode, rows)):
        for kind in ("decode", "prefill"):
            sel = [r for r in rows if r["kind"] == kind and _mode(r) == mode]
            at = [(r["intensity"], r["flops"] / r["step_s"] / 1e12) for r in sel]
            if sel:
                ax.scatter(*zip(*at), marker=markers[mode, kind], zorder=3,
                           label=f"{label + ': ' if label else ''}{kind} steps, {mode}")
            for r, xy in zip(sel, at):
                ax.annotate(f"B={r['batch']}" if kind == "decode" else f"{r['new_tokens']} tok",
                            xy, fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set(xscale="log", yscale="log")
    ax.grid(alpha=0.3, which="both")
    return _finish(ax, "arithmetic intensity (FLOP per byte moved)", "achieved TFLOP/s",
                   legend=8, loc="lower right")


def by_mode(rows, label: str) -> dict:
    """Split sweep rows into series by timing mode ("eager", "graph") for the plots."""
    return {f"{label}, {m}": [r for r in rows if _mode(r) == m]
            for m in dict.fromkeys(map(_mode, rows))}


def utilisation_bars(rows, batches=(1, 8, 64), ax=None, title=None, mode="eager"):
    """MBU and MFU of the decode steps at a few batch sizes."""
    ax = _ax(ax, (5.5, 3.5))
    sel = [r for r in rows if r["kind"] == "decode" and r["batch"] in batches
           and _mode(r) == mode]
    x = np.arange(len(sel))
    ax.bar(x - 0.2, [100 * r["mbu"] for r in sel], 0.4, label="MBU (bandwidth)")
    ax.bar(x + 0.2, [100 * r["mfu"] for r in sel], 0.4, label="MFU (compute)")
    ax.set_xticks(x, [f"B={r['batch']}" for r in sel])
    return _finish(ax, ylabel="% of the measured peak", title=title or "decode-step utilisation",
                   legend="medium")


# ---------------------------------------------------------------- timelines of real runs
COLOURS = {"waiting": "#d9d9d9", "prefill": "#1f4e79", "decode": "#5b9bd5", "held": "#f4b183",
           "stalled": "#c9a0dc"}
LABELS = {"waiting": "waiting", "prefill": "prefill", "decode": "decode",
          "held": "finished, row still held", "stalled": "stalled by another's prefill"}
RUN_TIME = "time since the run started (s)"


def _intervals(log):
    """(request id, kind) -> [(start, end)], from the step log and the request records."""
    spans, first = defaultdict(list), {}
    first_token = {r.id: r.token_times[0] if r.token_times else float("inf")
                   for r in log.requests}
    for s in log.steps:
        span = s.start_s, s.end_s
        for rid in s.active:
            # a request computes its prompt until its first token comes out, then decodes
            spans[rid, "prefill" if s.end_s <= first_token[rid] else "decode"].append(span)
            first.setdefault(rid, s.start_s)
        for rid in s.held:
            spans[rid, "held"].append(span)
    done = {r.id: r.finish_s for r in log.requests}
    for s in log.steps:
        if s.kind == "prefill":      # sequences already running, idle while newcomers prefill
            busy = set(s.active) | set(s.held)
            for rid, t0 in first.items():
                if rid not in busy and t0 < s.start_s < (done[rid] or 0):
                    spans[rid, "stalled"].append((s.start_s, s.end_s))
    for r in log.requests:
        if r.id in first and first[r.id] > r.arrival_s:
            spans[r.id, "waiting"] = [(r.arrival_s, first[r.id])]
    return spans


def timeline(log, ax=None, title=None, max_requests: int = 40, xmax=None):
    """A Gantt chart of a real run: a row per request, coloured by what it waits for or does."""
    served = [r for r in log.requests if r.finish_reason != "refused"][:max_requests]
    ax = _ax(ax, (10, 0.22 * len(served) + 1.2))
    spans = _intervals(log)
    for y, r in enumerate(served):
        for kind in ("waiting", "held", "stalled", "decode", "prefill"):
            bars = [(a, b - a) for a, b in spans.get((r.id, kind), [])]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLOURS[kind], linewidth=0)
    ax.set_yticks(range(len(served)), [r.id for r in served], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax or max((r.finish_s or 0) for r in served) * 1.01)
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()],
              [LABELS[k] for k in COLOURS], fontsize=7, loc="lower right", ncol=5)
    return _finish(ax, RUN_TIME, title=title)


def batch_over_time(logs: dict, ax=None):
    """Rows per step (and how many of them did useful work) against time."""
    ax = _ax(ax, (10, 3))
    for label, log in logs.items():
        steps = [s for s in log.steps if s.kind == "decode"]
        t = [s.start_s for s in steps]
        line, = ax.step(t, [s.rows for s in steps], where="post", label=f"{label}: rows computed")
        ax.step(t, [len(s.active) for s in steps], where="post", ls=":", color=line.get_color(),
                label=f"{label}: rows with useful work")
    return _finish(ax, RUN_TIME, "sequences per decode step", legend=7, grid=True)


def ladder(runs, ax=None, metric="output_tokens_per_s", label="output tokens / s", names=None):
    """A bar per engine of a ladder run (the bench JSON of each), named by engine or ``names``."""
    ax = _ax(ax, (8, 3.5))
    names = names or [r["engine"] for r in runs]
    values = [r["metrics"][metric] or 0 for r in runs]
    bars = ax.bar(names, values,
                  color=["#9e9e9e" if n.startswith(("hf-", "vllm")) else "#5b9bd5" for n in names])
    ax.bar_label(bars, labels=[f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:,.3g}" for v in values],
                 fontsize=8)
    return _finish(ax, ylabel=label)


def step_composition(log, ax=None, title=None):
    """Each step as a bar of its prefill and decode tokens, at the time it ran."""
    ax = _ax(ax, (10, 3))
    x = [s.start_s for s in log.steps]
    w = [max(s.seconds, 1e-4) for s in log.steps]
    pre = [s.prefill_tokens for s in log.steps]
    ax.bar(x, pre, width=w, align="edge", color=COLOURS["prefill"], label="prefill tokens")
    ax.bar(x, [s.decode_tokens for s in log.steps], width=w, bottom=pre, align="edge",
           color=COLOURS["decode"], label="decode tokens")
    return _finish(ax, RUN_TIME, "tokens in the step", title, legend=8)


def token_gaps(log, ax=None, title=None, prefix=None):
    """The wait before each token of each request, at the time it came out: a stall is a spike."""
    ax = _ax(ax, (10, 3))
    for r in log.requests:
        if len(r.token_times) > 1 and r.id.startswith(prefix or ""):
            ax.plot(r.token_times[1:], [1e3 * g for g in r.gaps_s], ".-", lw=0.8, ms=3, label=r.id)
    return _finish(ax, RUN_TIME, "wait for this token (ms)", title, legend=7, grid=True, ncol=4)


def memory_map(rows: dict, capacity: float | None = None, ax=None, title=None):
    """A card's memory in GB, a bar per case: ``rows`` maps a label to ``{part: bytes}``, stacked
    left to right; ``capacity``: the card's, a line."""
    ax = _ax(ax, (10, 0.6 + 0.55 * len(rows)))
    colours = {}
    for y, (label, parts) in enumerate(rows.items()):
        left = 0.0
        for part, nbytes in parts.items():
            c = colours.setdefault(part, plt.get_cmap("tab10")(len(colours)))
            ax.barh(y, nbytes / 1e9, left=left, color=c, label=part if y == 0 else None)
            left += nbytes / 1e9
    if capacity:
        ax.axvline(capacity / 1e9, color="black", ls="--", lw=1, label="the card's memory")
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.invert_yaxis()
    return _finish(ax, "GB", None, title, legend=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def preemptions_in(trace) -> list:
    """``(step, sequence)`` per preemption in a block trace: a sequence gone for a while, or back
    at once with a table that no longer starts as before (recomputed from its first token)."""
    out, last = [], {}
    for step, snap in enumerate(trace):
        for sid, table in snap.items():
            if sid in last:
                seen, old = last[sid]
                if seen < step - 1 or len(table) < len(old) or table[:1] != old[:1]:
                    out.append((seen + 1 if seen < step - 1 else step, sid))
            last[sid] = step, table
    return out


def block_map(trace, n_blocks: int, ax=None, title=None, follow=None):
    """Which sequence owns each block of the paged cache after each step (white: free);
    ``follow``: one sequence in red, the rest grey. Triangles above mark preemptions."""
    owners = sorted({sid for snap in trace for sid in snap}, key=str)
    index = {sid: i for i, sid in enumerate(owners)}
    grid = np.full((n_blocks, len(trace)), np.nan)
    for step, snap in enumerate(trace):
        for sid, table in snap.items():
            grid[table, step] = index[sid] if follow is None else float(sid == follow)
    ax = _ax(ax, (10, 3.5))
    if follow is None:
        cmap, top = plt.get_cmap("tab20"), max(len(owners) - 1, 1)
    else:
        cmap, top = plt.matplotlib.colors.ListedColormap(["#c8c8c8", "#d62728"]), 1
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
              cmap=cmap.with_extremes(bad="white"), vmin=0, vmax=top)
    for step, sid in preemptions_in(trace):
        ax.plot(step, -1.5, "v", color="#d62728" if sid == follow else "black", ms=6,
                clip_on=False)
    ax.set_ylim(n_blocks - 0.5, -0.5)
    ax.set_title(title or "", pad=14)              # above the triangles
    return _finish(ax, "step", "block")


def block_tables(tables: dict, ax=None, title=None):
    """A row per sequence: its logical blocks left to right, each labelled with the physical
    block holding it; a block several sequences hold (a shared prefix) has a colour of its own."""
    holders = Counter(b for table in tables.values() for b in table)
    shared = sorted(b for b, n in holders.items() if n > 1)
    colour = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(shared)}
    width = max(map(len, tables.values()), default=1)
    ax = _ax(ax, (min(1 + 0.45 * width, 14), 0.5 + 0.45 * len(tables)))
    for row, (sid, table) in enumerate(tables.items()):
        for col, b in enumerate(table):
            ax.add_patch(plt.Rectangle((col, row), 0.95, 0.9, color=colour.get(b, "#e6e6e6")))
            ax.text(col + 0.47, row + 0.45, str(b), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, width)
    ax.set_ylim(len(tables), 0)
    ax.set_yticks(np.arange(len(tables)) + 0.45, [str(s) for s in tables], fontsize=8)
    ax.set_xticks([])
    return _finish(ax, "logical block (the sequence's tokens, block by block)", None, title)


# ------------------------------------------------------------ chapter 08: metrics and trade-offs
def latency_distributions(logs: dict, axes=None):
    """TTFT, TPOT and end-to-end latency of the served requests, as cumulative distributions."""
    axes = _ax(axes, (13, 3.5), 1, 3)
    kinds = {"ttft_s": "time to first token (s)", "tpot_s": "time per output token (s)",
             "e2e_s": "end-to-end latency (s)"}
    for label, log in logs.items():
        served = [r for r in log.requests if r.finish_reason in ("eos", "length")]
        for ax, attr in zip(axes, kinds):
            v = np.sort([getattr(r, attr) for r in served if getattr(r, attr) is not None])
            ax.step(v, np.arange(1, len(v) + 1) / max(len(v), 1), where="post", label=label)
    for ax, name in zip(axes, kinds.values()):
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.axhline(0.99, color="grey", lw=0.6, ls=":")
        _finish(ax, name, grid=True)
    _finish(axes[0], ylabel="share of requests", legend=8)
    plt.tight_layout()
    return axes


def throughput_latency(rows, ax=None, latency="tpot_p50", measured=None, title=None,
                       label="simulated", real_sweep=None):
    """Throughput (x) against a latency (y), a curve per ``max_batch`` through rising arrival
    rates; ``real_sweep``: dashed in the same colours; ``measured``: real runs, black markers."""
    ax, colours = _ax(ax, (7.5, 4.5)), {}

    def curves(rows, style, name, **kw):
        for b in sorted({r["max_batch"] for r in rows}):
            pts = sorted((r for r in rows if r["max_batch"] == b), key=lambda r: r["rate"] or 1e9)
            line, = ax.plot([r["tokens_per_s"] for r in pts], [r[latency] for r in pts], style,
                            color=colours.get(b), label=f"max_batch {b} ({name})", **kw)
            colours.setdefault(b, line.get_color())
    curves(rows, "o-", label, ms=3)
    curves(real_sweep or [], "s--", "measured sweep", ms=5, mfc="none")
    for i, r in enumerate(measured or []):
        xy = r["tokens_per_s"], r[latency]
        ax.plot(*xy, "kx", ms=9, mew=2, label=None if i else "measured here")
        ax.annotate(f"B={r['max_batch']}, {r['rate'] or 'all'}/s", xy, fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_yscale("log")
    return _finish(ax, "output tokens / s", latency.replace("_", " ") + " (s)",
                   title or "each point: one arrival rate; further right = more load",
                   legend=7, grid=True)


def queue_depth(logs: dict, ax=None):
    """Requests waiting for their first step, over time, for each run."""
    from course_lib.measure.metrics import queue_depth as depth
    ax = _ax(ax, (10, 3))
    for label, log in logs.items():
        ax.step(*depth(log), where="post", label=label)
    return _finish(ax, "time since the first arrival (s)", "requests waiting", legend=8, grid=True)


def goodput_vs_load(rows, ax=None, title=None):
    """Goodput (requests / s served within the SLO) against arrival rate, with and without
    admission control."""
    ax = _ax(ax, (7, 4))
    for adm in (False, True):
        pts = sorted((r for r in rows if r.get("admission") == adm), key=lambda r: r["rate"])
        if pts:
            ax.plot([r["rate"] for r in pts], [r["goodput_rps"] or 0 for r in pts], "o-",
                    label="with admission control" if adm else "admit everything")
    return _finish(ax, "arrival rate (requests / s)", "goodput (requests / s within the SLO)",
                   title, legend=8, grid=True)


# ---------------------------------------------------------------- chapter 09
def _rungs(result, ax, figsize):
    """The rungs of a ladder result that ran, in order, and ``ax`` with a tick for each."""
    from course_lib.measure.ladder import label, ordered
    runs, ax = [r for r in ordered(result["runs"]) if "error" not in r], _ax(ax, figsize)
    ax.set_xticks(range(len(runs)), [label(r["rung"]) for r in runs], rotation=35, ha="right",
                  rotation_mode="anchor", fontsize=8)
    return runs, ax


def ladder_vs_floor(result, ax=None):
    """A bar per rung of a ladder result, the peers in grey, labelled with its tokens/s (log
    scale), and the workload's physical floor on the same card as a line."""
    runs, ax = _rungs(result, ax, (10, 5))
    values = [r["metrics"]["output_tokens_per_s"] or 0 for r in runs]
    x = np.arange(len(runs))
    peer = [r["rung"].startswith(("hf-", "vllm")) for r in runs]
    bars = ax.bar(x, values, color=["#9e9e9e" if p else "#5b9bd5" for p in peer])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_yscale("log")
    if result.get("floor"):
        f = result["floor"]["output_tokens_per_s"]
        ax.axhline(f, color="#c00000", ls="--")
        ax.text(x[-1] + 0.4, f * 1.05, f"physical floor: {f:,.0f} tok/s", color="#c00000",
                fontsize=8, ha="right", va="bottom")
        ax.set_ylim(top=f * 1.6)
    title = f"{result['model']} on {result['device']['device']}, {result['n']} requests"
    return _finish(ax, ylabel="output tokens / s (log scale)", title=title)


def utilisation_by_rung(result, ax=None):
    """MBU and MFU (from the bytes and FLOPs every step must move and do) next to NVML's 'GPU
    utilisation' (the share of time any kernel ran), per rung."""
    runs, ax = _rungs(result, ax, (10, 3.5))
    x = np.arange(len(runs))
    for i, (key, label, colour) in enumerate([("mbu", "MBU", "#1f4e79"), ("mfu", "MFU", "#5b9bd5"),
                                              ("nvml_gpu_util", "NVML utilisation", "#f4b183")]):
        vals = [(r["metrics"][key] or 0) * (1 if key == "nvml_gpu_util" else 100) for r in runs]
        ax.bar(x + (i - 1) * 0.27, vals, width=0.27, label=label, color=colour)
    return _finish(ax, ylabel="% of the card", legend=8)


def decode_step_curve(results, ax=None):
    """MBU of a whole decode step against batch size, per way of timing it (bench/decode_step)."""
    ax = _ax(ax, (8, 3.5))
    styles = [("mbu_gpu", "graph replay (GPU time)", "-"),
              ("mbu_unfused", "graph replay, unfused elementwise", "-."),
              ("mbu_step", "graph step (wall time)", "--"),
              ("mbu_eager", "eager step (wall time)", ":")]
    for res, marker in zip(results, "os^"):
        b = [r["batch"] for r in res["rows"]]
        for key, label, ls in styles:
            if all(key in r for r in res["rows"]):
                ax.plot(b, [100 * r[key] for r in res["rows"]], ls=ls, marker=marker,
                        label=f"{res['model']}: {label}")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for res in results for r in res["rows"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    return _finish(ax, "sequences in the decode step", "MBU (%)", legend=7, loc="upper left",
                   bbox_to_anchor=(1.01, 1))


def run_steps(run, ax=None):
    """Each step of a stored run (a bench JSON with ``steps``): its duration at the time it
    started, coloured by kind, with its batch size on a second axis."""
    from course_lib.measure.metrics import steps_of
    ax, steps = _ax(ax, (10, 3.5)), steps_of(run)
    colour = {"prefill": COLOURS["prefill"], "decode": COLOURS["decode"], "mixed": "#f4b183"}
    for kind in ("prefill", "mixed", "decode"):
        pts = [(s.start_s, 1e3 * s.seconds) for s in steps if s.kind == kind]
        if pts:
            ax.scatter(*zip(*pts), s=6, color=colour[kind], label=f"{kind} steps ({len(pts)})")
    ax.set_yscale("log")
    _finish(ax, RUN_TIME, "step time (ms)", legend=8, loc="upper left")
    twin = ax.twinx()
    twin.plot([s.start_s for s in steps], [s.rows for s in steps], color="#7f7f7f", lw=0.8)
    twin.set_ylabel("sequences in the step", color="#7f7f7f")
    return ax


def prefill_attention(rows, ax=None):
    """The prompts' attention in a mixed step (``metrics.prefill_rows``): FlexAttention and the
    copy before it, GPU ms per step, per way of reading the keys and kind of blocks."""
    ax = _ax(ax, (8, 0.45 * len(rows) + 1))
    y = np.arange(len(rows))
    flex, copy = [r["flex_ms"] for r in rows], [r["copy_ms"] for r in rows]
    ax.barh(y, flex, color="#1f4e79", label="FlexAttention")
    ax.barh(y, copy, left=flex, color="#f4b183", label="the copy out of the cache")
    ax.set_yticks(y, [f"{'packed copy' if r['prefill'] == 'gathered' else 'in place'}, "
                      f"{r['blocks']} blocks, tiles {r['tiles']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    return _finish(ax, "GPU ms per mixed step (16 prompts of 512 tokens, 16 layers)", legend=8)
