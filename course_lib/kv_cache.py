"""The KV-cache: the keys and values of every token seen so far, kept so that each new token
attends to them without recomputing them.

How big is it? Every token keeps, in every layer, one key and one value vector per *KV head*:

    bytes per token = layers x 2 (K and V) x n_kv_heads x head_dim x bytes per number

With grouped-query attention (GQA) several query heads share one KV head, so n_kv_heads x head_dim
is smaller than d_model: SmolLM2-135M has 9 query heads but 3 KV heads, a third of the cache the
textbook formula ``layers x 2 x d_model`` predicts.

This module holds the *contiguous* cache: one row per batch slot, each row as long as the longest
sequence it may ever hold. Later chapters add the paged cache next to it.
"""
from __future__ import annotations

import torch


def kv_bytes_per_token(shape, dtype_bytes: int) -> int:
    """Bytes of KV-cache one token occupies, all layers together (GQA-aware)."""
    return shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * dtype_bytes


class ContiguousKVCache:
    """K and V as two tensors ``(layers, slots, n_kv_heads, max_len, head_dim)``.

    A slot is one row of the batch; column ``j`` of a row holds the token written at cache
    position ``j`` (for a left-padded batch the first columns of a short row hold padding).
    """

    def __init__(self, shape, n_slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        size = (shape.n_layers, n_slots, shape.n_kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.n_slots, self.max_len = n_slots, max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
