"""Kernel fusion (chapter 09): the layer's elementwise work in three Triton kernels. Where
PyTorch runs several kernels that each read and write memory, a fused kernel loads its inputs
once, works in registers and stores once. Each rounds where PyTorch does, so the fused model
follows the references of ``course_lib.model.llama`` closely.

* ``add_rms_norm(x, delta, w)``: the residual add and the next RMSNorm;
* ``rope_qk(q, k, cos, sin)``: RoPE on every query and key head of a token at once;
  ``rope_qk_store`` also writes the rotated keys and the values into the paged KV-cache;
* ``silu_mul(gate, up)``: SwiGLU's product.
"""
from __future__ import annotations

import json

import torch

from course_lib.model import llama
from course_lib.model.llama import ElementwiseOps, rope_cos_sin, rope_frequencies

try:                                   # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:                    # pragma: no cover - CPU-only installs
    triton = tl = None


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, x_out_ptr, h_ptr, n, eps,
                             HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * n          # one token (one row) per program
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        if HAS_DELTA:                                    # x + delta, rounded to the model's dtype
            delta = tl.load(d_ptr + row + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + row + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n + eps)
        y = (x32 * rms).to(h_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row + cols, (w * y).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate(x_ptr, out_ptr, tok, n_heads, stride_tok, out_row, out_head, c, s,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        """Rotate the pairs (x_i, x_{i + d/2}) of every head of one token by its angles; head ``h``
        goes to ``out_row + h * out_head`` (a contiguous row, or a slot of the KV-cache)."""
        h, i = tl.arange(0, BLOCK_H), tl.arange(0, HALF)
        src = tok.to(tl.int64) * stride_tok + h[:, None] * (2 * HALF) + i[None, :]   # (heads, d/2)
        at = out_row + h[:, None].to(tl.int64) * out_head + i[None, :]
        mask = (h < n_heads)[:, None]
        x1 = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        # as PyTorch does it in the model's dtype: x * cos + rotate_half(x) * sin
        o1 = ((x1 * c).to(dt).to(tl.float32) + (-x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + at, o1, mask=mask)
        tl.store(out_ptr + at + HALF, o2, mask=mask)

    @triton.jit
    def _rope_qk_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
                        slots_ptr, H, HKV, stride_q, stride_k, stride_v, stride_cache_head,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr):
        tok = tl.program_id(0)                           # one token per program, all its heads
        i, row = tl.arange(0, HALF), tok.to(tl.int64)
        D: tl.constexpr = 2 * HALF               # tl.arange needs it known at compile time
        c = tl.load(cos_ptr + row * D + i).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + row * D + i).to(tl.float32)[None, :]
        _rotate(q_ptr, q_out_ptr, tok, H, stride_q, row * H * D, D, c, s, HALF, BLOCK_H)
        if STORE:        # the rotated key and the value straight into the token's cache slot
            slot = tl.load(slots_ptr + tok).to(tl.int64)
            _rotate(k_ptr, k_out_ptr, tok, HKV, stride_k, slot * D, stride_cache_head, c, s,
                    HALF, BLOCK_H)
            h, d = tl.arange(0, BLOCK_H), tl.arange(0, D)
            mask = (h < HKV)[:, None]
            v = tl.load(v_ptr + row * stride_v + h[:, None] * D + d[None, :], mask=mask)
            at = slot * D + h[:, None].to(tl.int64) * stride_cache_head + d[None, :]
            tl.store(v_out_ptr + at, v, mask=mask)
        else:
            _rotate(k_ptr, k_out_ptr, tok, HKV, stride_k, row * HKV * D, D, c, s, HALF, BLOCK_H)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)                   # one token, BLOCK columns per program
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < n
        g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        silu = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * n + col, (silu * u).to(dt), mask=mask)


def add_rms_norm(x, delta, weight, eps):
    """``x + delta`` (the residual stream, updated) and its RMSNorm, in one pass over the rows.
    ``delta=None``: only the norm (the first layer's), and ``x`` comes back as it was."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    deltas = rows if delta is None else delta.reshape(rows.shape).contiguous()
    h = torch.empty_like(rows)
    x_out = rows if delta is None else torch.empty_like(rows)
    n = rows.shape[-1]
    _add_rms_norm_kernel[(rows.shape[0],)](
        rows, deltas, weight, x_out, h, n, eps, HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 1024 else 8)
    return (x if delta is None else x_out.view(x.shape)), h.view(x.shape)


def _heads(x):
    """``(tokens, heads, d)`` rows whose heads are contiguous: a view where it can be."""
    rows = x.reshape(-1, *x.shape[-2:]) if x.dim() != 3 else x
    return rows if rows.stride(-1) == 1 and rows.stride(-2) == x.shape[-1] else rows.contiguous()


def _cos_sin(cos, sin):
    return cos.reshape(-1, cos.shape[-1]).contiguous(), sin.reshape(-1, sin.shape[-1]).contiguous()


def _rope_consts(q, k) -> dict:
    return {"HALF": q.shape[-1] // 2,
            "BLOCK_H": triton.next_power_of_2(max(q.shape[-2], k.shape[-2]))}


def rope_qk(q, k, cos, sin):
    """RoPE on the queries ``(..., H, d)`` and keys ``(..., Hkv, d)`` of every token, one program
    per token. ``cos, sin``: ``(..., d)`` from ``rope_cos_sin``. q and k may be column slices of
    one matmul's output (each head's ``d`` numbers contiguous); the results are contiguous."""
    q_rows, k_rows = _heads(q), _heads(k)
    q_out = torch.empty(q_rows.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k_rows.shape, dtype=k.dtype, device=k.device)
    _rope_qk_kernel[(q_rows.shape[0],)](
        q_rows, k_rows, k_rows, *_cos_sin(cos, sin), q_out, k_out, k_out, q_out, q.shape[-2],
        k.shape[-2], q_rows.stride(0), k_rows.stride(0), 0, 0, **_rope_consts(q, k), STORE=False)
    return q_out.view(q.shape), k_out.view(k.shape)


def rope_qk_store(q, k, v, cos, sin, k_cache, v_cache, slots, rows: int | None = None):
    """``rope_qk`` with the cache write fused in: rotated keys and values go into one paged cache
    layer (``k_cache, v_cache``: ``(Hkv, slots, d)``) at ``slots``; returns the rotated queries,
    ``(tokens, H, d)``, or ``(rows, H, d)`` with rows past the tokens left unwritten (padding
    that attention may want, without a padded copy)."""
    d = q.shape[-1]
    q_rows, k_rows, v_rows = _heads(q), _heads(k), _heads(v)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride()[-2:] == (d, 1)
    n = q_rows.shape[0]
    q_out = torch.empty((max(rows or n, n), *q_rows.shape[1:]), dtype=q.dtype, device=q.device)
    _rope_qk_kernel[(q_rows.shape[0],)](
        q_rows, k_rows, v_rows, *_cos_sin(cos, sin), q_out, k_cache, v_cache, slots,
        q.shape[-2], k.shape[-2], q_rows.stride(0), k_rows.stride(0), v_rows.stride(0),
        k_cache.stride(0), **_rope_consts(q, k), STORE=True)
    return q_out.view(q.shape) if rows is None else q_out


def silu_mul(gate, up, block: int = 1024):
    """``silu(gate) * up``, elementwise. gate and up may be column slices of one matmul's output."""
    n = gate.shape[-1]
    g, u = (x.reshape(-1, n) for x in (gate, up))
    g, u = (x if x.stride(-1) == 1 else x.contiguous() for x in (g, u))
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    _silu_mul_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0),
                                                           BLOCK=block)
    return out.view(gate.shape)


# what ``Llama.use_ops`` takes: the model's elementwise work through these kernels
OPS = ElementwiseOps(add_rms_norm, rope_qk, silu_mul, rope_qk_store)


def errors(out, ref) -> dict:
    """The max abs and relative errors of ``out`` over every element (an unwritten one shows)."""
    err = out.float() - ref.float()
    return {"max_abs_error": err.abs().max().item(),
            "relative_error": (err.norm() / ref.float().norm()).item()}


def selfcheck(device="cpu", dtype=torch.float32, tokens=(1, 7, 64), hidden=96, heads=6,
              kv_heads=2, head_dim=16, seed=0) -> list:
    """Each kernel against its reference on fresh random inputs, a row of ``errors`` per (kernel,
    tokens). On the CPU: ``TRITON_INTERPRET=1``, set before Triton is first imported."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)    # noqa: E731
    rows = []

    def row(name, n, out, ref):
        rows.append({"kernel": name, "tokens": n, **errors(out, ref)})

    inv_freq = rope_frequencies(head_dim, 1e4, device)
    for n in tokens:
        x, delta, w = rnd(n, hidden), rnd(n, hidden), rnd(hidden)
        x_out, h = add_rms_norm(x, delta, w, 1e-5)
        x_ref, h_ref = llama.add_rms_norm(x, delta, w, 1e-5)
        row("add_rms_norm (residual)", n, x_out, x_ref)
        row("add_rms_norm (norm)", n, h, h_ref)
        row("rms_norm", n, add_rms_norm(x, None, w, 1e-5)[1],
            llama.add_rms_norm(x, None, w, 1e-5)[1])
        widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        if n == 7:        # separate tensors; otherwise slices of one stacked projection
            q, k, v = (rnd(n, w // head_dim, head_dim) for w in widths)
        else:
            q, k, v = (t.unflatten(-1, (-1, head_dim))
                       for t in rnd(n, sum(widths)).split(widths, dim=-1))
        positions = torch.randint(0, 4096, (n,), generator=g).to(device)
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)
        (qo, ko), (qr, kr) = rope_qk(q, k, cos, sin), llama.rope_qk(q, k, cos, sin)
        row("rope_qk (q)", n, qo, qr)
        row("rope_qk (k)", n, ko, kr)
        # the same with the cache write fused in: into scattered slots of a cache layer
        caches = [rnd(kv_heads, 4 * n + 8, head_dim) for _ in range(2)]
        slots = torch.randperm(4 * n + 8, generator=g)[:n].to(device)
        k_ref, v_ref = (c.clone() for c in caches)
        k_ref[:, slots], v_ref[:, slots] = kr.transpose(0, 1), v.transpose(0, 1)
        row("rope_qk_store (q)", n, rope_qk_store(q, k, v, cos, sin, *caches, slots), qr)
        row("rope_qk_store (k cache)", n, caches[0], k_ref)
        row("rope_qk_store (v cache)", n, caches[1], v_ref)
        gate, up = (rnd(n, 3 * hidden), rnd(n, 3 * hidden)) if n == 7 \
            else rnd(n, 6 * hidden).chunk(2, dim=-1)
        row("silu_mul", n, silu_mul(gate, up, block=128), llama.silu_mul(gate, up))
    return rows


if __name__ == "__main__":       # TRITON_INTERPRET=1 on a CPU
    for r in selfcheck():
        print(json.dumps(r))
