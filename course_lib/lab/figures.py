"""Regenerate the course figures in ``vis/`` (``python -m course_lib.lab.figures``), each from a
measurement made now on this machine, next to the stored GPU results (labelled with their card)."""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from course_lib.lab import plots
from course_lib.lab.nbtools import load_result, stored_results
from course_lib.measure import roofline
from course_lib.model import models
from course_lib.model.llama import Llama

VIS = Path(__file__).resolve().parents[2] / "vis"


def _save(path: Path, **kwargs) -> Path:
    """Save the figure drawn last to ``path`` and close it."""
    plt.tight_layout()
    plt.savefig(path, **kwargs)
    plt.close("all")
    return path


def chapter01(out: Path, model_name: str = "smollm2-135m", repeat: int = 5) -> list:
    """Step time vs batch size, and the roofline: this machine live, the stored GPU runs beside."""
    model = Llama.from_hf(models.load(model_name).model)
    peaks = roofline.measure_peaks("cpu", model.dtype)
    rows = roofline.batch_sweep(model, peaks, (1, 2, 4, 8, 16, 32, 64), 128, 256, repeat)
    gpu = [r for r in stored_results("ch01_batch_sweep") if r["device"]["device"] != peaks.device]
    series = plots.by_mode(rows, f"{model_name}, {peaks.device}")
    for run in gpu:
        series.update(plots.by_mode(run["rows"],
                                    f"{run['model']}, {run['device']['device']} (stored)"))
    plots.step_time_vs_batch(series)
    paths = [_save(out / "step_time_vs_batch.png", dpi=110)]
    _, axes = plt.subplots(1, 1 + len(gpu), figsize=(6.5 * (1 + len(gpu)), 4.5), squeeze=False)
    plots.roofline(peaks, rows, ax=axes[0, 0], label=model_name)
    for ax, run in zip(axes[0, 1:], gpu):
        plots.roofline(roofline.Peaks(**run["device"]), run["rows"], ax=ax,
                       label=f"{run['model']} (stored)")
    return paths + [_save(out / "roofline.png", dpi=110)]


def chapter04(out: Path, model_name: str = "smollm2-135m", n: int = 16, max_batch: int = 4,
              max_new_tokens: int = 64) -> list:
    """The seed's figure, from a real run: static vs continuous batching of the same requests."""
    from course_lib.engines import make_engine
    from course_lib.measure.metrics import summarize
    from course_lib.requests import chat_workload
    loaded = models.load(model_name)
    requests = chat_workload(loaded.tokenizer, n=n, max_new_tokens=max_new_tokens)
    logs = {e: make_engine(e, loaded, max_batch=max_batch).run(requests)
            for e in ("static", "continuous")}
    _, axes = plt.subplots(2, 1, figsize=(10, 9))
    xmax = max(log.wall_s for log in logs.values())
    for ax, (name, log) in zip(axes, logs.items()):
        m = summarize(log)
        plots.timeline(log, ax=ax, xmax=xmax, title=(
            f"{name} batching, max_batch={max_batch}: {m['output_tokens_per_s']:.1f} tok/s, "
            f"slot utilisation {100 * m['slot_utilisation']:.0f}% "
            f"({model_name}, {n} chat requests, CPU)"))
    return [_save(out / "batching_comparison.svg")]


def chapter09(out: Path) -> list:
    """The ladder against the card's physical floor, and utilisation per rung: drawn from the
    stored GPU run (this figure needs a GPU run to change; ``bash bench/gpu/gpu_ladder09.sh``)."""
    result = load_result("ladder09_anyscale_llama-1b-dummy_nvidia-h200.json")
    _, axes = plt.subplots(2, 1, figsize=(10, 8))
    plots.ladder_vs_floor(result, ax=axes[0])
    plots.utilisation_by_rung(result, ax=axes[1])
    axes[1].set_title(f"stored run, commit {result['versions']['course_lib_commit']}")
    return [_save(out / "ladder_vs_floor.svg")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=VIS)
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for path in chapter01(a.out, a.model) + chapter04(a.out, a.model) + chapter09(a.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
