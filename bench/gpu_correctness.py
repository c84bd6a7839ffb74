"""The fast engine on a GPU says what Hugging Face says: SmolLM2-135M (real weights) in float32,
greedy, on chat prompts, against ``generate`` run on each prompt alone; with the engine's CUDA
defaults, with prompts cut into small chunks, in a cache small enough to force preemptions, and
with prefix caching (the chat template's system prompt is a prefix every request shares).

    python -m bench gpu_correctness --n 20 --max-new-tokens 64 --out DIR
"""
import argparse
import sys
from pathlib import Path

import torch

from bench import command
from bench.smollm2_gpu import agreement
from course_lib.bench import bench, describe, save_result
from course_lib.model import models
from course_lib.requests import chat_workload

# case -> the options given to the fast engine on top of its defaults
CASES = {
    "fast": {},
    "chunked": {"max_num_batched_tokens": 64},
    "preempting": {"max_num_batched_tokens": 64, "num_blocks": 48},
    # chunks: the newcomers that get none this step are matched again once the first is cached
    "prefix caching": {"max_num_batched_tokens": 64, "prefix_caching": True},
}


def hf_greedy(loaded, requests) -> list:
    """Hugging Face's greedy answer to each request, alone, stopped after its EOS."""
    eos, out = loaded.model.config.eos_token_id, []
    with torch.inference_mode():
        for r in requests:
            ids = loaded.model.generate(torch.tensor([r.prompt_tokens], device=loaded.model.device),
                                        max_new_tokens=r.max_new_tokens, do_sample=False,
                                        pad_token_id=eos)
            answer = ids[0, len(r.prompt_tokens):].tolist()
            out.append(answer[:answer.index(eos) + 1] if eos in answer else answer)
    return out


def check(loaded, n: int, max_new_tokens: int, echo=print) -> list:
    """One bench result per case, each with its ``agreement_with_hf``."""
    requests = chat_workload(loaded.tokenizer, n=n, max_new_tokens=max_new_tokens)
    expected, runs = hf_greedy(loaded, requests), []
    for case, options in CASES.items():
        r = bench("fast", "smollm2-135m", "chat", n, n, "float32", loaded.model.device.type,
                  tokens=True,
                  max_new_tokens=max_new_tokens, loaded=loaded, progress=False,
                  engine_options=options)
        ours = {q["id"]: q["output_tokens"] for q in r["requests"]}
        r.update(case=case, agreement_with_hf=agreement([ours[q.id] for q in requests], expected))
        echo(f"{case:>15} | {describe(r)} | preemptions {r['metrics'].get('preemptions')} | "
             f"prefix hits {r['metrics'].get('prefix_hit_tokens')} | {r['agreement_with_hf']}")
        runs.append(r)
    return runs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    loaded = models.load("smollm2-135m", dtype="float32", device="cuda")
    runs = check(loaded, a.n, a.max_new_tokens)
    for r in runs:
        r.pop("requests")                 # the agreement is what is read
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    save_result({"model": "smollm2-135m", "workload": "chat", "n": a.n, "dtype": "float32",
                 "max_new_tokens": a.max_new_tokens, "device": runs[0]["device"], "runs": runs},
                Path(a.out) / f"gpu_correctness_smollm2-135m_{name}.json",
                command("gpu_correctness", argv))


if __name__ == "__main__":
    main()
