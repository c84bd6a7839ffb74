"""Store a result the course shows, keeping only what a notebook, figure or test reads.

    python -m bench.store FILE [FILE ...] [--drop requests steps] [--step-fields rows]
        [--request-fields id arrival_s] [--decimals 6] [--gzip]

Drops the named keys from the file and from each of its ``runs`` (or keeps only ``--step-fields``
of each step and ``--request-fields`` of each request), rounds the runs' numbers to
``--decimals`` (6: times to the microsecond), writes it back and records what it did in
``slimmed``. JSON over about 100 kB is better gzipped (``--gzip``, or a ``.gz`` file kept so;
``course_lib.lab.nbtools.load_result`` reads both).
"""
import argparse
import gzip
import json
from pathlib import Path


def rounded(x, decimals: int):
    if isinstance(x, float):
        return round(x, decimals)
    if isinstance(x, list):
        return [rounded(v, decimals) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, decimals) for k, v in x.items()}
    return x


def slim(result: dict, drop=(), step_fields=None, request_fields=None, decimals=None) -> dict:
    for run in [result, *result.get("runs", [])]:
        for key in drop:
            run.pop(key, None)
        for key, fields in (("steps", step_fields), ("requests", request_fields)):
            if fields is not None and key in run:
                run[key] = [{k: s[k] for k in fields if k in s} for s in run[key]]
    if decimals is not None and "runs" in result:
        result["runs"] = rounded(result["runs"], decimals)
    said = [f"{', '.join(drop)} dropped"] if drop else []
    for key, fields in (("step", step_fields), ("request", request_fields)):
        if fields is not None:
            said.append(f"each {key}'s fields but {', '.join(fields)} dropped")
    if decimals is not None:
        said.append(f"the runs' numbers rounded to {decimals} decimals")
    result["slimmed"] = ("; ".join(said)
                         + ": nothing reads them (the run's command makes them again)")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--drop", nargs="*", default=["requests", "steps"])
    p.add_argument("--step-fields", nargs="*", default=None)
    p.add_argument("--request-fields", nargs="*", default=None)
    p.add_argument("--decimals", type=int, default=None)
    p.add_argument("--gzip", action="store_true")
    a = p.parse_args(argv)
    for f in a.files:
        zipped = f.suffix == ".gz"
        raw = gzip.decompress(f.read_bytes()) if zipped else f.read_bytes()
        r = slim(json.loads(raw), a.drop, a.step_fields, a.request_fields, a.decimals)
        text = json.dumps(r, indent=1) + "\n"
        if zipped:
            f.write_bytes(gzip.compress(text.encode(), mtime=0))
        elif a.gzip:
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(text.encode(), mtime=0))
            f.unlink()
        else:
            f.write_text(text)
        print(f"stored {f}{'.gz' if a.gzip else ''}: {r['slimmed']}")


if __name__ == "__main__":
    main()
