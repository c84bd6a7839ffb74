"""The batching ladder: several engines on the same requests, in one run, as one JSON object.

    python -m bench run_ladder --model smollm2-135m --workload chat --n 32 --max-batch 16 \\
        --max-new-tokens 128 --out bench/results/ladder_chat_cpu.json

``runs`` holds the bench CLI's JSON for each rung (``python -m course_lib.bench``), all measured
with the same loaded model, the same requests and the same device, one after the other; each
run also names its ``rung``. A rung is an engine, chunked, paged and fast with chapter 09's settings
(``course_lib.measure.ladder``); options after a colon override its settings, e.g.
``fast:kv_memory_mib=16384``. The JSON also holds the workload's physical floor on this device.
"""
import argparse
import sys

from bench import command
from bench.decode_step import parse_knobs
from course_lib.bench import save_result
from course_lib.kernels import paged_decode
from course_lib.measure.ladder import run_ladder
from course_lib.model import models

DEFAULT = ["sequential", "static", "dynamic", "continuous", "hf-generate", "hf-cb"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", "--rungs", nargs="+", default=DEFAULT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workload", default="chat")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--big-batch", type=int, default=512, help="the paged rungs' largest batch")
    p.add_argument("--max-num-batched-tokens", "--budget", dest="max_num_batched_tokens", type=int,
                   default=2048, help="the chunked and fast rungs' tokens per step")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential-n", type=int, default=None,
                   help="fewer requests for the unbatched baseline (it is slow)")
    p.add_argument("--no-tokens", dest="tokens", action="store_false",
                   help="leave each request's output tokens out of the JSON")
    p.add_argument("--decode-knobs", default="",
                   help="the paged decode kernel's TUNING for every rung, e.g. longest_split=512")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    paged_decode.TUNING.update(parse_knobs(a.decode_knobs))
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    cmd = command("run_ladder", argv)
    result = run_ladder(loaded, a.model, a.workload, a.engines, a.n, a.max_batch, a.big_batch,
                        a.max_num_batched_tokens, a.dtype, a.device, a.max_new_tokens, a.tokens,
                        a.sequential_n, after_each=lambda partial: save_result(partial, a.out, cmd))
    if a.decode_knobs:
        result["decode_tuning"] = dict(paged_decode.TUNING)
    save_result(result, a.out, cmd)
    print("wrote", a.out, flush=True)


if __name__ == "__main__":
    main()
