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

from itertools import chain

import numpy as np
import torch


def to_device(x, device):
    """A host list or NumPy array (block tables, slots, a packed layout) as a tensor on
    ``device``, without waiting for the device. A plain ``torch.tensor(x, device="cuda")`` copies
    and then *synchronises* the stream: the host would wait there for every step already queued on
    the GPU, which is what ``PagedEngine(overlap=True)`` must avoid (chapter 09). So on CUDA the
    values go through pinned memory (PyTorch's caching host allocator keeps the buffer until the
    copy is done) and the copy is asynchronous."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.tensor(x)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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


# ---------------------------------------------------------------- the paged cache (chapter 07)
class OutOfBlocks(RuntimeError):
    """No free block is left: the scheduler must wait, or preempt a running sequence."""


class BlockAllocator:
    """Fixed-size blocks handed out from a free list, with a reference count per block (a block
    shared by two sequences, e.g. a common prompt prefix, is freed when both let go of it)."""

    def __init__(self, n_blocks: int):
        if n_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {n_blocks}")
        self.n_blocks = n_blocks
        self.free_list = list(range(n_blocks - 1, -1, -1))     # pop() hands out block 0 first
        self.refs = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self.free_list)

    def allocate(self) -> int:
        if not self.free_list:
            raise OutOfBlocks(f"all {self.n_blocks} KV-cache blocks are in use")
        block = self.free_list.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is free: nothing to share")
        self.refs[block] += 1
        return block

    def free(self, block: int):
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is already free")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free_list.append(block)


class PagedKVCache:
    """K and V in blocks of ``block_size`` tokens: per layer, ``(kv_heads, (n_blocks + 1) * block_size, d)``.

    Each sequence owns a *block table*, the list of its blocks in order: token ``p`` of a
    sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``. Blocks are
    allocated as a sequence grows and freed when it finishes, so memory follows the tokens that
    exist, not the longest a sequence might become.
    """

    def __init__(self, shape, n_blocks: int, block_size: int, dtype=torch.float32, device="cpu"):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        self.block_size, self.allocator = block_size, BlockAllocator(n_blocks)
        # one tensor per layer, heads first: the (heads, tokens, d) layout attention kernels read.
        # One block more than the allocator hands out: the *pad block*, which no sequence owns,
        # where the padding rows of a CUDA graph's fixed-size batch write (chapter 09).
        self.pad_block = n_blocks
        size = (shape.n_kv_heads, (n_blocks + 1) * block_size, shape.head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.n_layers)]
        self.n_slots = (n_blocks + 1) * block_size
        self.tables: dict = {}       # sequence id -> its block table
        self.lengths: dict = {}      # sequence id -> tokens stored

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self):
        """Forget every sequence: all blocks free again (the tensors are kept, not cleared)."""
        self.allocator = BlockAllocator(self.allocator.n_blocks)
        self.tables.clear()
        self.lengths.clear()

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_grow(self, seq_id, n_new: int) -> bool:
        have = len(self.tables.get(seq_id, []))
        return self.blocks_needed(self.lengths.get(seq_id, 0) + n_new) - have <= self.allocator.n_free

    def grow(self, seq_id, n_new: int):
        """Make room for ``n_new`` more tokens of ``seq_id`` (raises ``OutOfBlocks``, leaving the
        sequence as it was, when there are not enough free blocks)."""
        if not self.can_grow(seq_id, n_new):
            raise OutOfBlocks(f"sequence {seq_id!r} needs more blocks than the "
                              f"{self.allocator.n_free} free ones")
        table = self.tables.setdefault(seq_id, [])
        n = self.lengths.get(seq_id, 0) + n_new
        while len(table) < self.blocks_needed(n):
            table.append(self.allocator.allocate())
        self.lengths[seq_id] = n

    def grow_each(self, seq_ids) -> bool:
        """One more token for each of ``seq_ids`` (sequences already in the cache: a decode
        step), all or nothing: ``False``, and nothing changed, when the free blocks do not
        suffice for all of them. A new block is needed only by a sequence whose blocks are full,
        so one count checks the whole batch (at batch 512, checking sequence by sequence cost
        the host about a millisecond a step)."""
        tables, lengths, bs = self.tables, self.lengths, self.block_size
        full = [s for s in seq_ids if lengths[s] == len(tables[s]) * bs]
        if len(full) > self.allocator.n_free:
            return False
        for s in full:
            tables[s].append(self.allocator.allocate())
        for s in seq_ids:
            lengths[s] += 1
        return True

    def grow_side_by_side(self, lengths: dict, chunk: int = 1):
        """Grow sequences ``{seq_id: tokens}`` in turns of ``chunk`` tokens, as a batch that decodes
        together does, so that their blocks interleave in memory (benchmarks and tests)."""
        done = dict.fromkeys(lengths, 0)
        while done != lengths:
            for sid, n in lengths.items():
                take = min(chunk, n - done[sid])
                if take:
                    self.grow(sid, take)
                    done[sid] += take

    def release(self, seq_id):
        """Free every block of a sequence (finished, or preempted)."""
        for block in self.tables.pop(seq_id, []):
            self.allocator.free(block)
        self.lengths.pop(seq_id, None)

    def table_tensor(self, seq_ids, device="cpu"):
        """The block tables of ``seq_ids`` as one ``(len(seq_ids), longest)`` int32 tensor, each
        row padded with 0 past its own blocks: what a kernel reads."""
        tables = [self.tables[s] for s in seq_ids]
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        out = np.zeros((len(tables), lengths.max()), dtype=np.int32)
        out[np.arange(out.shape[1]) < lengths[:, None]] = list(chain.from_iterable(tables))   # row by row
        return to_device(out, device)

    def packed_layout(self, seqs) -> dict:
        """For a packed step of ``(seq_id, n_cached, n_new)`` sequences, as int64 arrays: per new
        token its ``positions``, cache slot (``write``) and sequence index (``q_seq``); per block
        of the step's sequences the ``blocks``, their sequence (``block_seq``) and index in its
        table (``block_index``). The same as looping over ``slots``, without a Python loop per token."""
        cached = np.array([c for _, c, _ in seqs], dtype=np.int64)
        new = np.array([n for _, _, n in seqs], dtype=np.int64)
        tables = [self.tables[sid][:self.blocks_needed(c + n)] for sid, c, n in seqs]
        n_blocks = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        blocks = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(n_blocks.sum()))
        first_block = np.cumsum(n_blocks) - n_blocks            # where each table starts in blocks
        q_seq = np.repeat(np.arange(len(seqs)), new)
        positions = np.arange(int(new.sum())) - np.repeat(np.cumsum(new) - new - cached, new)
        write = blocks[first_block[q_seq] + positions // self.block_size] * self.block_size \
            + positions % self.block_size
        block_seq = np.repeat(np.arange(len(seqs)), n_blocks)
        return {"positions": positions, "write": write, "q_seq": q_seq, "blocks": blocks,
                "block_seq": block_seq, "block_index": np.arange(len(blocks)) - first_block[block_seq]}

    def slots(self, seq_id, start: int, stop: int) -> list:
        """Physical rows of tokens ``start .. stop - 1`` of a sequence."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]
