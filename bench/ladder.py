"""The batching ladder: several engines on the same requests, in one run, as one JSON object.

    python bench/ladder.py --model smollm2-135m --workload chat --n 32 --max-batch 16 \\
        --max-new-tokens 128 --out bench/results/ladder_chat_cpu.json

``runs`` holds the bench CLI's JSON for each engine (``python -m course_lib.bench``), all measured
with the same loaded model, the same requests and the same device, one after the other.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib import models  # noqa: E402
from course_lib.bench import bench, describe, save_result  # noqa: E402

DEFAULT = ["sequential", "static", "dynamic", "continuous", "hf-generate", "hf-cb"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engines", nargs="+", default=DEFAULT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workload", default="chat")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential-n", type=int, default=None,
                   help="fewer requests for the unbatched baseline (it is slow)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    runs = []
    for engine in a.engines:
        n = a.sequential_n if engine == "sequential" and a.sequential_n else a.n
        r = bench(engine, a.model, a.workload, n, a.max_batch, a.dtype, a.device, tokens=True,
                  max_new_tokens=a.max_new_tokens, loaded=loaded, steps=True)
        print(describe(r), flush=True)
        runs.append(r)
    first = runs[0]
    save_result({"model": a.model, "workload": a.workload, "n": a.n, "max_batch": a.max_batch,
                 "dtype": a.dtype, "device": first["device"], "versions": first["versions"],
                 "runs": runs}, a.out, "python " + " ".join(shlex.quote(x) for x in sys.argv))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
