"""Attention variants. The model calls ``attn(layer, q, k, v)`` once per layer; the attention
object stores the new keys and values in its KV-cache and attends over everything visible.

``PaddedAttention`` is the textbook layout: a batch of ``B`` rows, ``T`` new tokens per row, and a
contiguous cache in which row ``r`` holds its tokens in columns ``start[r] ...``. Columns before
``start[r]`` are left padding; a boolean mask hides them. Packed and paged variants come later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_visibility(start, write_at, n_cols):
    """Which cache columns each new token may attend to: a boolean ``(B, T, n_cols)``.

    A real token at column ``c`` of row ``r`` sees columns ``start[r] .. c`` (causal, no padding).
    A padding token sees only itself, so that no softmax row is empty (an empty row gives NaN).
    """
    cols = torch.arange(n_cols, device=write_at.device)                # (S,)
    at = write_at[..., None]                                           # (B, T, 1)
    real = (cols >= start[:, None, None]) & (cols <= at)
    return real | (cols == at)


class PaddedAttention:
    """Attention for one forward pass over a padded batch.

    cache:    a ``ContiguousKVCache``
    slots:    which cache rows the ``B`` batch rows use (a list of ints)
    start:    ``(B,)`` first real column of each row (= its amount of left padding)
    write_at: ``(B, T)`` cache column of each new token
    n_cols:   columns to attend over (``write_at.max() + 1``; pass it to spare a device sync)
    """

    def __init__(self, cache, slots, start, write_at, n_cols: int | None = None):
        self.cache, self.write_at = cache, write_at
        slots = list(slots)
        B = len(slots)
        # Consecutive slots are a view of the cache; any other set of rows must be gathered.
        consecutive = slots == list(range(slots[0], slots[0] + B))
        self.rows = slice(slots[0], slots[0] + B) if consecutive else torch.tensor(slots, device=write_at.device)
        self.slot_index = torch.tensor(slots, device=write_at.device)[:, None]
        self.n_cols = int(write_at.max()) + 1 if n_cols is None else n_cols
        self.visible = padded_visibility(start, write_at, self.n_cols)[:, None]   # (B, 1, T, S)
        self.positions = (write_at - start[:, None]).clamp(min=0)         # RoPE positions

    def __call__(self, layer, q, k, v):
        # q: (B, T, H, d); k, v: (B, T, Hkv, d)
        K, V = self.cache.k[layer], self.cache.v[layer]                   # (slots, Hkv, L, d)
        K[self.slot_index, :, self.write_at] = k
        V[self.slot_index, :, self.write_at] = v
        K, V = K[self.rows, :, :self.n_cols], V[self.rows, :, :self.n_cols]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=self.visible,
                                           enable_gqa=True)                # (B, H, T, d)
        return o.transpose(1, 2)


def cu_seqlens(lengths) -> list:
    """Where each sequence starts in a packed list of tokens (and where the last one ends):
    ``[0, l0, l0 + l1, ...]``, the index varlen attention kernels take."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def block_diagonal_causal(q_seq, q_pos, k_seq, k_pos):
    """The mask of packed attention: query i may see key j when both belong to the same sequence
    and key j is not later than query i. A boolean ``(N queries, M keys)``."""
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])


class PagedAttention:
    """Attention for one forward pass over *packed* tokens: the new tokens of several sequences
    concatenated into one list, no padding, with each sequence's keys and values in a paged cache.

    cache: a ``PagedKVCache`` whose block tables already hold room for the new tokens
    seqs:  ``(seq_id, n_cached, n_new)`` per sequence, in the order of the packed tokens:
           ``n_cached`` tokens are already in the cache, ``n_new`` come in this pass (a whole
           prompt, a chunk of one, or the one token of a decode step)

    ``cu_seqlens`` marks where each sequence starts in the packed list, as varlen kernels take it.
    This reference gathers each sequence's keys through its block table and runs one masked
    attention; the CUDA path of chapter 09 reads the blocks in place.
    """

    def __init__(self, cache, seqs, device="cpu"):
        self.cache = cache
        pos, write, read, q_seq, k_seq, k_pos = [], [], [], [], [], []
        for i, (sid, cached, new) in enumerate(seqs):
            pos += range(cached, cached + new)
            write += cache.slots(sid, cached, cached + new)
            read += cache.slots(sid, 0, cached + new)
            q_seq += [i] * new
            k_seq += [i] * (cached + new)
            k_pos += range(cached + new)
        t = lambda x: torch.tensor(x, device=device)
        self.positions, self.write, self.read = t(pos), t(write), t(read)
        self.cu_seqlens = t(cu_seqlens(new for _, _, new in seqs))
        self.mask = block_diagonal_causal(t(q_seq), self.positions, t(k_seq), t(k_pos))

    def __call__(self, layer, q, k, v):
        # q: (N, H, d); k, v: (N, Hkv, d)
        K, V = self.cache.k[layer], self.cache.v[layer]          # (blocks * block_size, Hkv, d)
        K[self.write], V[self.write] = k, v
        K, V = K[self.read].transpose(0, 1), V[self.read].transpose(0, 1)    # (Hkv, M, d)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[None], V[None],
                                           attn_mask=self.mask[None, None], enable_gqa=True)
        return o[0].transpose(0, 1)                               # (N, H, d)
