"""The non-matmul parts of a mixed step of 32 fresh prompts x 512 tokens (llama-1b-dummy's shape,
bf16, blocks scattered), variants of each timed with CUDA events (median; per step: 16 layers):
the packed key copy (advanced indexing, ``index_select``, each on 8-byte words), padding the
queries, FlexAttention's tiles, warps and stages, the SwiGLU kernel's block and warps, and a
two-stage argmax against ``torch.argmax`` (eager calls: small ones time the host's launches).

    python -m bench mixed_parts --out DIR
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from transformers import LlamaConfig

from bench import command
from course_lib.bench import save_result
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels import fused
from course_lib.measure.roofline import time_fn
from course_lib.model import attention, models
from course_lib.model.attention import GatheredFlexAttention
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import LlamaShape

MODEL = "llama-1b-dummy"
PROMPTS, TOKENS = 32, 512            # the mixed step: this many fresh prompts of this many tokens
BLOCK_SIZE = 16                      # the KV-cache's tokens per block
FLEX_OPTIONS = [
    dict(BLOCK_M=64, BLOCK_N=64),
    dict(BLOCK_M=128, BLOCK_N=64),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
]


def median_ms(fn, n=20) -> float:
    """Median milliseconds of ``fn()`` over ``n`` calls, CUDA events, after 3 warm-up calls."""
    return time_fn(fn, "cuda", repeat=n, warmup=3) * 1e3


def show(results: dict, group: str, name: str, ms: float) -> None:
    results.setdefault(group, {})[name] = ms
    print(f"{group:8s} {name:45s} {ms:8.3f} ms", flush=True)


def scattered_cache(shape) -> tuple:
    """A paged KV-cache of random keys and values, its blocks in shuffled order, holding the
    step's prompts; ``(cache, attention over them)``."""
    blocks = BlockManager(PROMPTS * TOKENS // BLOCK_SIZE + 64, BLOCK_SIZE)
    random.Random(0).shuffle(blocks.allocator.free_list)
    cache = PagedKVCache(shape, blocks, torch.bfloat16, "cuda")
    for tensor in cache.k + cache.v:
        tensor.normal_()
    for j in range(PROMPTS):
        cache.grow(j, TOKENS)
    seqs = [(j, 0, TOKENS) for j in range(PROMPTS)]
    return cache, GatheredFlexAttention(cache, seqs, "cuda")


def time_gathers(results, cache, read, n_layers) -> None:
    """The packed key and value copy of every layer: advanced indexing or ``index_select``, on
    the bf16 values or on 8-byte words."""
    i64, bf16 = torch.int64, torch.bfloat16
    variants = {
        "advanced index K[:, read]": lambda: [
            (cache.k[i][:, read], cache.v[i][:, read]) for i in range(n_layers)],
        "int64 view, advanced index": lambda: [
            (cache.k[i].view(i64)[:, read].view(bf16), cache.v[i].view(i64)[:, read].view(bf16))
            for i in range(n_layers)],
        "index_select": lambda: [
            (cache.k[i].index_select(1, read), cache.v[i].index_select(1, read))
            for i in range(n_layers)],
        "int64 view, index_select": lambda: [
            (cache.k[i].view(i64).index_select(1, read).view(bf16),
             cache.v[i].view(i64).index_select(1, read).view(bf16))
            for i in range(n_layers)],
    }
    for name, fn in variants.items():
        show(results, "gather", name, median_ms(fn))
    a = cache.k[3][:, read]
    b = cache.k[3].view(i64)[:, read].view(bf16)
    print("int64 gather equal:", torch.equal(a, b))


def time_query_padding(results, shape, n_layers) -> None:
    q = torch.randn(PROMPTS * TOKENS + 100, shape.n_heads, shape.head_dim, dtype=torch.bfloat16,
                    device="cuda")
    show(results, "qpad", "F.pad per layer x16",
         median_ms(lambda: [F.pad(q[100:], (0, 0, 0, 0, 0, 0)) for _ in range(n_layers)]))
    show(results, "qpad", "F.pad(+1 row) per layer x16",
         median_ms(lambda: [F.pad(q[101:], (0, 0, 0, 0, 0, 1)) for _ in range(n_layers)]))


def time_flex(results, shape, cache, attn, n_layers) -> None:
    """FlexAttention over the gathered keys and values with each of ``FLEX_OPTIONS``; ``err``:
    the largest difference from the first one's output."""
    read = attn.read
    keys = [cache.k[i][:, read] for i in range(n_layers)]
    values = [cache.v[i][:, read] for i in range(n_layers)]
    qq = torch.randn(PROMPTS * TOKENS, shape.n_heads, shape.head_dim, dtype=torch.bfloat16,
                     device="cuda")
    base = None
    for opts in FLEX_OPTIONS:
        try:
            def fn():
                return [attention.flex_attention(qq.transpose(0, 1)[None], keys[i][None],
                                                 values[i][None], block_mask=attn.block_mask,
                                                 enable_gqa=True, kernel_options=dict(opts))
                        for i in range(n_layers)]
            o = fn()[0]
            if base is None:
                base = o
            err = (o.float() - base.float()).abs().max().item()
            show(results, "flex", json.dumps(opts) + f" err {err:.1e}", median_ms(fn, 10))
        except Exception as e:
            print("flex", opts, "failed:", repr(e)[:200])


def time_silu_mul(results, shape, n_layers) -> None:
    """The SwiGLU kernel of every layer, per block size and number of warps."""
    rows = PROMPTS * TOKENS
    g = torch.randn(rows, 2 * shape.intermediate, dtype=torch.bfloat16, device="cuda")
    gate, up = g.chunk(2, dim=-1)
    n = shape.intermediate
    out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
    ref = fused.silu_mul(gate, up)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 1:
                continue

            def fn():
                for _ in range(n_layers):
                    fused._silu_mul_kernel[(rows, triton.cdiv(n, block))](
                        gate, up, out, n, g.stride(0), g.stride(0), BLOCK=block, num_warps=warps)
            ms = median_ms(fn)
            assert torch.equal(out, ref)
            bandwidth = 3 * rows * n * 2 * n_layers / ms / 1e9      # TB/s: read 2, write 1
            show(results, "silu", f"BLOCK={block} warps={warps} ({bandwidth:.2f} TB/s)", ms)


def two_stage_argmax(x, chunks):
    """``x.argmax(-1)`` in two steps: the max of each of ``chunks`` chunks of a row, then the
    first chunk with the largest (ties go to the first index, as ``torch.argmax``)."""
    rows, vocab = x.shape
    vals, idx = x.view(rows, chunks, vocab // chunks).max(-1)
    j = vals.argmax(-1, keepdim=True)
    return (idx.gather(-1, j) + j * (vocab // chunks)).squeeze(-1)


def time_argmax(results, shape) -> None:
    for rows in (1, 10, 64, 128, 256, 465, 512):
        x = torch.randn(rows, shape.vocab_size, dtype=torch.bfloat16, device="cuda")
        x[:, 7] = 10        # ties: the first must win
        x[:, 9000] = 10
        r = x.argmax(-1)
        show(results, "argmax", f"B={rows} torch.argmax", median_ms(lambda: x.argmax(-1), 50))
        for c in (16, 32, 64, 128, 256):
            assert torch.equal(two_stage_argmax(x, c), r), (rows, c)
            show(results, "argmax", f"B={rows} two-stage chunks={c}",
                 median_ms(lambda: two_stage_argmax(x, c), 50))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = LlamaShape.from_config(LlamaConfig(**models.PRESETS[MODEL].config))
    n_layers, results = shape.n_layers, {}
    cache, attn = scattered_cache(shape)
    time_gathers(results, cache, attn.read, n_layers)
    time_query_padding(results, shape, n_layers)
    time_flex(results, shape, cache, attn, n_layers)
    time_silu_mul(results, shape, n_layers)
    time_argmax(results, shape)
    save_result(results, out / "mixed_parts.json", command("mixed_parts", argv))


if __name__ == "__main__":
    main()
