"""Paged decode attention: one new token per sequence attends to its keys and values, read in
place through its block table. The course's own Triton kernel (chapter 09), and the plain PyTorch
reference it is checked against.

Work per call: every cached key and value of every sequence is read once (``2 x tokens x
kv_heads x head_dim x bytes``); the FLOPs are tiny (``4 x tokens x heads x head_dim``). So the
kernel is memory-bound, and the one thing it must do well is read each block once, whole, for
all the query heads that share it (grouped-query attention).

The kernel runs one program per (sequence, KV head). It walks the sequence's block table, loads
one block of keys (``block_size x head_dim``) for all ``G = heads / kv_heads`` query heads of the
group at once, and keeps a running softmax (max, sum, weighted values) in float32, so that no
score matrix is ever stored. Positions past the sequence's length are masked.
"""
from __future__ import annotations

import torch

try:                                   # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:                    # pragma: no cover - CPU-only installs
    triton = None


def paged_decode_reference(q, k_cache, v_cache, block_tables, lengths, block_size: int):
    """The reference: gather each sequence's keys through its block table, then softmax.

    q:            (B, heads, d), one new token per sequence
    k/v_cache:    (kv_heads, slots, d), one layer of a ``PagedKVCache``
    block_tables: (B, max_blocks) int, padded with anything past each sequence's blocks
    lengths:      (B,) int, tokens in the cache per sequence (the new token's included)
    """
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
    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, o_ptr, scale,
                             stride_qb, stride_qh, stride_kh, stride_ks, stride_tb,
                             stride_ob, stride_oh,
                             G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b, kvh = tl.program_id(0), tl.program_id(1)
        g, d, n = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
        heads = kvh * G + g
        gd_mask = (g < G)[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gd_mask, other=0.0).to(tl.float32)                     # (G, D)
        length = tl.load(lengths_ptr + b)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)                         # running max
        total = tl.zeros([BLOCK_G], tl.float32)                                   # running sum
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)                            # weighted V
        for i in range(0, tl.cdiv(length, BS)):     # this sequence's blocks, in order
            valid = (n < BS) & (i * BS + n < length)                              # (N,)
            block = tl.load(tables_ptr + b * stride_tb + i)
            rows = kvh * stride_kh + (block * BS + n)[:, None] * stride_ks + d[None, :]
            nd_mask = valid[:, None] & (d < D)[None, :]
            k = tl.load(k_ptr + rows, mask=nd_mask, other=0.0).to(tl.float32)     # (N, D)
            v = tl.load(v_ptr + rows, mask=nd_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale             # (G, N)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
        o = acc / total[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=gd_mask)


def decode_attention(q, k_cache, v_cache, block_tables, lengths, block_size: int, out=None):
    """The kernel where it can run (a CUDA tensor, or Triton's interpreter), else the reference."""
    import os
    if triton is not None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return paged_decode(q, k_cache, v_cache, block_tables, lengths, block_size, out)
    ref = paged_decode_reference(q, k_cache, v_cache, block_tables, lengths, block_size)
    return ref if out is None else out.copy_(ref)


def paged_decode(q, k_cache, v_cache, block_tables, lengths, block_size: int, out=None):
    """The Triton kernel; same arguments and result as ``paged_decode_reference`` (``out``: where
    to write it). On the CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before
    Triton is imported): slow, but the same code, so the tests check it without a GPU."""
    if triton is None:
        raise RuntimeError("the paged decode kernel needs Triton (it ships with CUDA builds of "
                           "PyTorch); use paged_decode_reference on the CPU")
    B, heads, d = q.shape
    kv_heads = k_cache.shape[0]
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    out = torch.empty_like(q) if out is None else out
    G = heads // kv_heads
    _paged_decode_kernel[(B, kv_heads)](
        q, k_cache, v_cache, block_tables, lengths, out, d ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=G, D=d, BS=block_size, BLOCK_G=triton.next_power_of_2(G),
        BLOCK_D=triton.next_power_of_2(d), BLOCK_N=triton.next_power_of_2(block_size))
    return out
