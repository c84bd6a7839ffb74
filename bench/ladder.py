"""The batching ladder: several engines on the same requests, in one run, as one JSON object.

    python bench/ladder.py --model smollm2-135m --workload chat --n 32 --max-batch 16 \\
        --max-new-tokens 128 --out bench/results/ladder_chat_cpu.json

``runs`` holds the bench CLI's JSON for each rung (``python -m course_lib.bench``), all measured
with the same loaded model, the same requests and the same device, one after the other; each
run also names its ``rung``. A rung is an engine, or one of the named steps of chapter 09's
ladder (options after a colon override its settings, e.g. ``graphs:kv_memory_mib=16384``):

  static, dynamic, continuous   the padded engines of chapters 02-04, at --max-batch
  paged       + paged KV-cache: FlexAttention over blocks of 16, up to --big-batch sequences in
              the KV memory the continuous engine's rows reserve at --max-batch
  chunked     + chunked prefill: the same, under a budget of --budget tokens per step
  graphs      + the Triton decode kernel, CUDA graphs and sampling on the GPU (chapter 09)
  hf-generate, hf-cb            the peers, at --max-batch

The JSON also holds the workload's physical floor on this device (``roofline.workload_floor``).
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_lib import models  # noqa: E402
from course_lib.bench import bench, describe, save_result  # noqa: E402
from course_lib.kv_cache import kv_bytes_per_token  # noqa: E402
from course_lib.llama import LlamaShape  # noqa: E402
from course_lib.requests import load_workload  # noqa: E402
from course_lib.roofline import measure_peaks, workload_floor  # noqa: E402

DEFAULT = ["sequential", "static", "dynamic", "continuous", "hf-generate", "hf-cb"]
RUNGS = {   # name -> engine, options ("rows": the rows' KV memory; "big": --big-batch)
    "paged": ("continuous", {"block_size": 16, "attention": "flex", "kv_memory_bytes": "rows",
                             "max_batch": "big"}),
    "chunked": ("continuous", {"block_size": 16, "attention": "flex", "kv_memory_bytes": "rows",
                               "max_batch": "big", "max_num_batched_tokens": "budget"}),
    "graphs": ("continuous", {"block_size": 16, "attention": "kernel", "cuda_graphs": True,
                              "kv_memory_bytes": "rows", "max_batch": "big",
                              "max_num_batched_tokens": "budget"}),
}


def parse_rung(spec: str, settings: dict):
    """``name[:key=value,...]`` -> (rung name, engine, max_batch, engine options)."""
    name, _, over = spec.partition(":")
    engine, options = RUNGS.get(name, (name, {}))
    options = {k: settings.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    for item in filter(None, over.split(",")):
        key, value = item.split("=")
        value = int(value) if value.isdigit() else value
        if key == "kv_memory_mib":
            key, value = "kv_memory_bytes", int(float(value) * 2**20)
        options[key] = value
    max_batch = options.pop("max_batch", settings["max_batch"])
    return spec, engine, int(max_batch), options


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", "--rungs", nargs="+", default=DEFAULT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workload", default="chat")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--big-batch", type=int, default=512, help="the paged rungs' largest batch")
    p.add_argument("--budget", type=int, default=2048, help="the chunked rungs' tokens per step")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sequential-n", type=int, default=None,
                   help="fewer requests for the unbatched baseline (it is slow)")
    p.add_argument("--no-tokens", dest="tokens", action="store_false",
                   help="leave each request's output tokens out of the JSON")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    loaded = models.load(a.model, dtype=a.dtype, device=a.device)
    shape = LlamaShape.from_config(loaded.config)
    dtype_bytes = loaded.model.dtype.itemsize
    requests = load_workload(a.workload, tokenizer=loaded.tokenizer, n=a.n, vocab_size=shape.vocab_size,
                             max_new_tokens=a.max_new_tokens)
    longest = max(len(r.prompt_tokens) for r in requests) + max(r.max_new_tokens for r in requests)
    settings = {"rows": a.max_batch * longest * kv_bytes_per_token(shape, dtype_bytes),
                "big": a.big_batch, "budget": a.budget, "max_batch": a.max_batch}
    runs = []
    for spec in a.engines:
        rung, engine, max_batch, options = parse_rung(spec, settings)
        n = a.sequential_n if engine == "sequential" and a.sequential_n else a.n
        try:
            r = bench(engine, a.model, a.workload, n, max_batch, a.dtype, a.device, tokens=a.tokens,
                      max_new_tokens=a.max_new_tokens, loaded=loaded, steps=True,
                      engine_options=options or None)
        except Exception as e:       # one broken rung must not lose the others' measurements
            import traceback
            traceback.print_exc()
            runs.append({"rung": rung, "engine": engine, "error": f"{type(e).__name__}: {e}"})
            continue
        r["rung"] = rung
        print(f"{rung:>24} | " + describe(r), flush=True)
        runs.append(r)
    first = next(r for r in runs if "error" not in r)
    peaks = measure_peaks(a.device, loaded.model.dtype)
    floor = workload_floor(shape, dtype_bytes, [len(r.prompt_tokens) for r in requests],
                           [r.max_new_tokens for r in requests], peaks) \
        if all(r.ignore_eos for r in requests) else None      # with EOS the lengths are unknown
    if floor:
        print(f"{'physical floor':>24} | {floor['seconds']:.2f} s, "
              f"{floor['output_tokens_per_s']:.0f} tok/s", flush=True)
    save_result({"model": a.model, "workload": a.workload, "n": a.n, "max_batch": a.max_batch,
                 "big_batch": a.big_batch, "budget": a.budget, "kv_memory_rows_bytes": settings["rows"],
                 "dtype": a.dtype, "device": first["device"], "versions": first["versions"],
                 "floor": floor, "runs": runs}, a.out,
                "python " + " ".join(shlex.quote(x) for x in sys.argv))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
