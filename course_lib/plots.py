"""The course's pictures, each drawn from the records of a real run."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def step_time_vs_batch(series: dict, ax=None):
    """Decode-step time and tokens/s against batch size. ``series``: label -> rows of
    ``roofline.batch_sweep`` (decode rows are used)."""
    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in series.items():
        rows = [r for r in rows if r["kind"] == "decode"]
        b = [r["batch"] for r in rows]
        ax[0].plot(b, [r["step_s"] * 1e3 for r in rows], "o-", label=label)
        ax[1].plot(b, [r["tokens_per_s"] for r in rows], "o-", label=label)
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("batch size (sequences per decode step)")
        a.grid(alpha=0.3)
    ax[0].set_ylabel("decode step time (ms)")
    ax[0].set_yscale("log")
    ax[0].set_title("While memory-bound, a step costs about the same\nfor 1 or many sequences...")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("tokens / s")
    ax[1].set_title("...so throughput grows with the batch")
    ax[0].legend(fontsize=8)
    plt.tight_layout()
    return ax


def roofline(peaks, rows, ax=None, label=None):
    """The roofline of a device (measured peaks) with the timed steps placed on it."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    x = np.logspace(-1, 4, 200)
    ax.plot(x, np.minimum(x * peaks.bandwidth, peaks.flops) / 1e12, "k-", lw=1.5,
            label=f"roofline of {peaks.device} ({peaks.dtype})")
    ax.axvline(peaks.ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {peaks.ridge:.0f} FLOP/B", (peaks.ridge, peaks.flops / 1e12 / 30),
                rotation=90, color="grey", ha="right", fontsize=8)
    markers = {("eager", "decode"): "o", ("eager", "prefill"): "s",
               ("graph", "decode"): "^", ("graph", "prefill"): "D"}
    for mode in dict.fromkeys(r.get("mode", "eager") for r in rows):
        for kind in ("decode", "prefill"):
            sel = [r for r in rows if r["kind"] == kind and r.get("mode", "eager") == mode]
            if not sel:
                continue
            ax.scatter([r["intensity"] for r in sel], [r["flops"] / r["step_s"] / 1e12 for r in sel],
                       marker=markers[mode, kind], zorder=3,
                       label=f"{label + ': ' if label else ''}{kind} steps, {mode}")
            for r in sel:
                ax.annotate(f"B={r['batch']}" if kind == "decode" else f"{r['new_tokens']} tok",
                            (r["intensity"], r["flops"] / r["step_s"] / 1e12), fontsize=7,
                            xytext=(3, -9), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return ax


def by_mode(rows, label: str) -> dict:
    """Split sweep rows into series by timing mode ("eager", "graph") for the plots."""
    modes = dict.fromkeys(r.get("mode", "eager") for r in rows)
    return {f"{label}, {m}": [r for r in rows if r.get("mode", "eager") == m] for m in modes}


def utilisation_bars(rows, batches=(1, 8, 64), ax=None, title=None, mode="eager"):
    """MBU and MFU of the decode steps at a few batch sizes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    sel = [r for r in rows if r["kind"] == "decode" and r["batch"] in batches
           and r.get("mode", "eager") == mode]
    x = np.arange(len(sel))
    ax.bar(x - 0.2, [100 * r["mbu"] for r in sel], 0.4, label="MBU (bandwidth)")
    ax.bar(x + 0.2, [100 * r["mfu"] for r in sel], 0.4, label="MFU (compute)")
    ax.set_xticks(x, [f"B={r['batch']}" for r in sel])
    ax.set_ylabel("% of the measured peak")
    ax.set_title(title or "decode-step utilisation")
    ax.legend()
    return ax
