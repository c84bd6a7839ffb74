"""Fit the step-cost model to some stored runs of one device and predict the others.

    python -m bench simulator_validation --fit R1.json R2.json --predict R3.json R4.json \\
        --out bench/results/simulator_<device>.json

Writes the fitted ``CostBook`` (one model per implementation path) and, for every run, the
simulated and measured throughput, TTFT, TPOT and end-to-end latency with the relative error;
runs in ``--fit`` are marked as such (their errors are in-sample).
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bench import command
from course_lib.bench import save_result
from course_lib.measure.simulator import CostBook, runs_in, validate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--fit", nargs="+", required=True)
    p.add_argument("--predict", nargs="+", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    def load(paths):
        return [r for x in paths for r in runs_in(json.loads(Path(x).read_text()))]
    fit, held_out = load(a.fit), load(a.predict)
    book = CostBook.fit(fit)
    rows = [{**validate(book, r), "in_fit": r in fit}
            for r in fit + held_out]
    for row in rows:
        print(("fitted   " if row["in_fit"] else "predicted") + " | " + row["run"] + " | "
              + ", ".join(f"{k} {100 * v['error']:+.0f}%" for k, v in row.items()
            if isinstance(v, dict) and v.get("error") is not None))
    save_result({"device": fit[0]["device"],
                 "cost_book": {k: asdict(c) for k, c in book.paths.items()},
                 "fit_files": a.fit, "predict_files": a.predict, "rows": rows}, a.out,
                command("simulator_validation", argv))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
