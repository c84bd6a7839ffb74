"""Store a result the course shows, keeping only what a notebook, figure or test reads.

    python -m bench.store FILE [FILE ...] [--drop requests steps] [--step-fields rows] [--gzip]

Drops the named keys from the file and from each of its ``runs`` (or keeps only ``--step-fields``
of each step), writes it back and records what it dropped in ``slimmed``. JSON over about
100 kB is better gzipped (``--gzip``; ``course_lib.lab.nbtools.load_result`` reads both).
"""
import argparse
import gzip
import json
from pathlib import Path


def slim(result: dict, drop=(), step_fields=None) -> dict:
    for run in [result, *result.get("runs", [])]:
        for key in drop:
            run.pop(key, None)
        if step_fields is not None and "steps" in run:
            run["steps"] = [{k: s[k] for k in step_fields if k in s} for s in run["steps"]]
    said = [f"{', '.join(drop)} dropped"] if drop else []
    if step_fields is not None:
        said.append(f"each step's fields but {', '.join(step_fields)} dropped")
    result["slimmed"] = ("; ".join(said)
                         + ": nothing reads them (the run's command makes them again)")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--drop", nargs="*", default=["requests", "steps"])
    p.add_argument("--step-fields", nargs="*", default=None)
    p.add_argument("--gzip", action="store_true")
    a = p.parse_args(argv)
    for f in a.files:
        r = slim(json.loads(f.read_text()), a.drop, a.step_fields)
        text = json.dumps(r, indent=1) + "\n"
        if a.gzip:
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(text.encode(), mtime=0))
            f.unlink()
        else:
            f.write_text(text)
        print(f"stored {f}{'.gz' if a.gzip else ''}: {r['slimmed']}")


if __name__ == "__main__":
    main()
