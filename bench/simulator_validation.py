"""Fit the step-cost model to some stored runs of one device and predict the others.

    python -m bench simulator_validation --fit R1.json R2.json --predict R3.json R4.json \\
        --out bench/results/simulator_<device>.json
    python -m bench simulator_validation --fit SWEEP.json.gz --where max_batch=2,32 \\
        --where arrival_rate=None --out bench/results/cpu/simulator_cpu.json

``--where KEY=V1,V2``: of the runs in the ``--fit`` files, fit only to those whose ``KEY`` is
one of the values (every ``--where`` must hold) and predict the rest. Writes the fitted
``CostBook`` (one model per implementation path) and, for every run, the simulated and measured
throughput, TTFT, TPOT and end-to-end latency with the relative error; runs fitted to are marked
``in_fit`` (their errors are in-sample). ``--medians``: the runs are repeats (``bench curve
--repeat``); also compare each point's prediction with the median of its measured runs
(``medians``), the figure a prediction can be held to when identical runs spread.
"""
import argparse
import statistics
import sys
from dataclasses import asdict

from bench import command
from course_lib.bench import save_result
from course_lib.lab.nbtools import read_result
from course_lib.measure.simulator import CostBook, runs_in, validate


def load(paths) -> list:
    return [r for x in paths for r in runs_in(read_result(x))]


def selected(run: dict, where: list) -> bool:
    """Whether ``run`` has, for every ``KEY=V1,V2`` of ``where``, one of the values."""
    return all(str(run.get(k)) in v.split(",") or str(run.get(k)).removesuffix(".0") in v.split(",")
               for k, v in (w.split("=", 1) for w in where))


def medians(rows: list) -> list:
    """One row per point (the same run name, fitted or not): each metric's simulated value and the
    median of the measured ones, with its relative error; ``repeats``: how many runs."""
    groups = {}
    for row in rows:
        groups.setdefault((row["run"], row["in_fit"]), []).append(row)
    out = []
    for (run, in_fit), group in groups.items():
        point = {k: v for k, v in group[0].items() if not isinstance(v, dict)}
        point["repeats"] = len(group)
        for k, v in group[0].items():
            if isinstance(v, dict):
                sim = statistics.median(r[k]["simulated"] for r in group)
                measured = statistics.median(r[k]["measured"] for r in group)
                point[k] = {"simulated": sim, "measured": measured,
                            "error": (sim - measured) / measured if measured else None}
        out.append(point)
    return out


def describe(row: dict) -> str:
    return (("fitted   " if row["in_fit"] else "predicted") + " | " + row["run"]
            + (f" (median of {row['repeats']})" if "repeats" in row else "") + " | "
            + ", ".join(f"{k} {100 * v['error']:+.0f}%" for k, v in row.items()
                        if isinstance(v, dict) and v.get("error") is not None))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--fit", nargs="+", required=True)
    p.add_argument("--where", action="append", default=[], metavar="KEY=V1,V2")
    p.add_argument("--predict", nargs="*", default=[])
    p.add_argument("--medians", action="store_true",
                   help="compare each point with the median of its repeated runs")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    runs = load(a.fit)
    fit = [r for r in runs if selected(r, a.where)]
    held_out = [r for r in runs if not selected(r, a.where)] + load(a.predict)
    book = CostBook.fit(fit)
    rows = [{**validate(book, r), "in_fit": r in fit, "max_batch": r["max_batch"],
             "arrival_rate": r.get("arrival_rate")} for r in fit + held_out]
    points = medians(rows) if a.medians else None
    for row in points or rows:
        print(describe(row))
    save_result({"device": fit[0]["device"],
                 "cost_book": {k: asdict(c) for k, c in book.paths.items()},
                 "fit_files": a.fit, "where": a.where, "predict_files": a.predict, "rows": rows,
                 **({"medians": points} if points else {})},
                a.out, command("simulator_validation", argv))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
