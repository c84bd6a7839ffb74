"""Where a decode step's GPU time goes: torch.profiler over eager decode steps of the fast path
(the same kernels a CUDA graph replays), with the fused elementwise kernels and without them,
the kernels with the most GPU time, printed and written as JSON.

    python -m bench profile_decode --model llama-1b-dummy --batch 1 256 --context 640 --out DIR

``--mixed`` also profiles mixed steps of the fast path, as the ladder's fastest rung runs them
(16 prompts of 512 tokens prefilled next to 256 decodes, budget 8192), host work included: with
each prefill attention (``--prefill``: a packed copy of the keys, or the cache read in place), on
a fresh cache and on one whose blocks are scattered as after a while of serving.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import command
from bench.decode_step import decoding_batch, parse_knobs
from course_lib.bench import save_result
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels.cuda_graphs import DecodeGraphs
from course_lib.kernels.fused import OPS as FUSED_OPS
from course_lib.kernels.paged_decode import KernelPagedAttention
from course_lib.model.attention import FlexPagedAttention, GatheredFlexAttention
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import REFERENCE_OPS
from course_lib.model.sampling import sample

STEPS = 5


def top_kernels(prof, top):
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    return (sum(e.self_device_time_total for e in events) / 1e3,
            [[e.key, e.self_device_time_total / 1e3] for e in events[:top]])


PREFILL = {"in-place": FlexPagedAttention, "gathered": GatheredFlexAttention}


def mixed_step(model, n_prompts=16, prompt=512, n_decode=256, context=640, top=12,
               prefill="gathered", scattered=False):
    """Profile a mixed step: ``n_decode`` decodes at ``context`` tokens and ``n_prompts`` whole
    prompts, through KernelPagedAttention and the fused model, as the engine's model runner runs it.
    ``prefill``: the prompts' attention, reading the cache in place or a packed copy of it.
    ``scattered``: blocks handed out in a shuffled order, as in a cache that has served for a
    while (else a fresh cache, where each prompt's blocks lie side by side)."""
    bs = 16
    blocks = BlockManager(n_decode * -(-(context + 1) // bs) + n_prompts * -(-prompt // bs), bs)
    cache = PagedKVCache(model.shape, blocks, model.dtype, "cuda")
    if scattered:
        random.Random(0).shuffle(blocks.allocator.free_list)
    # the fast path's packed attention with this prefill (a subclass: the engine's stays as it is)
    Attention = type("Attention", (KernelPagedAttention,), {"prefill_cls": PREFILL[prefill]})
    cache.grow_side_by_side(dict.fromkeys(range(n_decode), context + 1), chunk=bs)
    for j in range(n_prompts):
        cache.grow(("p", j), prompt)
    seqs = [(i, context, 1) for i in range(n_decode)]
    seqs += [(("p", j), 0, prompt) for j in range(n_prompts)]
    Attention.precompile(cache, n_decode + n_prompts * prompt, model.shape, model.dtype)

    def step():
        attn = Attention(cache, seqs, "cuda")
        tokens = torch.ones(n_decode + n_prompts * prompt, dtype=torch.long, device="cuda")
        hidden = model.hidden_states(tokens, attn.positions, attn)
        return sample(model.logits(hidden[attn.cu_seqlens[1:] - 1])).tolist()

    for _ in range(3):
        step()
    walls = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step()
        walls.append((time.perf_counter() - t) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
    total, top = top_kernels(prof, top)
    walls.sort()
    print(f"--- mixed step: {n_prompts} x {prompt} prefill ({prefill}, "
          f"{'scattered' if scattered else 'fresh'} blocks) + {n_decode} decodes: "
          f"wall {walls[len(walls) // 2]:.1f} ms, GPU {total / STEPS:.1f} ms")
    for name, ms in top:
        print(f"{ms / STEPS:8.3f} ms  {name[:90]}")
    return {"prefill_tokens": n_prompts * prompt, "decodes": n_decode, "context": context,
            "prefill": prefill, "scattered": scattered,
            "wall_ms_median": walls[len(walls) // 2], "cuda_total_ms": total, "top": top}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b-dummy")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--context", type=int, default=640)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="a folder for the JSON")
    p.add_argument("--mixed", action="store_true", help="also profile mixed steps")
    p.add_argument("--prefill", nargs="+", default=["gathered", "in-place"], choices=list(PREFILL),
                   help="the mixed step's prefill attentions to profile (the first is the "
                        "engine's)")
    p.add_argument("--knobs", default="", help="decode kernel settings, e.g. num_warps=2")
    p.add_argument("--flex-options", default="",
                   help="FlexAttention kernel_options, e.g. BLOCK_M=128,BLOCK_N=64; 'default' "
                        "for its own")
    p.add_argument("--gathered-options", default="",
                   help="kernel_options of the gathered prefill, e.g. BLOCK_M=128,BLOCK_N=64; "
                        "'default' for its own")
    a = p.parse_args(argv)
    from course_lib.kernels import paged_decode
    from course_lib.model import attention
    if a.gathered_options:      # given: these alone ('default': FlexAttention's own)
        GatheredFlexAttention.kernel_options = parse_knobs(
            a.gathered_options.replace("default", ""))
    paged_decode.TUNING.update(parse_knobs(a.knobs))
    if a.flex_options:
        attention.FLEX_OPTIONS.clear()         # given: these alone (none: FlexAttention's defaults)
        attention.FLEX_OPTIONS.update(parse_knobs(a.flex_options.replace("default", "")))
    model, cache, rows, per_seq = decoding_batch(a.model, max(a.batch), a.context)
    batches = []
    for fused, b in [(f, b) for f in (True, False) for b in a.batch]:
        model.use_ops(FUSED_OPS if fused else REFERENCE_OPS)
        eager = DecodeGraphs(model, cache, max(a.batch), per_seq, graphs=False)
        for _ in range(3):
            eager.step(rows[:b])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                eager.step(rows[:b])
        total, top = top_kernels(prof, a.top)
        print(f"--- batch {b}, {'fused' if fused else 'unfused'}: "
              f"GPU {total / STEPS:.2f} ms per step")
        for kernel, ms in top:
            print(f"{ms / STEPS:8.3f} ms  {kernel[:90]}")
        batches.append({"batch": b, "fused": fused, "cuda_total_ms": total, "top": top})
    model.use_ops(FUSED_OPS)
    # mixed steps: each prefill attention, on a fresh cache and on one whose blocks are scattered
    mixed = [mixed_step(model, top=a.top, prefill=pre, scattered=sc)
             for pre in a.prefill for sc in (True, False)] if a.mixed else []
    if a.out:
        name = torch.cuda.get_device_name().lower().replace(" ", "-")
        settings = "".join("_" + x.replace("=", "").replace(",", "_")
                           for x in (a.knobs, a.flex_options, a.gathered_options) if x)
        save_result({"model": a.model, "dtype": str(model.dtype).removeprefix("torch."),
                     "kernel": paged_decode.TUNING, "flex_options": attention.FLEX_OPTIONS,
                     "gathered_options": GatheredFlexAttention.kernel_options,
                     "context": a.context, "steps_profiled": STEPS,
                     "device": {"device": torch.cuda.get_device_name()}, "batches": batches,
                     "mixed_step": mixed[0] if mixed else None, "mixed_steps": mixed},
                    Path(a.out) / f"profile_decode_{a.model}_{name}{settings}.json",
                    command("profile_decode", argv))


if __name__ == "__main__":
    main()
