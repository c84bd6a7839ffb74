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
