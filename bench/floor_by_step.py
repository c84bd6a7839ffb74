"""Where a stored run loses against its floor, by kind of step: for each step of a rung's step
log, the least time its work needs on the run's card (its bytes at the measured copy bandwidth or
its FLOPs at the measured matmul rate, whichever is longer), summed per kind of step (mixed:
with prompt tokens; decode-only, by batch size) against the time the steps took.

    python -m bench floor_by_step \
        bench/results/ladder09_anyscale_llama-1b-dummy_nvidia-h200.json.gz \
        --rung fast:kv_memory_mib=16384,max_num_batched_tokens=16384
"""
import argparse
import sys

from course_lib.lab.nbtools import read_result
from course_lib.measure.roofline import step_work
from course_lib.measure.simulator import dtype_bytes_of, shape_of

KINDS = ("mixed", "decode, 1-127 rows", "decode, 128-255 rows", "decode, 256+ rows")


def kind(step) -> str:
    if step["prefill_tokens"]:
        return KINDS[0]
    return KINDS[1 + (step["rows"] >= 128) + (step["rows"] >= 256)]


def by_kind(result: dict, rung: str) -> dict:
    """``{kind: {"steps", "seconds", "floor_s"}}`` for one rung of a stored ladder."""
    run = next(r for r in result["runs"] if r["rung"] == rung)
    shape, nbytes, peaks = shape_of(result), dtype_bytes_of(result), result["device"]
    out = {k: {"steps": 0, "seconds": 0.0, "floor_s": 0.0} for k in KINDS}
    for s in run["steps"]:
        w = step_work(shape, nbytes, tokens=s["prefill_tokens"] + s["decode_tokens"],
                      attended=s["attended"], kv_read=s["kv_read"], logit_rows=s["logit_rows"])
        row = out[kind(s)]
        row["steps"] += 1
        row["seconds"] += s["end_s"] - s["start_s"]
        row["floor_s"] += max(w.bytes / peaks["bandwidth"], w.flops / peaks["flops"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("result", help="a stored ladder JSON (.json or .json.gz) with step logs")
    p.add_argument("--rung", required=True)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    result = read_result(a.result)
    rows = by_kind(result, a.rung)
    print(f"{result['device']['device']}, {result['model']}, {a.rung}")
    print(f"{'kind of step':22s} {'steps':>5s} {'time':>7s} {'floor':>7s} {'of floor':>8s}")
    for k, r in rows.items():
        if r["steps"]:
            print(f"{k:22s} {r['steps']:5d} {r['seconds']:6.3f}s {r['floor_s']:6.3f}s "
                  f"{r['floor_s'] / r['seconds']:8.0%}")
    t, f = sum(r["seconds"] for r in rows.values()), sum(r["floor_s"] for r in rows.values())
    print(f"{'all steps':22s} {sum(r['steps'] for r in rows.values()):5d} {t:6.3f}s {f:6.3f}s "
          f"{f / t:8.0%}")


if __name__ == "__main__":
    main()
