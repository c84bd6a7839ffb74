"""Paged decode attention (chapter 09): one new token per sequence attends to its keys and values,
read in place through its block table. A Triton kernel, and the PyTorch reference.

The kernel is memory-bound, so it must keep enough bytes in flight: one program per (sequence,
KV head, *split*), contexts cut into splits when sequences are few ("split-K", as in
flash-decoding). Each iteration reads ``BLOCK_N`` tokens for all ``heads / kv_heads`` query heads
into a float32 running softmax (max, sum, weighted values); a second kernel combines the splits.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from types import SimpleNamespace

import numpy as np
import torch

from course_lib.kernels.fused import errors, tl, triton  # triton is None without Triton
from course_lib.model.attention import GatheredFlexAttention, PagedAttention, cu_seqlens
from course_lib.model.kv_cache import PagedKVCache, to_device
from course_lib.model.llama import LlamaShape


def paged_decode_reference(q, k_cache, v_cache, block_tables, lengths, block_size: int):
    """The reference: gather each sequence's keys through its block table, then softmax.
    q ``(B, heads, d)``; k/v_cache ``(kv_heads, slots, d)``, one layer of a ``PagedKVCache``;
    block_tables ``(B, max_blocks)``; lengths ``(B,)``, the new token included."""
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[0]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[:, slots].float().repeat_interleave(heads // kv_heads, dim=0)   # (heads, n, d)
        v = v_cache[:, slots].float().repeat_interleave(heads // kv_heads, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].float(), k) / q.shape[-1] ** 0.5
        out[b] = torch.einsum("hn,hnd->hd", s.softmax(-1), v).to(q.dtype)
    return out


if triton is not None:
    # do_not_specialize: one compiled kernel for every batch and table width
    @triton.jit(do_not_specialize=["stride_tb", "S", "split_tokens"])
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, o_ptr, m_ptr, l_ptr,
                             scale, stride_qb, stride_qh, stride_kh, stride_ks, stride_tb,
                             stride_ob, stride_oh, stride_os, S, split_tokens,
                             H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g, d, n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
        heads = kvh * G + g
        gd_mask = (g < G)[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gd_mask, other=0.0)                                     # (G, D)
        # int32 token arithmetic: 64-bit division and products cost more per token in the loop
        length = tl.load(lengths_ptr + b).to(tl.int32)
        start = split * split_tokens
        end = tl.minimum(length, start + split_tokens)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)                         # running max
        total = tl.zeros([BLOCK_G], tl.float32)                                   # running sum
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)                            # weighted V
        for t0 in range(start, end, BLOCK_N):           # this split's tokens, BLOCK_N at a time
            tok = t0 + n
            valid = tok < end
            block = tl.load(tables_ptr + b * stride_tb + tok // BS, mask=valid, other=0)
            slot = block.to(tl.int64) * BS + tok % BS                             # (N,)
            rows = kvh * stride_kh + slot[:, None] * stride_ks + d[None, :]
            nd_mask = valid[:, None] & (d < D)[None, :]
            k = tl.load(k_ptr + rows, mask=nd_mask, other=0.0)                   # (N, D)
            v = tl.load(v_ptr + rows, mask=nd_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale        # (G, N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
        if SPLIT:        # partial results, combined by _combine_kernel
            out = o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os \
                + d[None, :]
            tl.store(out, acc, mask=gd_mask)
            ml = (b * H + heads) * S + split                                      # (B, H, S)
            tl.store(m_ptr + ml, m, mask=g < G)
            tl.store(l_ptr + ml, total, mask=g < G)
        else:
            tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=gd_mask)

    @triton.jit(do_not_specialize=["S"])
    def _combine_kernel(part_ptr, m_ptr, l_ptr, o_ptr, stride_ob, stride_oh, S, H: tl.constexpr,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)                 # (sequence, head), flattened
        b, h = bh // H, bh % H
        s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + bh * S + s, mask=s < S, other=float("-inf"))          # (S,)
        l = tl.load(l_ptr + bh * S + s, mask=s < S, other=0.0)
        part = tl.load(part_ptr + (bh * S + s[:, None]) * D + d[None, :],
                       mask=(s < S)[:, None] & (d < D)[None, :], other=0.0)      # (S, D)
        w = tl.exp(m - tl.max(m, axis=0))                                        # empty split: 0
        o = tl.sum(w[:, None] * part, axis=0) / tl.sum(w * l, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + d, o.to(o_ptr.dtype.element_ty),
                 mask=d < D)


BLOCK_N = 64          # tokens per loop iteration of the kernel
PROGRAMS = 512        # programs that keep an H100/H200 busy (132 SMs, a few programs each)
TRITON_LAUNCH = {"num_warps": 4, "num_stages": 2}   # Triton's settings for every launch
# a call's defaults, with TRITON_LAUNCH; ``longest_split``: tokens per split at most (None: any)
TUNING = {"block_n": BLOCK_N, "programs": PROGRAMS, "longest_split": None}


def n_splits(batch: int, kv_heads: int, max_tokens: int, block_n: int = BLOCK_N,
             programs: int = PROGRAMS, longest_split: int | None = None) -> int:
    """How many splits per sequence keep about ``programs`` programs busy, each split at least
    ``block_n`` tokens long (1 when the batch alone gives enough programs); with
    ``longest_split``, enough that none holds more tokens (for contexts of unequal length: a long
    one in several programs, a short one's extra splits idle)."""
    s = max(1, min(-(-programs // (batch * kv_heads)), -(-max_tokens // block_n)))
    return max(s, -(-max_tokens // longest_split)) if longest_split else s


def paged_decode(q, k_cache, v_cache, block_tables, lengths, block_size: int, out=None, **knobs):
    """The Triton kernel, as ``paged_decode_reference`` (into ``out`` if given). The splits depend
    on the batch and the tables' width, not on the lengths: nothing is read back from the GPU, so a
    CUDA graph can hold the call. ``knobs`` override ``TUNING`` and Triton's ``TRITON_LAUNCH``."""
    if triton is None:
        raise RuntimeError("the paged decode kernel needs Triton (it ships with CUDA builds of "
                           "PyTorch); use paged_decode_reference on the CPU")
    knobs = {**TUNING, **TRITON_LAUNCH, **knobs}
    block_n, programs = knobs.pop("block_n"), knobs.pop("programs")   # the rest: Triton's own
    longest = knobs.pop("longest_split")
    B, heads, d = q.shape
    kv_heads = k_cache.shape[0]
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    assert block_tables.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    G = heads // kv_heads
    max_tokens = block_tables.shape[1] * block_size
    S = n_splits(B, kv_heads, max_tokens, block_n, programs, longest)
    split_tokens = -(-max_tokens // S // block_n) * block_n
    consts = dict(H=heads, G=G, D=d, BS=block_size, BLOCK_G=max(16, triton.next_power_of_2(G)),
                  BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_N=block_n, SPLIT=S > 1,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **knobs)
    inputs = (q, k_cache, v_cache, block_tables, lengths)
    strides = (*q.stride()[:2], *k_cache.stride()[:2], block_tables.stride(0))
    if S == 1:
        _paged_decode_kernel[(B, kv_heads, 1)](*inputs, out, out, out, d ** -0.5, *strides,
                                               *out.stride()[:2], 0, S, split_tokens, **consts)
        return out
    part = torch.empty(B, heads, S, d, dtype=torch.float32, device=q.device)
    m = torch.empty(B, heads, S, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _paged_decode_kernel[(B, kv_heads, S)](*inputs, part, m, l, d ** -0.5, *strides,
                                           *part.stride()[:3], S, split_tokens, **consts)
    # the most splits the target allows, so that one combine kernel serves every batch
    most = S if longest else n_splits(1, kv_heads, 1 << 30, block_n, programs)
    _combine_kernel[(B * heads,)](part, m, l, out, out.stride(0), out.stride(1), S, H=heads, D=d,
                                  BLOCK_S=triton.next_power_of_2(most),
                                  BLOCK_D=triton.next_power_of_2(d))
    return out


def random_decode_step(shape, B=5, block_size=16, device="cpu", dtype=torch.float32, seed=0):
    """A paged cache of random keys and values for ``B`` sequences grown side by side (their blocks
    interleave), and a random query each: ``(cache, q, tables, lengths)``."""
    g = torch.Generator().manual_seed(seed)
    blocks = SimpleNamespace(block_size=block_size, n_blocks=10 * B, tables={}, lengths={})
    cache = PagedKVCache(shape, blocks, dtype, device)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    lengths = torch.randint(1, 9 * block_size, (B,), generator=g).tolist()
    # in turns of one token, a sequence takes its j-th block in round j, after those before it
    order = sorted((j, i) for i, n in enumerate(lengths) for j in range(-(-n // block_size)))
    blocks.lengths.update(enumerate(lengths))
    blocks.tables.update({i: [b for b, (_, j) in enumerate(order) if j == i] for i in range(B)})
    q = torch.randn(B, shape.n_heads, shape.head_dim, generator=g).to(dtype)
    return (cache, q.to(device), cache.table_tensor(range(B), device),
            torch.tensor(lengths, dtype=torch.int32, device=device))


# a small GQA shape (4 query heads per KV head) for the checks
SELFCHECK_SHAPE = LlamaShape(100, 64, 128, 1, n_heads=8, n_kv_heads=2, head_dim=32,
                             rope_theta=1e4, eps=1e-5, eos_token_id=0, max_context=4096)


def selfcheck(shape=SELFCHECK_SHAPE, cases=((5, 16), (5, 7), (5, 32), (256, 16),
                                            (256, 16, {"longest_split": 32})),
              device="cpu", dtype=torch.float32):
    """The kernel against the reference on random caches, a row per ``(B, block_size[, knobs])``:
    splits, every element written, ``errors``. On a CPU: ``TRITON_INTERPRET=1`` before importing
    Triton."""
    rows = []
    for seed, (B, block_size, *knobs) in enumerate(cases):
        cache, q, tables, lengths = random_decode_step(shape, B, block_size, device, dtype, seed)
        out = torch.full_like(q, float("nan"))
        knobs = knobs[0] if knobs else {}
        paged_decode(q, cache.k[0], cache.v[0], tables, lengths, block_size, out=out, **knobs)
        ref = paged_decode_reference(q, cache.k[0], cache.v[0], tables, lengths, block_size)
        splits = n_splits(B, shape.n_kv_heads, tables.shape[1] * block_size,
                          longest_split=knobs.get("longest_split"))
        rows.append({"batch": B, "block_size": block_size, "knobs": knobs, "splits": splits,
                     "all_written": not out.isnan().any().item(), **errors(out, ref)})
    return rows


class DecodeAttention(PagedAttention):
    """A decode step: each new key and value stored in its slot, then the kernel over the cache.
    ``slots`` ``(B,)``, ``tables`` ``(B, max_blocks)`` and ``lengths`` ``(B,)`` (new token included)
    are device tensors, so that a CUDA graph keeps them as inputs and only their contents change."""

    def __init__(self, cache, slots, tables, lengths):
        self.cache, self.slots, self.tables, self.lengths = cache, slots, tables, lengths

    @classmethod
    def of(cls, cache, seqs, device="cpu"):
        """From ``(seq_id, n_cached, 1)`` triples, as the packed attentions take them."""
        slots = [cache.slots(sid, cached, cached + 1)[0] for sid, cached, _ in seqs]
        return cls(cache, to_device(slots, device),
                   cache.table_tensor([sid for sid, _, _ in seqs], device),
                   to_device([cached + 1 for _, cached, _ in seqs], device))

    def attend(self, layer, q):
        """The kernel where it can run (CUDA, or Triton's interpreter), else the reference."""
        args = (q, self.cache.k[layer], self.cache.v[layer], self.tables, self.lengths,
                self.cache.block_size)
        if triton is not None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            return paged_decode(*args)
        return paged_decode_reference(*args)


class KernelPagedAttention(PagedAttention):
    """A packed step: its decodes (first in the step) through the decode kernel, its prefill
    chunks through ``prefill_cls`` (FlexAttention alone is slow for decodes: each query tile reads
    the keys of all its sequences for every query in it)."""

    prefill_cls = GatheredFlexAttention      # FlexPagedAttention reads the cache in place instead

    def __init__(self, cache, seqs, device="cpu"):
        seqs = list(seqs)
        d = next((i for i, (_, _, new) in enumerate(seqs) if new != 1), len(seqs))
        self.n_decode = d
        self.decode = DecodeAttention.of(cache, seqs[:d], device) if d else None
        self.prefill = self.prefill_cls(cache, seqs[d:], device) if d < len(seqs) else None
        self.positions = to_device(np.array([c for _, c, _ in seqs[:d]], dtype=np.int64), device)
        if self.prefill is not None:
            self.positions = torch.cat([self.positions, self.prefill.positions])
        self.cu_seqlens = to_device(cu_seqlens(new for _, _, new in seqs), device)
        self.cache = cache
        # rows for the rotated queries: the prefill's padding too, so that it needs no copy
        self.q_rows = d + self.prefill.block_mask.shape[-2] if self.prefill is not None else None

    @classmethod
    @torch.inference_mode()
    def precompile(cls, cache, max_tokens: int, shape, dtype):
        """Compile FlexAttention for every query bucket, and the decode kernel both split (on a
        sequence of 4 tiles) and unsplit (on one of one token), so that no timed step stalls."""
        cls.prefill_cls.precompile(cache, max_tokens, shape, dtype)
        device = cache.k[0].device
        for tokens in (4 * TUNING["block_n"], 1):
            if not cache.can_grow("precompile", tokens):
                continue
            cache.grow("precompile", tokens)
            q = torch.zeros(1, shape.n_heads, shape.head_dim, dtype=dtype, device=device)
            k = torch.zeros(1, shape.n_kv_heads, shape.head_dim, dtype=dtype, device=device)
            DecodeAttention.of(cache, [("precompile", tokens - 1, 1)], device)(0, q, k, k)
            cache.release("precompile")

    @cached_property
    def slots(self):
        """The new tokens' cache slots, in the packed order (one concatenation a step)."""
        parts = [p.slots for p in (self.decode, self.prefill) if p is not None]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def attend(self, layer, q):
        """Both parts over the cache, which already holds the step's keys and values."""
        d = self.n_decode
        parts = [p.attend(layer, x) for p, x in ((self.decode, q[:d]), (self.prefill, q[d:]))
                 if p is not None]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


if __name__ == "__main__":       # TRITON_INTERPRET=1 on a CPU
    for row in selfcheck():
        print(json.dumps(row))
