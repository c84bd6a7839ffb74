"""The KV-cache: the keys and values of every token seen so far, so that new tokens attend to
them without recomputing them. The *contiguous* cache: one row per batch slot, as long as the
longest sequence it may hold; the *paged* one (chapter 07): blocks, found through block tables.
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch


def to_device(x, device):
    """A host list or NumPy array as a tensor on ``device``, copied asynchronously from pinned
    memory on CUDA (``torch.tensor(x, device="cuda")`` would wait for the device)."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.tensor(x)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def kv_bytes_per_token(shape, dtype_bytes: int) -> int:
    """Bytes of KV-cache one token occupies, all layers together: one K and V per *KV head*."""
    return shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * dtype_bytes


class ContiguousKVCache:
    """K and V as two tensors ``(layers, slots, n_kv_heads, max_len, head_dim)``: a slot is one
    row of the batch, column ``j`` its token at cache position ``j`` (or left padding)."""

    def __init__(self, shape, n_slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        size = (shape.n_layers, n_slots, shape.n_kv_heads, max_len, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)
        self.n_slots, self.max_len = n_slots, max_len


class PagedKVCache:
    """K and V per layer, ``(kv_heads, n_slots, d)``, in blocks of ``block_size`` slots (here a
    *slot* is one token's place, vLLM's slot mapping; above, a batch row). ``blocks`` (a
    ``BlockManager``) says which hold which tokens, and serves any attribute the cache lacks."""

    def __init__(self, shape, blocks, dtype=torch.float32, device="cpu"):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.tables, self.lengths = blocks.tables, blocks.lengths   # read at every step
        # one block more than the manager hands out: the *pad block*, no sequence's, where the
        # padding rows of a CUDA graph's fixed-size batch write (chapter 09)
        self.pad_block = blocks.n_blocks
        self.n_slots = (blocks.n_blocks + 1) * self.block_size
        size = (shape.n_kv_heads, self.n_slots, shape.head_dim)     # the layout kernels read
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]

    def __getattr__(self, name):          # only for what the cache itself lacks
        if name == "blocks":               # (not set yet: no recursion)
            raise AttributeError(name)
        return getattr(self.blocks, name)

    def table_tensor(self, seq_ids, device="cpu"):
        """The block tables of ``seq_ids`` as one int32 tensor, rows padded with 0: for kernels."""
        tables = [self.tables[s] for s in seq_ids]
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        out = np.zeros((len(tables), lengths.max()), dtype=np.int32)
        out[np.arange(out.shape[1]) < lengths[:, None]] = list(chain.from_iterable(tables))
        return to_device(out, device)

    def packed_layout(self, seqs) -> dict:
        """For a packed step of ``(seq_id, n_cached, n_new)`` sequences, as int64 arrays: per new
        token its ``positions``, cache slot (``write``) and sequence (``q_seq``); per block of
        the step's sequences the ``blocks``, their sequence and index in its table."""
        cached = np.array([c for _, c, _ in seqs], dtype=np.int64)
        new = np.array([n for _, _, n in seqs], dtype=np.int64)
        tables = [self.tables[sid][:-(-(c + n) // self.block_size)] for sid, c, n in seqs]
        n_blocks = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        blocks = np.fromiter(chain.from_iterable(tables), dtype=np.int64,
                             count=int(n_blocks.sum()))
        first_block = np.cumsum(n_blocks) - n_blocks            # where each table starts in blocks
        q_seq = np.repeat(np.arange(len(seqs)), new)
        positions = np.arange(int(new.sum())) - np.repeat(np.cumsum(new) - new - cached, new)
        write = blocks[first_block[q_seq] + positions // self.block_size] * self.block_size \
            + positions % self.block_size
        block_seq = np.repeat(np.arange(len(seqs)), n_blocks)
        return {"positions": positions, "write": write, "q_seq": q_seq, "blocks": blocks,
                "block_seq": block_seq,
                "block_index": np.arange(len(blocks)) - first_block[block_seq]}

    def slots(self, seq_id, start: int, stop: int) -> list:
        """Physical rows of tokens ``start .. stop - 1`` of a sequence."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]
