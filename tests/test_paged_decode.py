"""The paged decode kernel (chapter 09) and its reference. The reference is checked against the
packed, paged attention of chapters 05-07 on the CPU. The Triton kernel is checked against the
reference on fresh random inputs: on a GPU in bf16, and on the CPU in Triton's interpreter (in a
subprocess, because the interpreter must be chosen before Triton is imported)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from course_lib.attention import PagedAttention
from course_lib.kv_cache import PagedKVCache
from course_lib.llama import LlamaShape
from course_lib.paged_decode import paged_decode, paged_decode_reference

SHAPE = LlamaShape(100, 64, 128, 1, n_heads=8, n_kv_heads=2, head_dim=32, rope_theta=1e4, eps=1e-5,
                   eos_token_id=0, max_context=4096)


def random_decode_step(B=5, block_size=16, device="cpu", dtype=torch.float32, seed=0):
    """A paged cache whose sequences grew side by side (blocks interleave) and one decode step."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(SHAPE, 10 * B, block_size, dtype, device)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    lengths = torch.randint(1, 9 * block_size, (B,), generator=g).tolist()
    for step in range(max(lengths)):
        for b, n in enumerate(lengths):
            if step < n:
                cache.grow(b, 1)
    q = torch.randn(B, SHAPE.n_heads, SHAPE.head_dim, generator=g).to(dtype)
    return (cache, q.to(device), cache.table_tensor(range(B), device),
            torch.tensor(lengths, dtype=torch.int32, device=device))


def test_the_reference_is_the_packed_paged_attention_of_a_decode_step():
    cache, q, tables, lengths = random_decode_step()
    ref = paged_decode_reference(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size)
    # the same step through chapter 05-07's attention: the new token is the last of each sequence,
    # already in the cache, so write it back unchanged
    seqs = [(b, n - 1, 1) for b, n in enumerate(lengths.tolist())]
    attn = PagedAttention(cache, seqs)
    slots = attn.write
    k_new, v_new = cache.k[0][:, slots].transpose(0, 1), cache.v[0][:, slots].transpose(0, 1)
    torch.testing.assert_close(attn(0, q, k_new, v_new), ref, rtol=1e-5, atol=1e-5)


KERNEL_CHECK = """
import torch
from test_paged_decode import random_decode_step
from course_lib.paged_decode import paged_decode, paged_decode_reference
# B=5: several splits per sequence and a combine; B=256: one split (the kernel writes the result)
for seed, block_size, B in ((0, 16, 5), (1, 7, 5), (2, 32, 5), (3, 16, 256)):
    cache, q, tables, lengths = random_decode_step(B=B, block_size=block_size, seed=seed)
    out = torch.full_like(q, float("nan"))
    paged_decode(q, cache.k[0], cache.v[0], tables, lengths, block_size, out=out)
    ref = paged_decode_reference(q, cache.k[0], cache.v[0], tables, lengths, block_size)
    assert not out.isnan().any(), "every output element must be written"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
print("kernel ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bf16 test runs the real kernel "
                    "(and older Tritons' interpreters fail there with numpy 2)")
def test_the_triton_kernel_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "kernel ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_triton_kernel_on_the_gpu_in_bf16():
    for seed, B in ((0, 1), (1, 8), (2, 64), (3, 256)):      # split and unsplit grids
        cache, q, tables, lengths = random_decode_step(B=B, seed=seed, device="cuda", dtype=torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        paged_decode(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size, out=out)
        ref = paged_decode_reference(q, cache.k[0], cache.v[0], tables, lengths, cache.block_size)
        assert not out.isnan().any(), "every output element must be written"
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, f"relative error {err:.2e}"
