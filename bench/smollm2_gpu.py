"""SmolLM2-135M (real weights) on the fast path in bf16: token agreement with Hugging Face
``generate`` (each prompt alone, greedy, the same dtype) on the chat workload, and what CUDA graphs
buy a small, launch-bound model (the same engine with and without them, at small and large batch).

    python -m bench smollm2_gpu --n 32 --max-new-tokens 64 --out DIR
"""
import argparse
import sys
from pathlib import Path

import torch

from bench import command
from course_lib.bench import bench, describe, save_result
from course_lib.model import models
from course_lib.requests import chat_workload


def agreement(ours: list, theirs: list) -> dict:
    """Requests answered identically, and tokens equal up to each answer's first difference."""
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ours, theirs))
    return {"requests_identical": same, "requests": len(theirs),
            "tokens_before_first_difference": prefix, "tokens": sum(map(len, theirs))}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    loaded = models.load("smollm2-135m", dtype=a.dtype, device="cuda")
    requests = chat_workload(loaded.tokenizer, n=a.n, max_new_tokens=a.max_new_tokens)
    hf = []
    with torch.inference_mode():
        for r in requests:
            ids = loaded.model.generate(torch.tensor([r.prompt_tokens], device="cuda"),
                                        max_new_tokens=a.max_new_tokens, do_sample=False,
                                        pad_token_id=loaded.model.config.eos_token_id)
            out = ids[0, len(r.prompt_tokens):].tolist()
            eos = loaded.model.config.eos_token_id
            hf.append(out[:out.index(eos) + 1] if eos in out else out)
    runs = []
    for max_batch, graphs in ((1, False), (1, True), (a.n, False), (a.n, True)):
        r = bench("continuous", "smollm2-135m", "chat", a.n, max_batch, a.dtype, "cuda",
                  tokens=True, max_new_tokens=a.max_new_tokens, loaded=loaded, steps=True,
                  progress=False,
                  engine_options={"block_size": 16, "attention": "kernel", "cuda_graphs": graphs})
        ours = {q["id"]: q["output_tokens"] for q in r["requests"]}
        r["agreement_with_hf"] = agreement([ours[q.id] for q in requests], hf)
        print(describe(r), "| graphs" if graphs else "| eager", "|",
              r["agreement_with_hf"], flush=True)
        runs.append(r)
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    save_result({"model": "smollm2-135m", "workload": "chat", "n": a.n, "dtype": a.dtype,
                 "max_new_tokens": a.max_new_tokens, "device": runs[0]["device"], "runs": runs},
                Path(a.out) / f"smollm2_fastpath_{name}.json",
                command("smollm2_gpu", argv))


if __name__ == "__main__":
    main()
