"""The fused elementwise kernels of chapter 09 (``course_lib.kernels.fused``) against the PyTorch
references of ``course_lib.model.llama``: in Triton's interpreter on the CPU (in a subprocess,
because the interpreter must be chosen before Triton is imported), and on a GPU in bf16, kernel by
kernel and as a whole model."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from course_lib.engines.block_manager import BlockManager
from course_lib.model import models
from course_lib.model.llama import REFERENCE_OPS, Llama, add_rms_norm, rms_norm


def test_the_reference_of_add_rms_norm_is_the_residual_add_then_the_norm():
    g = torch.Generator().manual_seed(0)
    x, d, w = (torch.randn(*size, generator=g) for size in ((3, 8), (3, 8), (8,)))
    x2, h = add_rms_norm(x, d, w, 1e-5)
    torch.testing.assert_close(x2, x + d)
    torch.testing.assert_close(h, rms_norm(x + d, w, 1e-5))
    assert add_rms_norm(x, None, w, 1e-5)[0] is x


def test_the_model_uses_the_references_unless_fused(tiny):
    model = Llama.from_hf(tiny.model)
    assert not model.fused and model.ops is REFERENCE_OPS


def test_stacked_projections_give_the_same_model(tiny):
    from course_lib.model.attention import PagedAttention
    from course_lib.model.kv_cache import PagedKVCache
    model = Llama.from_hf(tiny.model)
    tokens = torch.arange(3, 30)
    out = []
    for stacked in (False, True):
        if stacked:
            for w in model.layers:
                w.stack()
                # from here on only the stacked copies may be read: zero the originals
                w.wq, w.wk, w.wv, w.w_gate, w.w_up = (
                    torch.zeros_like(t) for t in (w.wq, w.wk, w.wv, w.w_gate, w.w_up))
        cache = PagedKVCache(model.shape, BlockManager(8, 16), model.dtype)
        cache.grow("a", len(tokens))
        attn = PagedAttention(cache, [("a", 0, len(tokens))])
        out.append(model(tokens, attn.positions, attn))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the bf16 test runs the real kernels")
def test_the_fused_kernels_in_the_interpreter():
    r = subprocess.run([sys.executable, "-m", "course_lib.kernels.fused"], capture_output=True,
                       text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {row["kernel"].split()[0] for row in rows} == {
        "add_rms_norm", "rms_norm", "rope_qk", "rope_qk_store", "silu_mul"}
    assert {row["tokens"] for row in rows} == {1, 7, 64}
    for row in rows:                 # NaN (an unwritten element can hold it) fails the comparison
        assert row["max_abs_error"] < 1e-5, row


FUSED_STEP = """
import torch
from course_lib.model import models
from course_lib.engines.block_manager import BlockManager
from course_lib.kernels import fused as fused_kernels
from course_lib.kernels.paged_decode import KernelPagedAttention
from course_lib.model.attention import PagedAttention
from course_lib.model.kv_cache import PagedKVCache
from course_lib.model.llama import REFERENCE_OPS, Llama
model = Llama.from_hf(models.load("tiny", dtype="float32").model)
cache = PagedKVCache(model.shape, BlockManager(40, 4), model.dtype)
g = torch.Generator().manual_seed(0)
for sid, n in (("a", 9), ("b", 6)):                      # two prompts, in the cache
    cache.grow(sid, n)
    attn = PagedAttention(cache, [(sid, 0, n)])
    model(torch.randint(3, 900, (n,), generator=g), attn.positions, attn)
cache.grow("a", 1); cache.grow("b", 1); cache.grow("c", 5)
seqs = [("a", 9, 1), ("b", 6, 1), ("c", 0, 5)]          # two decodes and a new prompt
tokens = torch.randint(3, 900, (7,), generator=g)
out = {}
for fused in (False, True):
    model.use_ops(fused_kernels.OPS if fused else REFERENCE_OPS)
    c = PagedKVCache(model.shape, cache.blocks, model.dtype)
    c.k, c.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    attn = KernelPagedAttention(c, seqs)
    out[fused] = (model(tokens, attn.positions, attn), c.k, c.v)
ref, fused = ([o[0], *o[1], *o[2]] for o in (out[False], out[True]))
print(max((a - b).abs().max().item() for a, b in zip(ref, fused)))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the model test runs the real kernels")
def test_the_fused_model_writes_the_cache_in_rope_as_the_reference_does():
    """Fused, RoPE writes the keys and values into the cache and attention only reads it: a mixed
    step (two decodes through the decode kernel, a prompt through FlexAttention) must give the
    reference's logits and leave the same cache, in Triton's interpreter."""
    r = subprocess.run([sys.executable, "-c", FUSED_STEP], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert float(r.stdout.split()[-1]) < 1e-5, r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fused_kernels_on_the_gpu_in_bf16():
    from course_lib.kernels.fused import selfcheck
    rows = selfcheck(device="cuda", dtype=torch.bfloat16, tokens=(1, 7, 300), hidden=2048, heads=32,
                     kv_heads=8, head_dim=64)
    for row in rows:
        assert row["relative_error"] < 1e-2, row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fused_model_gives_the_references_logits_on_the_gpu():
    loaded = models.load("tiny", dtype="bfloat16", device="cuda")
    model = Llama.from_hf(loaded.model)
    tokens = torch.arange(3, 40, device="cuda")
    from course_lib.kernels import fused as fused_kernels
    from course_lib.model.attention import PagedAttention
    from course_lib.model.kv_cache import PagedKVCache
    from course_lib.model.llama import REFERENCE_OPS
    out = []
    for fused in (False, True):
        model.use_ops(fused_kernels.OPS if fused else REFERENCE_OPS)
        cache = PagedKVCache(model.shape, BlockManager(8, 16), model.dtype, "cuda")
        cache.grow("a", len(tokens))
        attn = PagedAttention(cache, [("a", 0, len(tokens))], "cuda")
        out.append(model(tokens, attn.positions, attn))
    err = (out[1] - out[0]).norm() / out[0].norm()
    assert err < 1e-2, err
